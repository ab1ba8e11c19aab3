"""The trainer's data side: one loader per stream, batches handed out per task, and where every reader is.

Each batch a stream yields carries its reader's position right after it (``data_position``, see
:mod:`vlpt.data.stream`). The feed keeps, per loader, the position of every worker as of the last
batch *trained on* (batches the loader prefetched do not count) and how many batches it took: that
is the data cursor a checkpoint holds. Resumed with the same ranks and workers, every worker
continues from its position; with another layout, :func:`vlpt.data.positions.elastic_starts`
finishes the pass under way across the new readers.

Under ``mixing: sum`` tasks may share a stream (:func:`vlpt.build.task_streams`): an item then
holds one batch per task, handed out as each task asks for its next batch.
"""
from __future__ import annotations

import sys
from collections import Counter, defaultdict, deque
from typing import Any

from ..build import data_loader, note, task_streams
from ..data.positions import elastic_starts
from .checkpoint import load_rank_state

DATA_FIELDS = ("data_skipped", "data_read", "data_position")


class DataFeed:
    def __init__(self, built, sources, feeding, rank: int, world_size: int, num_workers: int, seed: int,
                 share: bool, pin_memory: bool = False):
        self.rank, self.world_size = rank, world_size
        self.num_workers = num_workers
        streams = task_streams(built, sources, rank, world_size, feeding, share=share)
        self.streams: dict[str, Any] = {}
        self.loader_of: dict[str, str] = {}
        for stream in dict.fromkeys(streams.values()):  # a shared stream once, named by its tasks
            name = "+".join(t for t, s in streams.items() if s is stream)
            self.streams[name] = stream
            self.loader_of.update({t: name for t, s in streams.items() if s is stream})
        self.loaders = {name: data_loader(s, num_workers, seed=seed, pin_memory=pin_memory)
                        for name, s in self.streams.items()}
        self.iters: dict[str, Any] = {}
        self.cursor = {name: {"taken": 0, "workers": {}} for name in self.streams}
        self.pending: defaultdict[str, deque] = defaultdict(deque)

    @property
    def layout(self) -> dict[str, int]:
        return {"processes": self.world_size, "num_workers": self.num_workers}

    # -- resume ----------------------------------------------------------------------------
    def resume(self, ckpt, info: dict, rank_state: dict | None) -> tuple[Counter, int] | None:
        """Where the streams go on after checkpoint ``ckpt`` (``info``: its state.json, ``rank_state``:
        this rank's file): each reader from its position with the same ranks and workers, else the pass
        under way dealt to this layout's readers. Returns, for another layout, the bad-sample counts and
        reads this rank takes over from the old ranks (None: its own file's hold)."""
        old, counts = info.get("readers", self.layout), None
        if old == self.layout:
            saved = (rank_state or {}).get("data")
            missing = self.resume_exact(saved) if saved else list(self.streams)
        else:
            states = {r: load_rank_state(ckpt, r) for r in range(int(old["processes"]))}
            saved = {r: s["data"] for r, s in states.items() if s and s.get("data")}
            missing = self.resume_elastic(saved, old) if len(saved) == len(states) else list(self.streams)
            counts = summed_counts({r: s for r, s in states.items() if s}, self.rank, self.world_size)
            note(f"{ckpt} was written with {old}, this run has {self.layout}: the new readers finish the pass "
                 "under way (each sample of it not yet trained on is read once), in another order than an "
                 "uninterrupted run")
        if missing and info.get("consumed") and self.rank == 0:
            print(f"vlpt: warning: {ckpt} holds no data position for {', '.join(missing)} (an earlier vlpt's "
                  "checkpoint, or other tasks): those streams start from the beginning", file=sys.stderr)
        return counts

    def resume_exact(self, saved: dict) -> list[str]:
        """Continue every worker where it was (same layout). Returns the loaders that had no position."""
        missing = []
        for name, stream in self.streams.items():
            cur = saved.get("loaders", {}).get(name)
            if cur is None:
                missing.append(name)
                continue
            self.cursor[name] = {"taken": int(cur["taken"]), "workers": {int(w): s for w, s in cur["workers"].items()}}
            stream.start = {"taken": self.cursor[name]["taken"], "states": self.cursor[name]["workers"]}
        return missing

    def resume_elastic(self, saved_by_rank: dict[int, dict], old_layout: dict[str, int]) -> list[str]:
        """Finish the pass under way in this layout, from every old rank's positions (rank -> saved data)."""
        old_workers = max(1, int(old_layout["num_workers"]))
        old_world = int(old_layout["processes"])
        workers = max(1, self.num_workers)
        missing = []
        for name, stream in self.streams.items():
            if any(name not in saved.get("loaders", {}) for saved in saved_by_rank.values()) or \
                    len(saved_by_rank) != old_world:
                missing.append(name)
                continue
            old = {r * old_workers + int(w): state for r, saved in saved_by_rank.items()
                   for w, state in saved["loaders"][name]["workers"].items()}
            mine = [self.rank * workers + w for w in range(workers)]
            try:
                starts = elastic_starts(stream, old, old_workers * old_world, old_world, workers * self.world_size,
                                        mine)
            except (ValueError, IndexError, KeyError):  # positions of other data
                missing.append(name)
                continue
            states = {slot - self.rank * workers: start for slot, start in starts.items()}
            self.cursor[name] = {"taken": 0, "workers": dict(states)}
            stream.start = {"taken": 0, "states": states}
        return missing

    # -- batches ---------------------------------------------------------------------------
    def next(self, task: str) -> tuple[dict, dict, int]:
        """The task's next batch (on the host), and the bad-sample counts and reads that came with it."""
        skipped, read = {}, 0
        if not self.pending[task]:
            name = self.loader_of[task]
            if name not in self.iters:
                self.iters[name] = iter(self.loaders[name])
            item = next(self.iters[name])
            skipped, read = item.pop("data_skipped", {}) or {}, int(item.pop("data_read", 0) or 0)
            position = item.pop("data_position", None)
            cur = self.cursor[name]
            cur["taken"] += 1
            if position is not None:
                cur["workers"][int(position["worker"])] = position
            for t, batch in (item.pop("parts") if "parts" in item else {task: item}).items():
                self.pending[t].append(batch)
        return self.pending[task].popleft(), skipped, read

    def state(self) -> dict:
        """The data cursor for a checkpoint: the layout, and per loader its batches and positions."""
        return {"layout": self.layout, "loaders": {name: {"taken": c["taken"], "workers": dict(c["workers"])}
                                                   for name, c in self.cursor.items()}}


def summed_counts(rank_states: dict[int, dict], rank: int, world_size: int) -> tuple[Counter, int]:
    """Bad-sample counts and reads of the old ranks this rank takes over (old rank % world_size == rank)."""
    skipped, read = Counter(), 0
    for r, state in rank_states.items():
        if r % world_size == rank:
            skipped.update(state.get("skipped", {}))
            read += int(state.get("read", 0))
    return skipped, read
