"""A stream resumes from its position, not by replaying, and finishes its pass on another layout.

Streams here read caption-only shards with a word tokenizer (a caption of n words is n + 2
tokens), so token-budget batches vary in size; the view of each sample records the pass it was
read in and draws from the stream's generator and its negatives pool, so an exact resume must
restore all of them. Workers are simulated by replacing ``get_worker_info``.
"""
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds

import vlpt.data.stream as stream_module
from vlpt.data.collate import Collator
from vlpt.data.positions import elastic_starts
from vlpt.data.samples import DecodeSettings
from vlpt.data.stream import Source, TaskStream


class WordTokenizer:
    pad_id = 0

    def encode(self, text):
        n = len(text.split())
        return [2] + [5 + i for i in range(n)] + [3], [-1] + list(range(n)) + [-1]


def _shards(folder, sizes, prefix="s"):
    urls, keys = [], []
    rng = np.random.default_rng(len(sizes))
    for s, n in enumerate(sizes):
        urls.append(str(folder / f"{prefix}-{s:02d}.tar"))
        with wds.TarWriter(urls[-1]) as w:
            for i in range(n):
                keys.append(f"{prefix}{s:02d}-{i:03d}")
                w.write({"__key__": keys[-1], "txt": " ".join(["w"] * int(rng.integers(1, 12)))})
    return urls, keys


def _view(sample, rng, pool):
    """Draws from the generator and the pool, as ITM's negatives do, and records the sample's pass."""
    other = pool[int(rng.integers(len(pool)))]["key"] if pool else ""
    return {**sample, "seen": f"{sample['key']}@{sample['epoch']}", "partner": other, "draw": float(rng.random())}


def _stream(sources, rank=0, world_size=1, **kw) -> TaskStream:
    opts = dict(batch_tokens=60, batch_size=None, bucket_size=24, size_multiple=2, shuffle_buffer=10, pool_size=6,
                seed=5, rank=rank, world_size=world_size, resample=False)
    opts.update(kw)
    return TaskStream(sources, WordTokenizer(), DecodeSettings(feature_dim=None), _view, {"text"}, Collator(0), **opts)


def _content(batch):
    return batch["seen"], batch["partner"], batch["draw"].tolist(), batch["input_ids"].tolist()


@pytest.fixture
def worker(monkeypatch):
    """worker(id, count): make the stream see itself as that data-loader worker."""
    threads = torch.get_num_threads()

    def be(wid, workers):
        monkeypatch.setattr(stream_module, "get_worker_info", lambda: SimpleNamespace(id=wid, num_workers=workers))
    yield be
    torch.set_num_threads(threads)


@pytest.mark.parametrize("workers", [1, 3])  # 3 readers of 2 shards in source b: split by sample index
def test_a_stream_started_from_a_position_continues_exactly(tmp_path, worker, workers):
    a, _ = _shards(tmp_path, [23, 17, 31], "a")
    b, _ = _shards(tmp_path, [19, 26], "b")
    sources = [Source(a, weight=2.0), Source(b)]
    worker(workers // 2, workers)
    it = iter(_stream(sources))
    batches = [next(it) for _ in range(40)]  # several passes over both sources
    assert {e.split("@")[1] for bt in batches for e in bt["seen"]} >= {"0", "1", "2"}
    for k in (0, 7, 25):
        resumed = _stream(sources)
        resumed.start = {"taken": 0, "states": {workers // 2: batches[k]["data_position"]}}
        again = iter(resumed)
        for j in range(k + 1, min(k + 12, 40)):
            assert _content(next(again)) == _content(batches[j]), (k, j)


def count_decodes(monkeypatch) -> Counter:
    """How many times the streams decode each sample key, from now on."""
    decoded = Counter()
    decode = stream_module.decode_sample

    def counting(raw, *args):
        decoded[raw["__key__"]] += 1
        return decode(raw, *args)

    monkeypatch.setattr(stream_module, "decode_sample", counting)
    return decoded


def test_resuming_late_reads_no_more_than_resuming_early(tmp_path, monkeypatch):
    urls, _ = _shards(tmp_path, [40, 40, 40])
    decoded = count_decodes(monkeypatch)
    it = iter(_stream([Source(urls)]))
    batches = [next(it) for _ in range(80)]
    before = sum(decoded.values())
    cost = {}
    for k in (3, 79):
        decoded.clear()
        resumed = _stream([Source(urls)])
        resumed.start = {"taken": 0, "states": {0: batches[k]["data_position"]}}
        next(iter(resumed))
        cost[k] = sum(decoded.values())
    assert before > 6 * cost[79], (before, cost)  # far less than replaying what was trained on
    assert cost[79] <= cost[3] + 24 + 10, cost  # about the same early and late: buffers, one bucket


def _read_slot(stream, worker, wid, workers, batches):
    worker(wid, workers)
    it = iter(stream)
    return [next(it) for _ in range(batches)]


def _trained(batches):
    return [tuple(e.rsplit("@", 1)) for bt in batches for e in bt["seen"]]


@pytest.mark.parametrize("sizes, old, new", [
    ([27, 42, 21, 36, 30, 24, 33, 39], (2, 2), (1, 3)),  # by shard: 8 shards, 4 readers -> 3
    ([27, 42, 21, 36, 30, 24, 33, 39], (1, 1), (2, 1)),  # one rank -> two
    ([63, 51, 75], (2, 2), (2, 3)),  # by sample index: 3 shards, 4 readers -> 6
])
def test_another_layout_finishes_the_pass_reading_each_sample_once(tmp_path, worker, sizes, old, new):
    urls, keys = _shards(tmp_path, sizes)
    sources = [Source(urls)]
    (ranks, workers), (new_ranks, new_workers) = old, new
    trained, positions = [], {}
    for slot in range(ranks * workers):  # each old reader trained on a different number of batches
        got = _read_slot(_stream(sources, slot // workers, ranks), worker, slot % workers, workers, 3 + 2 * slot)
        trained += _trained(got)
        positions[slot] = got[-1]["data_position"]
    last = max(r["pass"] for p in positions.values() for r in p["readers"])
    assert 0 < sum(q == "0" for _, q in trained) < len(keys), "stopped inside the first pass"
    new_slots = new_ranks * new_workers
    starts = elastic_starts(_stream(sources), positions, ranks * workers, ranks, new_slots, list(range(new_slots)))
    for slot in range(new_slots):
        s = _stream(sources, slot // new_workers, new_ranks)
        s.start = {"taken": 0, "states": {slot % new_workers: starts[slot]}}
        trained += _trained(_read_slot(s, worker, slot % new_workers, new_workers, 90))
    for p in map(str, range(last + 2)):  # the passes under way finished across layouts, the next one read anew
        counts = Counter(k for k, q in trained if q == p)
        assert sorted(counts) == sorted(keys), f"pass {p}: missing {sorted(set(keys) - set(counts))[:5]}"
        assert set(counts.values()) == {1}, f"pass {p}: read twice {[k for k, c in counts.items() if c > 1][:5]}"


def test_a_dropped_stream_frees_its_buffers_without_waiting_for_the_garbage_collector(tmp_path):
    import gc
    import weakref

    urls, _ = _shards(tmp_path, [30, 30])
    it = iter(_stream([Source(urls)]))
    next(it)
    run = weakref.ref(it.gi_frame.f_locals["run"])  # what holds the shuffle buffer and the bucket
    gc.disable()
    try:
        del it
        assert run() is None, "a reference cycle keeps a dropped stream's samples in memory"
    finally:
        gc.enable()
