"""Batching: UNITER's token-budget bucketing, or a fixed batch size.

Token budget (UNITER's ``TokenBucketSampler``): samples of very different
lengths waste compute when padded together. Fill a bucket of ``bucket_size``
samples, sort it by length, cut it into batches whose padded size
(longest × count) stays within ``max_tokens`` with counts in multiples of
``size_multiple``, then shuffle the batches. Batch size varies; padding stays
small. The stream (:mod:`vlpt.data.stream`) keeps the bucket and its cut batches
itself, so that its position can be saved between any two batches.
"""
from __future__ import annotations


def token_budget_batches(
    lengths: list[int], max_tokens: int, size_multiple: int = 8
) -> list[list[int]]:
    """Indices (into ``lengths``) grouped into batches; ``lengths`` need not be sorted."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > max_tokens and len(current) >= size_multiple:
            # cut at a multiple of size_multiple; the rest starts the next batch
            cut = len(current) - len(current) % size_multiple
            batches.append(current[:cut])
            current = current[cut:]
            longest = max((lengths[j] for j in current), default=0)
            new_longest = max(longest, lengths[i])
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    return batches
