"""Collation: a list of per-sample views -> one padded batch of tensors.

Generic on purpose, so a new objective adds fields without touching the core:

* ``input_ids`` -> ``(B, T)`` padded with the tokenizer's pad id, plus ``text_mask``;
* ``features``/``boxes`` -> ``(B, K, D)``/``(B, K, 4)``, plus ``region_mask`` (and a second
  image's ``features2`` plus ``region_mask2``);
* any other numpy array is padded along its first axis to the batch maximum with
  the value an objective declares in ``pad_values`` (default 0) — a field as
  long as the text pads to ``T``, one per region to ``K``;
* ints, floats and bools become a ``(B,)`` tensor; anything else stays a list.

Half floats stay half with ``keep_half`` (the training streams): a batch of UNITER-size
regions then crosses from worker to trainer and host to device at half the bytes, and
:func:`move_to` widens it on the device. Arrays are written straight into the memory the
batch travels in: shared memory inside a data-loader worker (the loader would otherwise copy
each tensor there to hand it over), page-locked memory with ``pin`` in the training process
(the device copy then runs without blocking the host).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

from ..batch import FEATURES, INPUT_IDS, REGION_MASK, SECOND, TEXT_MASK, WORKER_ONLY
from .samples import EPOCH

#: the mask made for each field of region features
REGION_MASKS = {FEATURES: REGION_MASK, FEATURES + SECOND: REGION_MASK + SECOND}


def _empty(shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """An uninitialized tensor in the memory a batch travels in (see the module's docstring)."""
    if get_worker_info() is not None:  # as torch's default_collate: the loader then hands it over as is
        proto = torch.empty(0, dtype=dtype)
        storage = proto._typed_storage()._new_shared(int(np.prod(shape, dtype=np.int64)), device="cpu")
        return proto.new(storage).resize_(shape)
    return torch.empty(shape, dtype=dtype, pin_memory=pin)


def _pad_stack(arrays: list[np.ndarray], pad_value: Any, dtype: np.dtype | None = None,
               pin: bool = False) -> torch.Tensor:
    """(B, N, ...) tensor of ``arrays`` (each (n_i, ...)), padded with ``pad_value`` to the longest."""
    n = max(a.shape[0] for a in arrays)
    dtype = np.dtype(dtype or arrays[0].dtype)
    out = _empty((len(arrays), n, *arrays[0].shape[1:]), torch.from_numpy(np.empty(0, dtype)).dtype, pin)
    view = out.numpy()
    for i, a in enumerate(arrays):
        view[i, : a.shape[0]] = a
        if a.shape[0] < n:
            view[i, a.shape[0]:] = pad_value
    return out


class Collator:
    def __init__(self, pad_id: int, pad_values: dict[str, Any] | None = None, keep_half: bool = False,
                 pin: bool = False):
        self.pad_id = pad_id
        self.pad_values = dict(pad_values or {})
        self.keep_half = keep_half  # float16 arrays stay float16 (move_to widens them on the device)
        self.pin = pin  # page-locked memory when collating in the training process (for a GPU)

    def __call__(self, views: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        keys = [k for k in views[0] if k not in WORKER_ONLY and k != EPOCH]
        for key in keys:
            values = [v.get(key) for v in views]
            first = values[0]
            if key == INPUT_IDS:
                ids = [np.asarray(v, dtype=np.int64) for v in values]
                batch[INPUT_IDS] = _pad_stack(ids, self.pad_id, pin=self.pin)
                lengths = torch.tensor([len(a) for a in ids])
                batch[TEXT_MASK] = torch.arange(batch[INPUT_IDS].shape[1])[None] < lengths[:, None]
            elif isinstance(first, np.ndarray):
                if any(v is None for v in values):
                    raise ValueError(f"field '{key}' is missing in some samples of a batch")
                arrays = [np.asarray(v) for v in values]
                wide = arrays[0].dtype == np.float64 or (arrays[0].dtype == np.float16 and not self.keep_half)
                batch[key] = _pad_stack(arrays, self.pad_values.get(key, 0), np.float32 if wide else None, self.pin)
                if key in REGION_MASKS:
                    lengths = torch.tensor([len(v) for v in values])
                    batch[REGION_MASKS[key]] = torch.arange(batch[key].shape[1])[None] < lengths[:, None]
            elif isinstance(first, (bool, np.bool_)):
                batch[key] = torch.tensor(values, dtype=torch.bool)
            elif isinstance(first, (int, np.integer)):
                batch[key] = torch.tensor(values, dtype=torch.long)
            elif isinstance(first, (float, np.floating)):
                batch[key] = torch.tensor(values, dtype=torch.float32)
            else:
                batch[key] = values
        return batch


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch on ``device``, half floats widened there (copies from page-locked memory do not
    block the host)."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.dtype == torch.float16:
                v = v.float()
        out[k] = v
    return out
