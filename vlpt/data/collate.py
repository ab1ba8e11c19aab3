"""Collation: a list of per-sample views -> one padded batch of tensors.

Generic on purpose, so a new objective adds fields without touching the core:

* ``input_ids`` -> ``(B, T)`` padded with the tokenizer's pad id, plus ``text_mask``;
* ``features``/``boxes`` -> ``(B, K, D)``/``(B, K, 4)``, plus ``region_mask`` (and a second
  image's ``features2`` plus ``region_mask2``);
* any other numpy array is padded along its first axis to the batch maximum with
  the value an objective declares in ``pad_values`` (default 0) — a field as
  long as the text pads to ``T``, one per region to ``K``;
* ints, floats and bools become a ``(B,)`` tensor; anything else stays a list.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..batch import FEATURES, INPUT_IDS, REGION_MASK, SECOND, TEXT_MASK, WORKER_ONLY

#: the mask made for each field of region features
REGION_MASKS = {FEATURES: REGION_MASK, FEATURES + SECOND: REGION_MASK + SECOND}


def _pad_stack(arrays: list[np.ndarray], pad_value: Any) -> np.ndarray:
    n = max(a.shape[0] for a in arrays)
    tail = arrays[0].shape[1:]
    out = np.full((len(arrays), n, *tail), pad_value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0]] = a
    return out


class Collator:
    def __init__(self, pad_id: int, pad_values: dict[str, Any] | None = None):
        self.pad_id = pad_id
        self.pad_values = dict(pad_values or {})

    def __call__(self, views: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        keys = [k for k in views[0] if k not in WORKER_ONLY]
        for key in keys:
            values = [v.get(key) for v in views]
            first = values[0]
            if key == INPUT_IDS:
                ids = [np.asarray(v, dtype=np.int64) for v in values]
                batch[INPUT_IDS] = torch.from_numpy(_pad_stack(ids, self.pad_id))
                lengths = torch.tensor([len(a) for a in ids])
                batch[TEXT_MASK] = torch.arange(batch[INPUT_IDS].shape[1])[None] < lengths[:, None]
            elif isinstance(first, np.ndarray):
                if any(v is None for v in values):
                    raise ValueError(f"field '{key}' is missing in some samples of a batch")
                pad = self.pad_values.get(key, 0)
                arr = _pad_stack([np.asarray(v) for v in values], pad)
                if arr.dtype == np.float16 or arr.dtype == np.float64:
                    arr = arr.astype(np.float32)
                batch[key] = torch.from_numpy(arr)
                if key in REGION_MASKS:
                    lengths = torch.tensor([len(v) for v in values])
                    batch[REGION_MASKS[key]] = torch.arange(arr.shape[1])[None] < lengths[:, None]
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
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
