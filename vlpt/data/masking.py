"""Masking samplers shared by objectives and evaluation (UNITER's conditional masking).

Pure numpy, run in data-loader workers. Each returns new arrays; inputs are not
modified.
"""
from __future__ import annotations

import numpy as np

IGNORE = -100  # label value that cross-entropy ignores


def mask_tokens(
    input_ids: np.ndarray,
    rng: np.random.Generator,
    mask_id: int,
    vocab_size: int,
    special_ids: frozenset[int] | set[int],
    prob: float = 0.15,
    mask_frac: float = 0.8,
    random_frac: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT masking: select each non-special token with ``prob`` (at least one);
    selected -> [MASK] 80%, random token 10%, unchanged 10%.

    Returns ``(masked_ids, labels)`` with labels ``IGNORE`` where not selected.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    candidates = np.array([i not in special_ids for i in ids.tolist()])
    selected = (rng.random(len(ids)) < prob) & candidates
    if not selected.any() and candidates.any():
        selected[rng.choice(np.flatnonzero(candidates))] = True
    labels = np.where(selected, ids, IGNORE)
    out = ids.copy()
    r = rng.random(len(ids))
    to_mask = selected & (r < mask_frac)
    to_random = selected & (r >= mask_frac) & (r < mask_frac + random_frac)
    out[to_mask] = mask_id
    if to_random.any():
        # random replacements avoid special tokens, as a real word would
        specials = np.array(sorted(special_ids))
        draws = rng.integers(0, vocab_size - len(specials), size=int(to_random.sum()))
        for s in specials:  # shift draws past each special id so none is drawn
            draws = draws + (draws >= s)
        out[to_random] = draws
    return out, labels


def mask_regions(num_regions: int, rng: np.random.Generator, prob: float = 0.15) -> np.ndarray:
    """Select each region with ``prob`` (at least one when there are any); (K,) bool."""
    sel = rng.random(num_regions) < prob
    if num_regions and not sel.any():
        sel[rng.integers(num_regions)] = True
    return sel


def mask_sample_regions(sample: dict, rng, prob: float) -> dict:
    """Zero the features of randomly selected regions; keep the originals for targets.

    Shared by every masked-region objective: a sample already masked by another
    objective of the same task (joint masking) keeps its first mask.
    """
    if "region_masked" not in sample:
        sel = mask_regions(len(sample["features"]), rng, prob)
        sample["region_targets"] = sample["features"]
        features = sample["features"].copy()
        features[sel] = 0.0
        sample["features"] = features
        sample["region_masked"] = sel
    return sample
