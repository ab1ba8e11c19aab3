"""Batching: UNITER's token-budget bucketing, or a fixed batch size.

Token budget (UNITER's ``TokenBucketSampler``): samples of very different
lengths waste compute when padded together. Fill a bucket of ``bucket_size``
samples, sort it by length, cut it into batches whose padded size
(longest × count) stays within ``max_tokens`` with counts in multiples of
``size_multiple``, then shuffle the batches. Batch size varies; padding stays
small.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

import numpy as np


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


def bucket_batches(
    items: Iterable[dict],
    length: Callable[[dict], int],
    rng: np.random.Generator,
    max_tokens: int | None,
    batch_size: int | None,
    bucket_size: int,
    size_multiple: int = 8,
) -> Iterator[list[dict]]:
    """Group a stream of items into batches (token budget or fixed size)."""
    if batch_size is not None:
        batch: list[dict] = []
        for item in items:
            batch.append(item)
            if len(batch) == batch_size:
                yield batch
                batch = []
        return  # a partial last batch of an infinite stream never happens; of a finite one, dropped
    bucket: list[dict] = []
    for item in items:
        bucket.append(item)
        if len(bucket) >= bucket_size:
            yield from _emit(bucket, length, rng, max_tokens, size_multiple)
            bucket = []
    if bucket:
        yield from _emit(bucket, length, rng, max_tokens, size_multiple)


def _emit(bucket, length, rng, max_tokens, size_multiple):
    groups = token_budget_batches([length(x) for x in bucket], max_tokens, size_multiple)
    for j in rng.permutation(len(groups)):
        yield [bucket[i] for i in groups[j]]
