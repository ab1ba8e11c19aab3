"""The single-stream vision-language model: embed text and regions, concatenate, encode.

The sequence of a sample is ``[CLS] w1..wT [SEP] r1..rK``. A batch is laid out as
its padded text block followed by its padded region block, ``(B, T + K)``, with
a key mask so padding is never attended to; with full bidirectional attention
and no region position ids this is exactly UNITER's packed sequence, and heads
can find text and region positions by slicing.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..objective import EncoderOutput
from ..recipe import ModelConfig
from .backbone import GridBackbone
from .embeddings import RegionEmbedder, TextEmbedder
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
        if input_ids is not None:
            parts.append(self.text_embedder(input_ids))  # (B, T, H)
            masks.append(batch["text_mask"])
        T = input_ids.shape[1] if input_ids is not None else 0
        if feats is not None and feats.shape[1] > 0:
            type_1 = self.text_embedder.token_type_embeddings.weight[1]
            parts.append(self.region_embedder(feats, boxes, type_1, batch.get("region_masked")))  # (B, K, H)
            masks.append(region_mask)
        if not parts:
            raise ValueError("batch has neither text nor regions")
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, T + K, H)
        key_mask = torch.cat(masks, dim=1) if len(masks) > 1 else masks[0]  # (B, T + K)
        hidden = self.trunk(x, key_mask)
        return EncoderOutput(hidden=hidden, pooled=self.pooler(hidden), text_len=T, model=self)
