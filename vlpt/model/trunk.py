"""The shared transformer trunk: a BERT-compatible post-LN encoder.

Same math as ``transformers.BertModel`` (post-LN, exact GELU, LayerNorm eps
1e-12), so BERT checkpoints load and export losslessly (see ``bert_io``), but
with a fused QKV projection and ``scaled_dot_product_attention``, which picks
flash / memory-efficient kernels where the device has them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .embeddings import LN_EPS


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
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, H = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)  # 3 × (B, nh, L, hd)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, L, hd)
        a = a.transpose(1, 2).reshape(B, L, H)
        x = self.attn_norm(x + self.drop(self.attn_out(a)))  # post-LN, as BERT
        return self.ffn_norm(x + self.drop(self.ffn_out(F.gelu(self.ffn_in(x)))))


class Trunk(nn.Module):
    def __init__(self, hidden: int, layers: int, heads: int, ffn: int, dropout: float = 0.1):
        super().__init__()
        self.layers = nn.ModuleList(TrunkLayer(hidden, heads, ffn, dropout) for _ in range(layers))
        #: recompute each layer's activations in backward (saves memory, costs ~1/3 more compute)
        self.activation_checkpointing = False

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, L, H); ``key_mask`` (B, L) bool, True where a real token/region is."""
        attn_mask = None
        if key_mask is not None and not bool(key_mask.all()):
            attn_mask = key_mask[:, None, None, :]  # (B, 1, 1, L): every query sees every real key
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, attn_mask, use_reentrant=False)
            else:
                x = layer(x, attn_mask)
        return x


class Pooler(nn.Module):
    """[CLS] -> Linear -> tanh (BERT's pooler; ITM classifies its output)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, H)
        return torch.tanh(self.dense(hidden[:, 0]))
