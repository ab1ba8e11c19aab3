"""The training stream of one task: shards -> clean samples -> task views -> batches.

Everything happens inside the ``IterableDataset`` so each data-loader worker of
each rank reads its own part of the stream:

1. shards of each source are reshuffled every epoch with a seed shared by all
   ranks, then split by (rank, worker) slot — by shard when there are enough
   shards, else by sample index, so no slot is ever left empty;
2. sources are interleaved by weight (UNITER mixes COCO/VG/CC/SBU this way);
3. samples are decoded safely, tokenized, filtered (bad ones counted by reason);
4. a shuffle buffer, then the task's objectives ``prepare`` each sample;
5. token-budget (or fixed-size) batching, then collation.

The stream is endless (epochs repeat), so every rank can run exactly
``train.steps`` updates, whatever the shard sizes.

Exact resume: every stage is deterministic given (seed, task, slot), so the
data cursor is just the number of batches the trainer has taken from the
task's loader. A resumed stream replays its slot's share of them (decoding,
preparing and batching, but not collating) and yields from the next one on:
no sample is seen twice or skipped compared with an uninterrupted run.
Replay costs about the decode time of the samples already trained on.
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .batching import bucket_batches
from .collate import Collator
from ..batch import has_field, modalities
from .samples import BadSample, DecodeSettings, decode_sample, keep_modalities, sample_length

log = logging.getLogger("vlpt.data")


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


def read_tar_samples(url: str, on_error: Callable[[str], None]) -> Iterator[dict]:
    """Raw samples (bytes per extension) of one shard; a broken shard ends early and is counted."""
    import webdataset as wds

    def handler(exn):
        on_error("bad_tar")
        return True  # skip and continue

    stream = wds.tarfile_to_samples(handler=handler)(iter([{"url": url}]))
    yield from stream


class RateLimitedWarner:
    """At most one warning per reason per ``interval`` seconds."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self.last: dict[str, float] = {}

    def __call__(self, reason: str, detail: str) -> None:
        now = time.monotonic()
        if now - self.last.get(reason, -1e9) >= self.interval:
            self.last[reason] = now
            log.warning("skipping bad sample (%s): %s", reason, detail)


class TaskStream(IterableDataset):
    """Endless batches for one task, split across ranks and workers inside the stream."""

    def __init__(
        self,
        sources: list[Source],
        tokenizer,
        decode: DecodeSettings,
        prepare: Callable[[dict, np.random.Generator, list[dict] | None], dict],
        needs: set[str],
        collator: Collator,
        *,
        sample_fields: tuple[str, ...] = (),
        batch_tokens: int | None,
        batch_size: int | None,
        bucket_size: int = 8192,
        size_multiple: int = 8,
        shuffle_buffer: int = 1000,
        pool_size: int = 0,
        seed: int = 0,
        stream_id: int = 0,
        rank: int = 0,
        world_size: int = 1,
        resample: bool | str = "auto",
    ):
        super().__init__()
        self.sources = sources
        self.tokenizer = tokenizer
        self.decode = decode
        self.prepare = prepare
        self.needs = set(needs)
        self.sample_fields = tuple(sample_fields)
        self.collator = collator
        self.batch_tokens, self.batch_size = batch_tokens, batch_size
        self.bucket_size, self.size_multiple = bucket_size, size_multiple
        self.shuffle_buffer, self.pool_size = shuffle_buffer, pool_size
        self.seed, self.stream_id = seed, stream_id
        self.rank, self.world_size = rank, world_size
        self.resample = resample
        self.skipped: Counter = Counter()
        self.read = 0  # samples this slot tried to decode (the denominator of the bad fraction)
        self.warn = RateLimitedWarner()
        #: batches of this task already trained on (all workers of this rank together): replayed, not yielded
        self.resume_batches = 0

    # -- stages ----------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        """(worker id, workers) as the uninterrupted run numbered them.

        The loader takes batch j from worker j % num_workers, starting again from worker 0
        when a resumed run builds it; after ``resume_batches`` batches the next one is due
        from the worker numbered ``resume_batches % num_workers`` in the original count."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return (wid + self.resume_batches) % nw, nw

    def _slot(self) -> tuple[int, int]:
        wid, nw = self._worker()
        return self.rank * nw + wid, self.world_size * nw

    def _resampling(self, source: Source, slots: int) -> bool:
        if self.resample == "auto":  # several ranks and enough shards that each slot reads its own
            return self.world_size > 1 and len(source.urls) >= slots
        return bool(self.resample)

    def _shard_orders(self, index: int, source: Source, slot: int, slots: int) -> Iterator[tuple[list[str], bool]]:
        """Per pass: the shards this slot reads, and whether it keeps every sample of them.

        Epochs: all slots share one permutation per epoch and split it by shard (or, with
        fewer shards than slots, by sample index). Resampling: each slot draws shards with
        replacement from its own generator, so no slot ever waits for an epoch to end."""
        if self._resampling(source, slots):
            rs = np.random.default_rng([self.seed, index, slot, 0x5A3])
            while True:
                yield [source.urls[i] for i in rs.integers(len(source.urls), size=len(source.urls))], True
        epoch = 0
        while True:
            order = np.random.default_rng([self.seed, index, epoch]).permutation(len(source.urls))
            urls = [source.urls[i] for i in order]
            by_shard = len(urls) >= slots
            yield (urls[slot::slots] if by_shard else urls), by_shard
            epoch += 1

    def _source_samples(self, index: int, source: Source, slot: int, slots: int) -> Iterator[dict]:
        for mine, by_shard in self._shard_orders(index, source, slot, slots):
            seen = 0
            n = 0
            for url in mine:
                for raw in read_tar_samples(url, self._count):
                    n += 1
                    if not by_shard and (n - 1) % slots != slot:
                        continue
                    self.read += 1
                    try:
                        sample = decode_sample(raw, self.tokenizer, self.decode)
                    except BadSample as e:
                        self._count(e.reason, str(e))
                        continue
                    if not self.needs <= modalities(sample):
                        continue  # e.g. a caption-only sample offered to an image-text task
                    lacking = next((f for f in self.sample_fields if not has_field(sample, f)), None)
                    if lacking is not None:  # a field the task's objectives read (e.g. a VQA answer)
                        self._count(f"lacks_{lacking}", sample.get("key", ""))
                        continue
                    seen += 1
                    yield keep_modalities(sample, self.needs)
            if seen == 0:
                raise RuntimeError(
                    f"data source {index} gave no usable sample to rank {self.rank} (slot {slot}/{slots}) "
                    f"in a whole pass over {len(source.urls)} shard(s); skipped so far: {dict(self.skipped)}"
                )

    def _count(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.warn(reason, detail or reason)

    def _mixed(self, rng: np.random.Generator, slot: int, slots: int) -> Iterator[dict]:
        streams = [self._source_samples(i, s, slot, slots) for i, s in enumerate(self.sources)]
        if len(streams) == 1:
            yield from streams[0]
            return
        p = np.array([s.weight for s in self.sources], dtype=np.float64)
        p = p / p.sum()
        while True:
            yield next(streams[rng.choice(len(streams), p=p)])

    def _shuffled(self, samples: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        buf: list[dict] = []
        for s in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.integers(len(buf))
            buf[j], s = s, buf[j]
            yield s

    def _views(self, samples: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        pool: deque[dict] | None = deque(maxlen=self.pool_size) if self.pool_size else None
        for s in samples:
            if pool is not None:
                pool.append(s)
                if len(pool) < min(8, self.pool_size):
                    continue  # let a few samples in before drawing negatives from the pool
            yield self.prepare(dict(s), rng, pool)

    def _replayed(self) -> int:
        """How many of the ``resume_batches`` already trained on this worker made."""
        wid, nw = self._worker()
        return max(0, (self.resume_batches - wid + nw - 1) // nw)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = self._slot()
        replay = self._replayed()
        rng = np.random.default_rng([self.seed, self.stream_id, slot])
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # workers do numpy work; leave the cores to the training step
        views = self._views(self._shuffled(self._mixed(rng, slot, slots), rng), rng)
        reported: Counter = Counter()
        read_reported = 0
        for group in bucket_batches(
            views, sample_length, rng, self.batch_tokens, self.batch_size, self.bucket_size, self.size_multiple
        ):
            if replay:  # trained on before a resume: the trainer restored its counts of these
                replay -= 1
                if not replay:
                    reported, read_reported = Counter(self.skipped), self.read
                continue
            batch = self.collator(group)
            # counts since the previous batch: the trainer sums them over workers and tasks
            batch["data_skipped"] = dict(self.skipped - reported)
            batch["data_read"] = self.read - read_reported
            reported, read_reported = Counter(self.skipped), self.read
            yield batch
