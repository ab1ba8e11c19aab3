"""Dropout, and attention with dropout, with fewer passes over memory on CPU.

PyTorch's CPU dropout draws a Bernoulli mask (its slowest part, ~6 ns an element on one core),
divides it by the keep probability and multiplies: three passes, and the float mask is kept for
backward. Here each element gets 32 random bits from numpy's SFC64 generator (~0.4 ns an element;
``torch.rand`` takes ~3 with its Mersenne twister), kept when they are at least ``p`` × 2³² and
then worth ``1 / (1 - p)``: the same distribution (each element dropped with probability ``p``, to
within 2⁻³²; ``torch.rand``'s 24-bit floats give 2⁻²⁴), other random numbers. The SFC64 stream of
each mask is seeded by one draw from torch's default generator, so torch's seed and RNG state
alone still decide every mask (seeding, checkpoints and resume work as before). The masks of an
ITM+WRA step (hidden 256, batch 32, 2 threads) take 14.6 ms instead of 20.8 (~2% of the step). On CUDA (a fused kernel) and under
``torch.compile`` (which fuses dropout itself) PyTorch's own is used.

In training with attention dropout, PyTorch's CPU ``scaled_dot_product_attention`` takes its
math path, which also guards every row against being fully masked (three more passes over the
scores); :func:`attention` computes the same thing directly there (no row is ever fully masked:
every sequence has its ``[CLS]``), and uses the fused kernels everywhere else.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def keep_scale(like: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's multiplier for every element of ``like`` (its shape and dtype): 0 with probability
    ``p``, else ``1 / (1 - p)`` (see the module docstring for where the random bits come from)."""
    n = like.numel()
    seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) % 2**64  # torch's generator decides
    bits = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]  # (n,) uniform 32-bit
    keep = np.greater_equal(bits, np.uint32(min(round(p * 2**32), 2**32 - 1)))  # (n,) bool
    scale = np.multiply(keep, np.float32(1.0 / (1.0 - p)), dtype=np.float32)  # (n,) 0 or 1/(1-p)
    return torch.from_numpy(scale).view(like.shape).to(like.dtype)


class _CpuDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        noise = keep_scale(x, p)  # 0 or 1/(1-p)
        ctx.save_for_backward(noise)
        return x * noise

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (noise,) = ctx.saved_tensors
        return grad * noise, None


class _CpuAddDropout(torch.autograd.Function):
    """``x + dropout(y)`` in one pass (``addcmul``), for the residual connections."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, p: float) -> torch.Tensor:
        noise = keep_scale(y, p)
        ctx.save_for_backward(noise)
        return torch.addcmul(x, y, noise)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (noise,) = ctx.saved_tensors
        return grad, grad * noise, None


def _native(x: torch.Tensor) -> bool:
    return x.device.type != "cpu" or torch.compiler.is_compiling()


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if _native(x) or p >= 1.0:
        return F.dropout(x, p, True)
    return _CpuDropout.apply(x, p)


def add_dropout(x: torch.Tensor, y: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``x + dropout(y)``: a residual connection around a dropped-out sublayer output."""
    if not training or p == 0.0 or _native(y) or p >= 1.0 or x.dtype != y.dtype:
        return x + dropout(y, p, training)
    return _CpuAddDropout.apply(x, y, p)


class Dropout(nn.Module):
    """``nn.Dropout`` with :func:`dropout` (no parameters, nothing in checkpoints)."""

    def __init__(self, p: float = 0.1):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, p: float,
              training: bool) -> torch.Tensor:
    """Softmax attention ``(B, nh, L, hd)`` -> ``(B, nh, L, hd)``; ``key_mask`` (B, 1, 1, L) bool,
    True at real keys (None: all real); dropout ``p`` on the attention weights in training."""
    if not training or p == 0.0 or _native(q):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=p if training else 0.0)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(1.0 / math.sqrt(q.shape[-1]))  # (B, nh, L, L)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return torch.matmul(dropout(scores.softmax(-1), p, True), v)
