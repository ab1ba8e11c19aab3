"""Padding out of the trunk's work, and rows picked without asking the device.

A batch is laid out as a padded text block then a padded region block, ``(B, L = T + K)``. The
trunk's projections, feed-forward layers and LayerNorms are per token, so they run on the ``N``
real positions only (``(N, H)``, a :class:`Layout`); attention, the one step that mixes tokens, is
per sequence: each layer puts its ``(N, 3H)`` queries, keys and values back into the padded
``(B, L, 3H)`` layout for ``scaled_dot_product_attention`` (padding masked as keys, as before) and
takes the real rows out again. Only the real tokens' work is done in every dense layer; the
result is the padded batch's up to float rounding (padded rows come back as zeros).

Shapes that depend on the data (``N``, the number of masked words) must be known on the host, or
the host waits for the device to count them (a sync, on a GPU). So:

* the trainer reads a batch's real-token count on the CPU before the copy to the device and notes
  it for the batch's masks (:func:`real_count_known`); the model uses the note, and counts on the
  device only for batches nobody noted (other passes, tests; free on a CPU);
* objectives list the positions they pick per sample in ``prepare`` (Python lists, which the
  collator leaves as lists on the host): :func:`positions_index` turns them into flat row indices
  on the host, and :func:`rows_at` picks those rows of the trunk's output.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import Tensor

#: (text mask, region mask, real count) noted for the batch being trained on
_NOTE: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("vlpt_real_count", default=None)


@contextlib.contextmanager
def real_count_known(batch: dict, count: int) -> Iterator[None]:
    """Within the block, a model pass over ``batch``'s own ``text_mask`` and ``region_mask`` (the
    very tensors, so a derived batch never matches) knows it holds ``count`` real positions."""
    masks = tuple(batch.get(k) for k in ("text_mask", "region_mask"))
    token = _NOTE.set((*masks, int(count)))
    try:
        yield
    finally:
        _NOTE.reset(token)


def noted_count(text_mask: Tensor | None, region_mask: Tensor | None) -> int | None:
    note = _NOTE.get()
    if note is None or note[0] is not text_mask or note[1] is not region_mask:
        return None
    return note[2]


@dataclass
class Layout:
    """The real positions of a ``(B, L)`` key mask: ``index`` (N,) into the flattened ``B * L``."""

    index: Tensor  # (N,) long, row-major order
    batch: int  # B
    length: int  # L

    @classmethod
    def of(cls, key_mask: Tensor, count: int | None = None) -> "Layout | None":
        """The layout of ``key_mask`` (B, L) bool, or None when nothing is padded. ``count`` (its
        number of True entries, known on the host) spares the device a count (a sync on a GPU)."""
        B, L = key_mask.shape
        if count is None:
            count = int(key_mask.sum())  # reads the device
        if count == B * L:
            return None
        index = torch.nonzero_static(key_mask.reshape(-1), size=count).squeeze(1)  # (N,)
        return cls(index, B, L)

    @property
    def tokens(self) -> int:
        return int(self.index.shape[0])

    def unpad(self, x: Tensor) -> Tensor:  # (B, L, C) -> (N, C)
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def packed(self, flat: Tensor) -> Tensor:
        """Positions ``flat`` (n,) of the padded ``B * L`` as rows (n,) of the unpadded (N, …)."""
        inverse = torch.empty(self.batch * self.length, dtype=torch.long, device=self.index.device)
        inverse.index_copy_(0, self.index, torch.arange(self.tokens, device=self.index.device))
        return inverse.index_select(0, flat)

    def pad(self, x: Tensor) -> Tensor:  # (N, C) -> (B, L, C), zeros at padding
        out = x.new_zeros(self.batch * self.length, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.batch, self.length, -1)


def positions_index(positions: Sequence[Sequence[int]] | None, mask: Tensor) -> Tensor:
    """(n,) flat indices into ``mask.reshape(-1)`` of a ``(B, L)`` selection, sample-major.

    From per-sample position lists (``prepare`` wrote them; built on the host, copied without
    waiting) when given, else from the boolean ``mask`` itself (a device sync on a GPU)."""
    B, L = mask.shape
    if positions is None:
        return mask.reshape(-1).nonzero().squeeze(1)
    flat = [b * L + int(p) for b, ps in enumerate(positions) for p in ps]
    return torch.tensor(flat, dtype=torch.long).to(mask.device, non_blocking=True)


def rows_at(hidden: Tensor, index: Tensor, block: int, offset: int = 0) -> Tensor:
    """Rows of ``hidden`` (B, S, H) at flat positions ``index`` of a ``(B, block)`` block that
    starts at column ``offset`` (text: 0; regions: T). Returns (n, H)."""
    B, S, H = hidden.shape
    rows = (index // block) * S + offset + index % block
    return hidden.reshape(B * S, H).index_select(0, rows)


#: per-sample positions of the masked regions, listed by :func:`list_masked_regions`
REGION_MASKED_AT = "region_masked_at"


def list_masked_regions(sample: dict) -> dict:
    """After region masking (``vlpt.data.masking.mask_sample_regions``): the masked regions'
    positions as a list, which stays on the host (see :func:`masked_region_rows`)."""
    sample[REGION_MASKED_AT] = [int(i) for i in sample["region_masked"].nonzero()[0]]
    return sample


def select_rows(out, positions: Sequence[Sequence[int]] | None, mask: Tensor, offset: int = 0) -> tuple[Tensor, Tensor]:
    """The trunk's final states at a ``(B, block)`` selection starting at column ``offset`` (text: 0,
    regions: T), (n, H) sample-major, and its flat index (n,) into the block. With per-sample
    ``positions`` (host lists), the trunk's last layer runs on those rows only (``out.rows``)."""
    at = positions_index(positions, mask)
    if positions is not None and hasattr(out, "rows"):
        return out.rows(positions, offset), at
    return rows_at(out.hidden, at, mask.shape[1], offset), at


def masked_region_rows(out, batch: dict) -> tuple[Tensor, Tensor]:
    """The trunk's states at the masked regions (n, H), and their flat index (n,) into the
    ``(B, K)`` region fields (targets, soft labels), sample-major."""
    return select_rows(out, batch.get(REGION_MASKED_AT), batch["region_masked"], out.text_len)
