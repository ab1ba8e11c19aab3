"""Building blocks shared by objective heads."""
from __future__ import annotations

from torch import nn

from .embeddings import LN_EPS


def prediction_transform(hidden: int) -> nn.Sequential:
    """BERT's head transform (dense, GELU, LayerNorm) that UNITER's MLM, MRFR and MRC heads
    apply before their output layer. Indexed ``0`` (dense), ``1``, ``2`` in checkpoints."""
    return nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=LN_EPS))


def init_linear(*layers: nn.Linear, std: float = 0.02) -> None:
    """BERT's (and UNITER's) initialization of head layers: N(0, std) weights, zero biases."""
    for layer in layers:
        nn.init.normal_(layer.weight, std=std)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)


def mlp_head(hidden: int, outputs: int, width: int | None = None) -> nn.Sequential:
    """UNITER's finetuning head: dense to ``width`` (default ``2 * hidden``, as its VQA and VE heads;
    ``hidden`` for its RefCOCO head), GELU, LayerNorm, then the output layer. Initialized as BERT's
    weights are, N(0, 0.02) with zero biases."""
    width = width or 2 * hidden
    head = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.LayerNorm(width, eps=LN_EPS), nn.Linear(width, outputs))
    init_linear(head[0], head[3])
    return head
