"""Elastic resume: the positions of every reader of one layout -> where the readers of another start.

A checkpoint holds, for each data-loader worker of each rank, its stream's position (see
:mod:`vlpt.data.stream`). Resumed with the same ranks and workers, each reader continues exactly
where it was. Resumed with another layout (more or fewer ranks, or workers), the pass under way
is finished instead, and every sample of it not yet trained on is read exactly once:

* the samples the old readers held (shuffle buffers, token buckets, batches cut from a bucket but
  not yet trained on) are dealt to the new readers, round robin, and come first;
* the rest of each pass still under way — the shards, or the part of a shard, an old reader had
  left, and the whole share of readers that had not yet reached that pass — is cut into pieces
  (one shard each; a stretch that keeps one sample in ``stride`` stays whole) dealt to the new
  readers round robin;
* after that, every new reader starts the next pass in the new layout.

What is not exact: the order of the remaining samples, the batches they form, and every draw of
the streams' generators differ from an uninterrupted run; negatives pools start empty. A source
read by resampling has no pass to finish: its old readers' current draws are finished and then
each new reader draws its own.
"""
from __future__ import annotations

from typing import Any

import torch

from .readers import pass_plan, resampling, segment


def _pieces(segments: list[list]) -> list[list]:
    """One piece per shard of the segments that keep every sample; a strided segment stays whole."""
    out = []
    for shards, offset, count, stride, phase in segments:
        if stride != 1:
            out.append(segment(shards, offset, count, stride, phase))
            continue
        out.extend(segment([s], offset if i == 0 else 0) for i, s in enumerate(shards))
    return out


def _work_by_pass(reader: dict) -> dict[int, list[list]]:
    work = {int(reader["pass"]): [list(s) for s in reader["segments"]]}
    for p, segs in reader.get("queued", []):
        work[int(p)] = [list(s) for s in segs]
    return work


def remaining_passes(stream, index: int, old: dict[int, dict | None], old_slots: int,
                     old_world: int) -> dict[int, list[list]]:
    """Pass -> the pieces of source ``index`` left unread by the old readers (``old``: slot -> position)."""
    n_shards = len(stream.sources[index].urls)
    resample = resampling(stream.resample, old_world, n_shards, old_slots)
    works = {}
    for slot in range(old_slots):
        state = old.get(slot)
        reader = state["readers"][index] if state else None
        if reader is not None and reader.get("shards", n_shards) != n_shards:
            raise ValueError(f"data source {index} has {n_shards} shards, its saved positions {reader['shards']}")
        if reader is None:  # a reader none of whose batches was trained on: its first pass is all left
            reader = {"pass": 0, "segments": pass_plan(stream.seed, index, n_shards, slot, old_slots, 0, resample)}
        works[slot] = _work_by_pass(reader)
    lo = min(min(w) for w in works.values())
    hi = max(max(w) for w in works.values())
    out: dict[int, list[list]] = {}
    for p in range(lo, hi + 1):
        pieces = []
        for slot, work in works.items():
            if p in work:
                pieces += _pieces(work[p])
            elif p > max(work) and not resample:  # a pass this reader had not reached: its whole share
                pieces += _pieces(pass_plan(stream.seed, index, n_shards, slot, old_slots, p, False))
        out[p] = pieces
    return out


def _held(state: dict | None) -> list[list[int]]:
    """Locations of the samples an old reader held and had not yet trained on."""
    if not state:
        return []
    held = [state.get("buffer"), state.get("bucket"), *state.get("pending", [])]
    return [row for t in held if t is not None for row in torch.as_tensor(t).reshape(-1, 4).tolist()]


def elastic_starts(stream, old: dict[int, dict | None], old_slots: int, old_world: int,
                   new_slots: int, mine: list[int]) -> dict[int, dict[str, Any]]:
    """Starts (positions without generator states) for the new slots ``mine`` of ``new_slots``, from
    the positions of every old slot (``old``: slot -> its position, None if none was trained on).
    A ValueError if the positions do not fit the stream's sources (the recipe's data changed)."""
    starts = {j: {"readers": [], "buffer": [], "rng": None} for j in range(new_slots)}
    for index in range(len(stream.sources)):
        passes = remaining_passes(stream, index, old, old_slots, old_world)
        queued = {j: [] for j in range(new_slots)}
        k = 0
        for p in sorted(passes):
            mine_p = {j: [] for j in range(new_slots)}
            for piece in passes[p]:
                mine_p[k % new_slots].append(piece)
                k += 1
            for j in range(new_slots):  # every pass, even an empty share: fresh passes start after the last
                queued[j].append([p, mine_p[j]])
        for j in range(new_slots):
            last = queued[j][-1][0]
            starts[j]["readers"].append({"pass": last, "segments": [], "usable": 0, "full": False,
                                         "queued": queued[j]})
    held = [row for slot in range(old_slots) for row in _held(old.get(slot))]
    for i, row in enumerate(held):
        starts[i % new_slots]["buffer"].append(row)
    return {j: {**starts[j], "buffer": torch.tensor(starts[j]["buffer"], dtype=torch.int64).reshape(-1, 4)}
            for j in mine}
