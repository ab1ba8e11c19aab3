"""Building blocks shared by objective heads."""
from __future__ import annotations

from torch import nn

from .embeddings import LN_EPS


def prediction_transform(hidden: int) -> nn.Sequential:
    """BERT's head transform (dense, GELU, LayerNorm) that UNITER's MLM, MRFR and MRC heads
    apply before their output layer. Indexed ``0`` (dense), ``1``, ``2`` in checkpoints."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=LN_EPS))
