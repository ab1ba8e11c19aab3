"""Where a reader is in its shards: passes, segments, sample locations — and a reader that keeps them.

A *slot* is one (rank, data-loader worker) reader; ``slots`` of them split each pass over a
source's shards. A pass's work for a slot is a list of *segments*; a segment is a run of shards
(indices into the source's URL list) read in order from byte ``offset`` of the first, keeping
the samples whose running ``count`` in the segment satisfies ``count % stride == phase``:

* epochs, at least as many shards as slots: one segment per pass, the slot's shards of the
  pass's permutation (``order[slot::slots]``), every sample kept (stride 1);
* epochs, fewer shards than slots: every slot reads every shard of the pass, keeping one sample
  in ``slots`` (stride ``slots``, phase ``slot``), so no slot is left empty;
* resampling: shards drawn with replacement per slot and pass, every sample kept.

A :class:`SourceReader`'s position is then small plain data (its pass, the segments left, and
passes queued after a change of layout): saved with every batch, it lets a resumed reader open the
shard it was in and seek to the next sample, whatever the run's length. A sample is located by
``(source, shard, offset, pass)``: enough to read it again, which is how a resumed stream refills
its buffers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .shards import is_local
from .tar_reader import shard_samples

Location = tuple[int, int, int, int]  # (source index, shard index, byte offset, pass)


@dataclass
class Source:
    urls: list[str]
    weight: float = 1.0


def resampling(mode: bool | str, world_size: int, shards: int, slots: int) -> bool:
    """Whether a source is read by resampling: ``auto`` chooses it with several ranks and enough
    shards that each slot reads its own."""
    if mode == "auto":
        return world_size > 1 and shards >= slots
    return bool(mode)


def segment(shards: list[int], offset: int = 0, count: int = 0, stride: int = 1, phase: int = 0) -> list:
    """A segment as plain data: ``[shards, offset, count, stride, phase]``."""
    return [list(shards), int(offset), int(count), int(stride), int(phase)]


def pass_plan(seed: int, index: int, n_shards: int, slot: int, slots: int, pass_no: int,
              resample: bool) -> list[list]:
    """The segments of slot ``slot`` of ``slots`` in pass ``pass_no`` over a source of ``n_shards``."""
    if resample:
        rs = np.random.default_rng([seed, index, slot, 0x5A3, pass_no])
        return [segment(rs.integers(n_shards, size=n_shards).tolist())]
    order = np.random.default_rng([seed, index, pass_no]).permutation(n_shards).tolist()
    if n_shards >= slots:
        return [segment(order[slot::slots])]
    return [segment(order, stride=slots, phase=slot)]


class SourceReader:
    """One source's samples as one slot reads them, pass after pass, with its position.

    ``decode(raw)`` turns a raw sample into a clean one, or None for one that is skipped (it
    counts why itself). The position (:meth:`state`) always describes the samples not yet
    yielded: a reader made from it yields exactly what this one would yield next.
    """

    def __init__(self, index: int, source: Source, plan: Callable[[int], list[list]],
                 decode: Callable[[dict], dict | None], on_error: Callable[..., None], state: dict | None = None):
        self.index, self.source, self.plan, self.decode, self.on_error = index, source, plan, decode, on_error
        if state is not None and state.get("shards", len(source.urls)) != len(source.urls):
            raise ValueError(f"data source {index} has {len(source.urls)} shards, its saved position "
                             f"{state['shards']}")
        state = state or {"pass": 0, "segments": plan(0), "usable": 0, "full": True, "queued": []}
        self.pass_no = int(state["pass"])
        self.segments = [segment(*s) for s in state["segments"]]
        self.usable, self.full = int(state["usable"]), bool(state["full"])
        self.queued = [(int(p), [segment(*s) for s in segs]) for p, segs in state.get("queued", [])]

    def state(self) -> dict:
        return {"pass": self.pass_no, "segments": [segment(*s) for s in self.segments], "usable": self.usable,
                "full": self.full, "queued": [[p, [segment(*s) for s in segs]] for p, segs in self.queued],
                "shards": len(self.source.urls)}

    def _next_pass(self) -> None:
        if self.full and self.usable == 0:
            raise RuntimeError(f"data source {self.index} gave no usable sample in a whole pass over "
                               f"{len(self.source.urls)} shard(s)")
        if self.queued:  # the rest of earlier passes, handed over by a change of layout
            self.pass_no, self.segments = self.queued.pop(0)
            self.full = False
        else:
            self.pass_no += 1
            self.segments, self.full = self.plan(self.pass_no), True
        self.usable = 0

    def samples(self) -> Iterator[tuple[Location, dict]]:
        while True:
            if not self.segments:
                self._next_pass()
                continue
            seg = self.segments[0]
            if not seg[0]:
                self.segments.pop(0)
                continue
            shard = seg[0][0]
            for s in shard_samples(self.source.urls[shard], self.on_error, start=seg[1]):
                seg[1] = s.end
                n, seg[2] = seg[2], seg[2] + 1
                if n % seg[3] != seg[4]:
                    continue
                sample = self.decode(s.raw)
                if sample is None:
                    continue
                self.usable += 1
                yield (self.index, shard, s.start, self.pass_no), sample
            seg[0].pop(0)
            seg[1] = 0


def read_locations(sources: list[Source], locations: list[Location], on_error: Callable[..., None]) -> dict:
    """The raw samples at ``locations`` (what a resumed stream refills its buffers with), by location.
    Each shard is opened once; a local one is seeked from sample to sample, a remote one read through."""
    wanted: dict[tuple[int, int], set[int]] = {}
    for src, shard, offset, _ in locations:
        wanted.setdefault((src, shard), set()).add(offset)
    found = {}
    for (src, shard), offsets in wanted.items():
        url = sources[src].urls[shard]
        if is_local(url.removeprefix("file://")):
            for offset in sorted(offsets):
                for s in shard_samples(url, on_error, start=offset):
                    found[(src, shard, offset)] = s.raw
                    break
            continue
        left = set(offsets)
        for s in shard_samples(url, on_error, start=min(left)):
            if s.start in left:
                found[(src, shard, s.start)] = s.raw
                left.discard(s.start)
                if not left:
                    break
    return {loc: found.get(loc[:3]) for loc in locations}
