"""The shared transformer trunk: a BERT-compatible post-LN encoder.

Same math as ``transformers.BertModel`` (post-LN, exact GELU, LayerNorm eps
1e-12), so BERT checkpoints load and export losslessly (see ``bert_io``), but
with a fused QKV projection and ``scaled_dot_product_attention``, which picks
flash / memory-efficient kernels where the device has them (on CPU in training, the
same attention and dropout with fewer passes: ``vlpt.model.dropout``).

Given a :class:`~vlpt.model.packing.Layout`, the trunk works on the real tokens only
(``(N, H)``): every dense layer skips the padding, and attention re-pads per layer (see
``packing``). ``processed_tokens`` counts the token rows its dense layers ran on.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dropout import add_dropout, attention
from .embeddings import LN_EPS
from .packing import Layout


class TrunkLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=LN_EPS)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None, layout: Layout | None = None,
                kv: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, H), or (N, H) real tokens with their ``layout``; ``kv``: this layer's keys and
        values of ``x`` if already computed (:meth:`keys_values`)."""
        H = x.shape[-1]
        if kv is None:
            qkv = self.qkv(x)  # (B, L, 3H) or (N, 3H)
        else:
            qkv = F.linear(x, self.qkv.weight[:H], self.qkv.bias[:H])  # queries only
        if layout is not None:
            qkv = layout.pad(qkv)  # (B, L, 3H): attention is per sequence
        B, L = qkv.shape[:2]
        if kv is not None:
            qkv = torch.cat([qkv, kv], dim=-1)  # (B, L, 3H)
        q, k, v = qkv.view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, nh, L, hd)
        a = attention(q, k, v, attn_mask, self.dropout, self.training)  # (B, nh, L, hd)
        a = a.transpose(1, 2).reshape(B, L, H)
        if layout is not None:
            a = layout.unpad(a)  # (N, H)
        return self._after_attention(x, a)

    def _after_attention(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:  # (n, H), (n, H) -> (n, H)
        p, training = self.dropout, self.training  # dropout on each sublayer's output, then residual + LN:
        x = self.attn_norm(add_dropout(x, self.attn_out(a), p, training))  # post-LN, as BERT
        return self.ffn_norm(add_dropout(x, self.ffn_out(F.gelu(self.ffn_in(x))), p, training))

    def keys_values(self, x: torch.Tensor, layout: Layout | None) -> torch.Tensor:
        """Every token's keys and values, (B, L, 2H) (padded back with a ``layout``)."""
        H = x.shape[-1]
        kv = F.linear(x, self.qkv.weight[H:], self.qkv.bias[H:])  # (…, 2H)
        return layout.pad(kv) if layout is not None else kv

    def rows(self, x: torch.Tensor, attn_mask: torch.Tensor | None, layout: Layout | None, shape: tuple[int, int],
             positions: list, kv: torch.Tensor) -> torch.Tensor:
        """The layer's output at some positions only, (n, H) sample-major: their queries attend to
        every key as in :meth:`forward`, and only their rows go through the output projection and
        the feed-forward layers. ``positions``: per sample, columns of the padded ``(B, L)`` layout
        (host lists); ``x`` as :meth:`forward` takes it, ``shape`` = (B, L); ``kv`` from
        :meth:`keys_values`."""
        B, L = shape
        H = x.shape[-1]
        flat = [b * L + int(p) for b, ps in enumerate(positions) for p in ps]
        if not flat:
            return x.new_zeros(0, H)
        R = max(len(ps) for ps in positions)  # query slots per sample
        slots = torch.tensor([b * R + j for b, ps in enumerate(positions) for j in range(len(ps))]).to(x.device, non_blocking=True)
        at = torch.tensor(flat).to(x.device, non_blocking=True)  # (n,) into B·L
        mine = x.reshape(-1, H).index_select(0, layout.packed(at) if layout is not None else at)  # (n, H)
        q = F.linear(mine, self.qkv.weight[:H], self.qkv.bias[:H])  # (n, H)
        nh, hd = self.heads, H // self.heads
        k, v = kv.view(B, L, 2, nh, hd).permute(2, 0, 3, 1, 4)  # 2 × (B, nh, L, hd)
        q = q.new_zeros(B * R, H).index_copy(0, slots, q).view(B, R, nh, hd).transpose(1, 2)  # (B, nh, R, hd)
        a = attention(q, k, v, attn_mask, self.dropout, self.training)  # (B, nh, R, hd)
        a = a.transpose(1, 2).reshape(B * R, H).index_select(0, slots)  # (n, H)
        return self._after_attention(mine, a)


class Trunk(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, ffn: int, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(TrunkLayer(hidden, heads, ffn, dropout) for _ in range(layers))
        #: recompute each layer's activations in backward (saves memory, costs ~1/3 more compute)
        self.activation_checkpointing = False
        #: token rows the dense layers ran on, summed over passes (padding excluded when unpadded)
        self.processed_tokens = 0

    def compile_layers(self) -> None:
        """``torch.compile`` every layer in place (parameter names unchanged, so checkpoints are too).
        Unpadded batches have a different token count every time: after the first new count torch
        compiles once more with dynamic sizes, and reuses that."""
        for layer in self.layers:
            layer.compile()

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, layout: Layout | None = None,
                padded: bool | None = None) -> torch.Tensor:
        """``x`` (B, L, H); ``key_mask`` (B, L) bool, True where a real token/region is. With a
        ``layout`` the layers run on its real tokens only; the result is padded back to (B, L, H)
        with zeros at padding. ``padded``: whether ``key_mask`` has a False entry, if known (else
        read from the device)."""
        x, attn_mask = self.penultimate(x, key_mask, layout, padded)
        x = self.run_layer(self.layers[-1], x, attn_mask, layout)
        return layout.pad(x) if layout is not None else x

    def penultimate(self, x: torch.Tensor, key_mask: torch.Tensor | None = None, layout: Layout | None = None,
                    padded: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Every layer but the last: their output ((B, L, H), or (N, H) with a ``layout``) and the
        attention mask, for the last layer to run on all positions or only some (``TrunkLayer.rows``)."""
        if padded is None:
            padded = key_mask is not None and not bool(key_mask.all())
        attn_mask = key_mask[:, None, None, :] if padded else None  # (B, 1, 1, L): queries see real keys
        B, L, H = x.shape
        if layout is not None:
            x = layout.unpad(x)  # (N, H)
        self.processed_tokens += layout.tokens if layout is not None else B * L
        for layer in self.layers[:-1]:
            x = self.run_layer(layer, x, attn_mask, layout)
        return x, attn_mask

    def run_layer(self, layer: TrunkLayer, x: torch.Tensor, attn_mask, layout, kv=None) -> torch.Tensor:
        if self.activation_checkpointing and self.training:
            return checkpoint(layer, x, attn_mask, layout, kv, use_reentrant=False)
        return layer(x, attn_mask, layout, kv)


class Pooler(nn.Module):
    """[CLS] -> Linear -> tanh (BERT's pooler; ITM classifies its output)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, H)
        return self.of_cls(hidden[:, 0])

    def of_cls(self, cls: torch.Tensor) -> torch.Tensor:  # (B, H) [CLS] states -> (B, H)
        return torch.tanh(self.dense(cls))
