"""The single-stream vision-language model: embed text and regions, concatenate, encode.

The sequence of a sample is ``[CLS] w1..wT [SEP] r1..rK``. A batch is laid out as
its padded text block followed by its padded region block, ``(B, T + K)``, with
a key mask so padding is never attended to; with full bidirectional attention
and no region position ids this is exactly UNITER's packed sequence, and heads
can find text and region positions by slicing. With ``unpad`` (the default) the
trunk runs on the real tokens only (see ``packing``); heads see the same padded
``(B, T + K, H)`` states either way (zeros at padding when unpadded).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..objective import EncoderOutput
from ..recipe import ModelConfig
from .backbone import GridBackbone
from .embeddings import RegionEmbedder, TextEmbedder
from .packing import Layout, noted_count
from .trunk import Pooler, Trunk


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialization: N(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VLModel(nn.Module):
    """Text embedder + region embedder (+ optional timm backbone) + trunk + pooler."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved (from the tokenizer) before building the model")
        self.config = config
        H = config.hidden_size
        self.backbone = None
        feature_dim = config.region_feature_dim
        if config.image_backbone is not None:
            bb = config.image_backbone
            self.backbone = GridBackbone(bb.name, bb.pretrained, bb.frozen)
            feature_dim = self.backbone.num_features
        self.feature_dim = feature_dim
        self.text_embedder = TextEmbedder(config.vocab_size, H, config.max_positions, 2, config.dropout)
        self.region_embedder = RegionEmbedder(feature_dim, H, config.dropout)
        self.trunk = Trunk(H, config.layers, config.heads, config.ffn_size, config.dropout)
        self.pooler = Pooler(H)
        #: run the trunk on real tokens only (False: on the padded batch, as before)
        self.unpad = True
        #: run the last layer only where heads read (see TrunkOutput; False: everywhere, as before)
        self.partial_last_layer = True
        init_weights(self.text_embedder)
        init_weights(self.region_embedder)
        nn.init.normal_(self.region_embedder.mask_vector, std=0.02)
        init_weights(self.trunk)
        init_weights(self.pooler)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.text_embedder.word_embeddings

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.text_embedder.word_embeddings.weight.numel()
        return n

    def regions_from_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Region features (B, K, D), boxes (B, K, 4), valid mask (B, K) from the batch (or images).

        ``batch["zero_region_features"] = True`` zeroes every region feature (boxes kept), whether
        the features come from the data or the backbone: evaluation's "blind" variants use it.
        """
        if self.backbone is not None and batch.get("image") is not None:
            feats, boxes = self.backbone(batch["image"])
            mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        else:
            feats, boxes, mask = batch.get("features"), batch.get("boxes"), batch.get("region_mask")
        if feats is not None and batch.get("zero_region_features"):
            feats = torch.zeros_like(feats)
        return feats, boxes, mask

    def forward(self, batch: dict[str, Any]) -> EncoderOutput:
        input_ids = batch.get("input_ids")  # (B, T)
        feats, boxes, region_mask = self.regions_from_batch(batch)  # (B, K, D), (B, K, 4), (B, K)
        parts, masks = [], []
        text_mask = batch.get("text_mask") if input_ids is not None else None
        if input_ids is not None:
            parts.append(self.text_embedder(input_ids))  # (B, T, H)
            masks.append(text_mask)
        T = input_ids.shape[1] if input_ids is not None else 0
        if feats is None or feats.shape[1] == 0:
            region_mask = None
        else:
            type_1 = self.text_embedder.token_type_embeddings.weight[1]
            parts.append(self.region_embedder(feats, boxes, type_1, batch.get("region_masked")))  # (B, K, H)
            masks.append(region_mask)
        if not parts:
            raise ValueError("batch has neither text nor regions")
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, T + K, H)
        key_mask = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]  # (B, T + K)
        count = noted_count(text_mask, region_mask)
        if count is None:
            count = int(key_mask.sum())  # reads the device (a sync on a GPU): only for un-noted batches
        padded = count < key_mask.numel()
        layout = Layout.of(key_mask, count) if self.unpad and padded else None
        out = TrunkOutput(self, *self.trunk.penultimate(x, key_mask, layout, padded=padded), layout, key_mask.shape, T)
        if not self.partial_last_layer:
            out.hidden  # noqa: B018  (the whole last layer now, as before)
        return out


class TrunkOutput(EncoderOutput):
    """An :class:`EncoderOutput` whose last trunk layer runs when it is first read: on every position
    for ``hidden`` (and ``text``, ``regions``), on the ``[CLS]`` positions alone for ``pooled``, on
    the asked positions alone for :meth:`rows`. A head reading a few positions (ITM, VQA: ``[CLS]``;
    MLM, MRFR: the masked ones) spares the trunk nearly all of its last layer; the states are the
    same (up to rounding) whichever way they are computed."""

    def __init__(self, model: VLModel, x: torch.Tensor, attn_mask, layout: Layout | None,
                 shape: tuple[int, int], text_len: int):
        self.model, self.text_len, self.shared = model, text_len, {}
        self._x, self._attn_mask, self._layout, self._shape = x, attn_mask, layout, tuple(shape)
        self._hidden = self._pooled = self._kv = None  # _kv: the last layer's keys and values, once computed

    @property
    def hidden(self) -> torch.Tensor:  # (B, T + K, H)
        if self._hidden is None:
            trunk = self.model.trunk
            h = trunk.run_layer(trunk.layers[-1], self._x, self._attn_mask, self._layout, self._kv)
            self._hidden = self._layout.pad(h) if self._layout is not None else h
        return self._hidden

    @property
    def pooled(self) -> torch.Tensor:  # (B, H)
        if self._pooled is None:
            cls = self._hidden[:, 0] if self._hidden is not None else self.rows([[0]] * self._shape[0])
            self._pooled = self.model.pooler.of_cls(cls)
        return self._pooled

    def rows(self, positions: list, offset: int = 0) -> torch.Tensor:
        """Final states (n, H) at per-sample ``positions`` (host lists) of the block starting at
        column ``offset`` (text: 0, regions: ``text_len``), sample-major."""
        if self._hidden is not None:
            B, L = self._shape
            at = torch.tensor([b * L + offset + int(p) for b, ps in enumerate(positions) for p in ps], dtype=torch.long)
            return self._hidden.reshape(B * L, -1).index_select(0, at.to(self._hidden.device, non_blocking=True))
        layer = self.model.trunk.layers[-1]
        if self._kv is None:
            self._kv = layer.keys_values(self._x, self._layout)  # (B, L, 2H), shared by every later read
        return layer.rows(self._x, self._attn_mask, self._layout, self._shape,
                          [[offset + int(p) for p in ps] for ps in positions], self._kv)
