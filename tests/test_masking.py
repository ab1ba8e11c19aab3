"""MLM masking statistics: 15% selected, 80/10/10, at least one, specials never masked."""
import numpy as np

from vlpt.data.masking import IGNORE, mask_regions, mask_tokens

SPECIALS = frozenset({0, 1, 2, 3, 4})  # pad unk cls sep mask
MASK, VOCAB = 4, 1000


def _caption(rng, n):
    return np.concatenate([[2], rng.integers(5, VOCAB, n), [3]])


def test_mask_statistics():
    rng = np.random.default_rng(0)
    selected = masked = randomized = kept = total = 0
    for _ in range(4000):
        ids = _caption(rng, int(rng.integers(8, 20)))
        out, labels = mask_tokens(ids, rng, MASK, VOCAB, SPECIALS)
        sel = labels != IGNORE
        assert not sel[0] and not sel[-1], "[CLS]/[SEP] must never be selected"
        assert (labels[sel] == ids[sel]).all()
        assert (out[~sel] == ids[~sel]).all(), "unselected tokens are untouched"
        selected += sel.sum()
        total += len(ids) - 2
        masked += (out[sel] == MASK).sum()
        kept += (out[sel] == ids[sel]).sum()
        randomized += ((out[sel] != MASK) & (out[sel] != ids[sel])).sum()
        assert not np.isin(out[sel & (out != MASK)], list(SPECIALS)).any(), "random replacements are never specials"
    assert abs(selected / total - 0.15) < 0.01 + 0.01  # "at least one" lifts the rate a little on short captions
    assert abs(masked / selected - 0.8) < 0.02
    # a random draw can hit the original token (1/995), so "kept" is ~10% + a hair
    assert abs(randomized / selected - 0.1) < 0.015
    assert abs(kept / selected - 0.1) < 0.015


def test_at_least_one_token_selected():
    rng = np.random.default_rng(1)
    for _ in range(500):
        ids = _caption(rng, 1)  # a single word: 15% alone would often select nothing
        _, labels = mask_tokens(ids, rng, MASK, VOCAB, SPECIALS)
        assert (labels != IGNORE).sum() == 1 and labels[1] == ids[1]


def test_only_specials_selects_nothing():
    rng = np.random.default_rng(2)
    out, labels = mask_tokens(np.array([2, 3]), rng, MASK, VOCAB, SPECIALS)
    assert (labels == IGNORE).all() and (out == [2, 3]).all()


def test_region_masking_rate_and_at_least_one():
    rng = np.random.default_rng(3)
    sel = [mask_regions(36, rng) for _ in range(2000)]
    assert abs(np.mean([s.mean() for s in sel]) - 0.15) < 0.01
    assert all(mask_regions(2, rng).any() for _ in range(200))
