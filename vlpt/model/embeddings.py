"""Embedders: words and regions into the trunk's hidden space.

Both follow UNITER. Text is BERT's embedding (word + position + type 0, LayerNorm,
dropout) so a BERT checkpoint loads into it unchanged. Regions have no position
ids; a region's place is its box:

    Dropout(LN(LN(W_f (f + m·masked)) + LN(W_b [x1, y1, x2, y2, w, h, w·h]) + type(1)))

``m`` is a learned vector added only where masked region modeling masked a
region (the data side has already zeroed that region's feature).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import Dropout

LN_EPS = 1e-12


class TextEmbedder(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, max_positions: int, type_vocab: int = 2, dropout: float = 0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.dropout = Dropout(dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, H)
        T = input_ids.shape[1]
        if T > self.position_embeddings.num_embeddings:
            raise ValueError(f"text of {T} tokens is longer than the model's {self.position_embeddings.num_embeddings} positions")
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None] + self.token_type_embeddings.weight[0]
        return self.dropout(self.norm(x))


def box_features(boxes: torch.Tensor) -> torch.Tensor:
    """(…, 4) normalized x1, y1, x2, y2 -> (…, 7) with width, height and area (UNITER's location)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)


class RegionEmbedder(nn.Module):
    #: weight decay on these too, as UNITER (its no-decay rule is by name: 'bias', 'LayerNorm.weight';
    #: its img_layer_norm, pos_layer_norm and mask_embedding are not named so). See vlpt.train.optim.
    decay_also = ("feature_norm.weight", "box_norm.weight", "mask_vector")

    def __init__(self, feature_dim: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, hidden)  # W_f; MRFR may tie its output layer to it
        self.feature_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.box_proj = nn.Linear(7, hidden)  # W_b
        self.box_norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.mask_vector = nn.Parameter(torch.zeros(feature_dim))  # m, added at masked regions only
        self.norm = nn.LayerNorm(hidden, eps=LN_EPS)
        self.dropout = Dropout(dropout)

    def forward(
        self,
        features: torch.Tensor,  # (B, K, D)
        boxes: torch.Tensor,  # (B, K, 4)
        type_embedding: torch.Tensor,  # (H,) the text embedder's type-1 row, shared as in UNITER
        masked: torch.Tensor | None = None,  # (B, K) bool, regions masked by MRM
    ) -> torch.Tensor:  # (B, K, H)
        f = self.feature_proj(features)  # (B, K, H)
        if masked is not None:  # W_f (f + m·masked) = W_f f + (W_f m)·masked: the D-dim sum never materialized,
            # so backward needs no gradient for the (B, K, D) input, only W_f m's
            f = f + masked[..., None].to(f.dtype) * F.linear(self.mask_vector.to(f.dtype), self.feature_proj.weight)
        f = self.feature_norm(f)
        b = self.box_norm(self.box_proj(box_features(boxes.to(f.dtype))))
        return self.dropout(self.norm(f + b + type_embedding))
