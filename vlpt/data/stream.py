"""The training stream of a task: shards -> clean samples -> shuffle -> batches -> views -> collation.

Everything happens inside the ``IterableDataset`` so each data-loader worker of each rank reads
its own part of the stream (a *slot*, see :mod:`vlpt.data.readers`):

1. each source's shards are reshuffled every pass with a seed shared by all ranks and split by
   slot — by shard when there are enough shards, else by sample index, so no slot is left empty
   (or, resampling, drawn per slot);
2. sources are interleaved by weight (UNITER mixes COCO/VG/CC/SBU this way);
3. samples are decoded safely, tokenized, filtered (bad ones counted by reason);
4. a shuffle buffer;
5. token-budget (or fixed-size) batching by the samples' own lengths (before an ITM negative swaps
   an image in: UNITER draws its negatives each epoch first and budgets with them, so a vlpt batch
   with negatives can pad a little more than the budget says);
6. each task's objectives ``prepare`` the batch's samples (with a pool of other samples for those
   that draw negatives), and the views are collated. With a fixed batch size the pool is the
   ``pool_size`` most recent samples; with a token budget it is the whole current bucket, in
   shuffle order: the batches cut from a bucket are sorted by length, and a pool of the samples
   just before one would hold its length neighbours (nearly the same caption length and region
   count), where UNITER draws a negative image uniformly from its data set.

One stream can serve several tasks (``heads``): under ``mixing: sum`` every task trains on every
update, and tasks that read the same sources the same way then share one stream, so a sample is
read and decoded once and every task trains on the same samples in an update (as ViLT and ALBEF
compute all their losses on one batch). Its items are then ``{"parts": {task: batch}}``.

The stream is endless (passes repeat), so every rank can run exactly ``train.steps`` updates.

Resume from a position: every batch carries ``data_position``, the state of its slot right after
it — each source reader's position (pass, shard, byte offset), the locations of the samples its
shuffle buffer, token bucket and negatives pool hold, and its generator's state. A stream given
such a state (``start``) continues exactly where that slot was: it seeks in the shard and reads
the held samples again from their locations, so resuming costs the same at step 20 as at step
2,000,000. :func:`vlpt.data.positions.elastic_starts` turns the positions of one layout of
ranks and workers into starts for another.
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

from ..batch import has_field, modalities
from .batching import token_budget_batches
from .collate import Collator
from .readers import Location, Source, SourceReader, pass_plan, read_locations, resampling
from .samples import EPOCH, BadSample, DecodeSettings, decode_sample, keep_modalities, sample_length
from .tar_reader import read_tar_samples

__all__ = ["Source", "TaskHead", "TaskStream", "read_tar_samples"]

log = logging.getLogger("vlpt.data")


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


@dataclass
class TaskHead:
    """The task end of a stream: its objectives' ``prepare`` and its collation."""

    name: str
    prepare: Callable[[dict, np.random.Generator, Any], dict]
    collator: Collator
    pool_size: int = 0  # recent samples kept for objectives that draw negatives (0: none)


def _locations(locations) -> torch.Tensor:
    """(N, 4) int64 tensor of sample locations: it travels from a worker cheaply."""
    return torch.from_numpy(np.array(locations, dtype=np.int64).reshape(-1, 4))


def _listed(locations) -> list[Location]:
    return [tuple(row) for row in torch.as_tensor(locations).reshape(-1, 4).tolist()]


class TaskStream(IterableDataset):
    """Endless batches for one task (or several, see ``heads``), split across ranks and workers."""

    def __init__(
        self,
        sources: list[Source],
        tokenizer,
        decode: DecodeSettings,
        prepare: Callable[[dict, np.random.Generator, list[dict] | None], dict] | None,
        needs: set[str],
        collator: Collator | None,
        *,
        heads: list[TaskHead] | None = None,
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
        self.heads = heads or [TaskHead("", prepare, collator, pool_size)]
        self.needs = set(needs)
        self.sample_fields = tuple(sample_fields)
        self.batch_tokens, self.batch_size = batch_tokens, batch_size
        self.bucket_size, self.size_multiple = bucket_size, size_multiple
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.stream_id = seed, stream_id
        self.rank, self.world_size = rank, world_size
        self.resample = resample
        #: where each worker starts: ``taken`` (batches of this loader already trained on, for the
        #: loader's worker rotation) and ``states`` (original worker id -> its position); set by the trainer
        self.start: dict[str, Any] = {"taken": 0, "states": {}}

    @property
    def prepare(self):
        return self.heads[0].prepare

    @property
    def collator(self):
        return self.heads[0].collator

    # -- who reads what -------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        """(worker id, workers) as the run before a resume numbered them.

        The loader takes batch j from worker j % num_workers, starting again from worker 0
        when a resumed run builds it; after ``taken`` batches the next one is due from the
        worker numbered ``taken % num_workers`` in the original count."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        return (wid + int(self.start.get("taken", 0))) % nw, nw

    def _slot(self) -> tuple[int, int]:
        wid, nw = self._worker()
        return self.rank * nw + wid, self.world_size * nw

    def _resampling(self, source: Source, slots: int) -> bool:
        return resampling(self.resample, self.world_size, len(source.urls), slots)

    def plan(self, index: int, slot: int, slots: int) -> Callable[[int], list[list]]:
        """The segments slot ``slot`` reads of source ``index`` in a fresh pass."""
        source = self.sources[index]
        resample = self._resampling(source, slots)
        return lambda pass_no: pass_plan(self.seed, index, len(source.urls), slot, slots, pass_no, resample)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wid, _ = self._worker()
        if get_worker_info() is not None:
            torch.set_num_threads(1)  # workers do numpy work; leave the cores to the training step
        run = StreamRun(self, *self._slot(), wid, self.start.get("states", {}).get(wid))
        yield from run.batches()


class SampleDecoder:
    """Raw samples -> the clean samples a stream's tasks can use, counting what is skipped and why.

    Its own object (not a method of :class:`StreamRun`), so the readers that call it hold no
    reference back to the run: a run that is dropped frees its buffers at once, not at the next
    garbage collection."""

    def __init__(self, stream: TaskStream):
        self.s = stream
        self.skipped: Counter = Counter()
        self.read = 0  # samples this slot tried to decode (the denominator of the bad fraction)
        self.warn = RateLimitedWarner()

    def count(self, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.warn(reason, detail or reason)

    def clean(self, raw: dict, count: bool) -> dict | None:
        """The clean sample of a raw one this task can use, or None (counted as bad if ``count``)."""
        try:
            sample = decode_sample(raw, self.s.tokenizer, self.s.decode)
        except BadSample as e:
            if count:
                self.count(e.reason, str(e))
            return None
        if not self.s.needs <= modalities(sample):
            return None  # e.g. a caption-only sample offered to an image-text task
        lacking = next((f for f in self.s.sample_fields if not has_field(sample, f)), None)
        if lacking is not None:  # a field the task's objectives read (e.g. a VQA answer)
            if count:
                self.count(f"lacks_{lacking}", sample.get("key", ""))
            return None
        return keep_modalities(sample, self.s.needs)

    def __call__(self, raw: dict) -> dict | None:
        self.read += 1
        return self.clean(raw, count=True)


class StreamRun:
    """One slot's pass through a :class:`TaskStream`: every stage's contents, and its position."""

    def __init__(self, stream: TaskStream, slot: int, slots: int, worker: int, state: dict | None):
        self.s, self.slot, self.slots, self.worker = stream, slot, slots, worker
        self.decoder = SampleDecoder(stream)
        self.rng = np.random.default_rng([stream.seed, stream.stream_id, slot])
        self.buffer: list[tuple[Location, dict]] = []  # the shuffle buffer
        self.bucket: list[tuple[Location, dict]] = []  # samples waiting to be batched
        self.pending: deque[list[tuple[Location, dict]]] = deque()  # batches of a bucket not yet yielded
        # per head: its negatives pool's samples, and their locations (token budget: the bucket's)
        self.bucket_pools = stream.batch_size is None
        sizes = [stream.bucket_size if self.bucket_pools and h.pool_size else h.pool_size for h in stream.heads]
        self.pools = [(deque(maxlen=n), deque(maxlen=n)) for n in sizes]
        try:
            self.readers = self._readers((state or {}).get("readers"))
        except ValueError as e:  # the recipe's data changed since the checkpoint
            log.warning("resuming: %s; this reader starts from the beginning", e)
            state, self.readers = None, self._readers(None)
        if state is not None:
            self._restore(state)

    def _readers(self, states: list[dict] | None) -> list[SourceReader]:
        sources = self.s.sources
        states = states or [None] * len(sources)
        if len(states) != len(sources):
            raise ValueError(f"{len(sources)} data sources, {len(states)} in the saved position")
        d = self.decoder
        return [SourceReader(i, src, self.s.plan(i, self.slot, self.slots), d, d.count, states[i])
                for i, src in enumerate(sources)]

    # -- position ---------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything a stream needs to continue exactly from here (plain data and int tensors)."""
        return {"worker": self.worker, "slot": self.slot, "slots": self.slots,
                "readers": [r.state() for r in self.readers], "rng": self.rng.bit_generator.state,
                "buffer": _locations([loc for loc, _ in self.buffer]),
                "bucket": _locations([loc for loc, _ in self.bucket]),
                "pending": [_locations([loc for loc, _ in g]) for g in self.pending],
                "pools": [_locations(list(locs)) for _, locs in self.pools]}

    def _restore(self, state: dict) -> None:
        """Refill the buffers from their samples' locations (read again, not counted again)."""
        groups = {"buffer": [_listed(state.get("buffer", ()))], "bucket": [_listed(state.get("bucket", ()))],
                  "pending": [_listed(g) for g in state.get("pending", [])],
                  "pools": [_listed(p) for p in state.get("pools", [])]}
        every = [loc for gs in groups.values() for g in gs for loc in g]
        raws = read_locations(self.s.sources, every, lambda *a: None)
        items: dict[Location, tuple[Location, dict]] = {}
        for loc in every:
            sample = self.decoder.clean(raws[loc], count=False) if raws[loc] is not None else None
            if sample is None:
                log.warning("resuming: the sample at %s can no longer be read; it is left out", loc)
                continue
            items[loc] = (loc, {**sample, EPOCH: loc[3]})
        have = lambda g: [items[loc] for loc in g if loc in items]  # noqa: E731
        self.buffer, self.bucket = have(groups["buffer"][0]), have(groups["bucket"][0])
        self.pending = deque(have(g) for g in groups["pending"])
        for (samples, locs), pool in zip(self.pools, groups["pools"]):
            for loc, sample in have(pool):
                samples.append(sample)
                locs.append(loc)
        if state.get("rng") is not None:
            self.rng.bit_generator.state = state["rng"]

    # -- stages -----------------------------------------------------------------------------
    def _mixed(self) -> Iterator[tuple[Location, dict]]:
        streams = [r.samples() for r in self.readers]
        p = np.array([src.weight for src in self.s.sources], dtype=np.float64)
        p = p / p.sum()
        while True:
            i = 0 if len(streams) == 1 else int(self.rng.choice(len(streams), p=p))
            try:
                loc, sample = next(streams[i])
            except RuntimeError as e:
                raise RuntimeError(f"{e} (rank {self.s.rank}, slot {self.slot}/{self.slots}); skipped so far: "
                                   f"{dict(self.decoder.skipped)}") from None
            sample[EPOCH] = loc[3]
            yield loc, sample

    def _shuffled(self, items: Iterator[tuple[Location, dict]]) -> Iterator[tuple[Location, dict]]:
        buf = self.buffer
        for item in items:
            buf.append(item)
            while len(buf) > self.s.shuffle_buffer:
                j = int(self.rng.integers(len(buf)))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()

    def _groups(self, items: Iterator[tuple[Location, dict]]) -> Iterator[list[tuple[Location, dict]]]:
        """Batches of samples: a fixed count, or UNITER's token budget over buckets of samples."""
        s = self.s
        while True:
            while self.pending:
                yield self.pending.popleft()
            full = s.batch_size if s.batch_size is not None else s.bucket_size
            while len(self.bucket) < full:
                self.bucket.append(next(items))
            bucket, self.bucket = self.bucket, []
            if s.batch_size is not None:
                self.pending.append(bucket)
                continue
            for head, (samples, locs) in zip(s.heads, self.pools):  # the negatives pool: this bucket
                if head.pool_size:
                    samples.extend(x for _, x in bucket)
                    locs.extend(loc for loc, _ in bucket)
            groups = token_budget_batches([sample_length(x) for _, x in bucket], s.batch_tokens, s.size_multiple)
            self.pending.extend([bucket[i] for i in groups[j]] for j in self.rng.permutation(len(groups)))

    def _collate(self, index: int, group: list[tuple[Location, dict]]) -> dict[str, Any]:
        head = self.s.heads[index]
        samples, locs = self.pools[index]
        views = []
        for loc, sample in group:
            if head.pool_size and not self.bucket_pools:
                samples.append(sample)
                locs.append(loc)
            views.append(head.prepare(dict(sample), self.rng, samples if head.pool_size else None))
        return head.collator(views)

    def batches(self) -> Iterator[dict[str, Any]]:
        reported, read_reported, d = Counter(), 0, self.decoder
        for group in self._groups(self._shuffled(self._mixed())):
            parts = {h.name: self._collate(i, group) for i, h in enumerate(self.s.heads)}
            out = parts[self.s.heads[0].name] if len(parts) == 1 else {"parts": parts}
            # counts since the previous batch: the trainer sums them over workers and tasks
            out["data_skipped"] = dict(d.skipped - reported)
            out["data_read"] = d.read - read_reported
            out["data_position"] = self.state()
            reported, read_reported = Counter(d.skipped), d.read
            yield out
