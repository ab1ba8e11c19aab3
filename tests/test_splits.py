"""Rank and worker splits of the training stream are disjoint and complete.

Every (rank, data-loader worker) slot of a :class:`vlpt.data.stream.TaskStream` reads its own
part of each epoch. Over one epoch all slots together must read every sample exactly once,
whether the stream splits by shard (at least as many shards as slots) or by sample index
(fewer shards than slots). Workers are simulated by replacing ``get_worker_info``, so no
DataLoader runs; each view carries its key tagged with the pass (epoch) it was read in (the
stream's ``epoch`` field), so the epochs of an endless stream can be told apart.
"""
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds

import vlpt.data.stream as stream_module
from vlpt.data.collate import Collator
from vlpt.data.samples import DecodeSettings
from vlpt.data.stream import Source, TaskStream

RANKS, WORKERS = 2, 3  # 6 slots


class WordTokenizer:
    """Any caption -> [CLS] w [SEP]: decoding needs no vocabulary here."""

    pad_id, cls_id, sep_id = 0, 2, 3

    def encode(self, text):
        return [self.cls_id, 5, self.sep_id], [-1, 0, -1]


def _shards(folder, sizes) -> tuple[list[str], list[str]]:
    """Caption-only shards of the given sizes; returns their paths and every sample key."""
    urls, keys = [], []
    for s, n in enumerate(sizes):
        urls.append(str(folder / f"part-{s:02d}.tar"))
        with wds.TarWriter(urls[-1]) as w:
            for i in range(n):
                keys.append(f"s{s:02d}-{i:03d}")
                w.write({"__key__": keys[-1], "txt": "a caption"})
    return urls, keys


@pytest.fixture
def threads_restored():
    threads = torch.get_num_threads()  # a stream in a "worker" sets one thread for the process
    yield
    torch.set_num_threads(threads)


def _tag_pass(sample, rng, pool):
    """The view of a sample: its key tagged with the pass (epoch) its reader read it in."""
    return {**sample, "seen": f"{sample['key']}@{sample['epoch']}"}


def _stream(urls, rank) -> TaskStream:
    return TaskStream([Source(urls)], WordTokenizer(), DecodeSettings(feature_dim=None), _tag_pass,
                      {"text"}, Collator(0), batch_tokens=None, batch_size=1, shuffle_buffer=1, pool_size=0,
                      seed=3, rank=rank, world_size=RANKS, resample=False)


def _keys_per_pass(stream, monkeypatch, worker, passes=2) -> list[list[str]]:
    """The keys one slot yields in each of its first ``passes`` passes (read until a later one shows)."""
    monkeypatch.setattr(stream_module, "get_worker_info", lambda: SimpleNamespace(id=worker, num_workers=WORKERS))
    out: list[list[str]] = [[] for _ in range(passes)]
    it = iter(stream)
    for batch in it:
        key, e = batch["seen"][0].rsplit("@", 1)
        if int(e) > passes:  # the shuffle buffer may hold back a sample or two: wait one more pass
            break
        if int(e) < passes:
            out[int(e)].append(key)
    it.close()
    return out


def _reads_by_slot(urls, monkeypatch) -> dict[tuple[int, int], list[list[str]]]:
    return {(r, w): _keys_per_pass(_stream(urls, r), monkeypatch, w) for r in range(RANKS) for w in range(WORKERS)}


def _assert_each_pass_reads_every_sample_once(reads, keys):
    for e in range(2):
        counts = Counter(k for slot in reads.values() for k in slot[e])
        twice = sorted(k for k, c in counts.items() if c > 1)
        missing = sorted(set(keys) - set(counts))
        assert not twice and not missing, f"pass {e}: read twice {twice[:5]}, never read {missing[:5]}"
        assert sorted(counts) == sorted(keys)
        assert all(slot[e] for slot in reads.values()), "a slot read nothing"


def test_slots_split_shards_disjointly_and_completely(tmp_path, threads_restored, monkeypatch):
    urls, keys = _shards(tmp_path, [3, 7, 4, 10, 5, 6, 8, 2])  # 8 shards >= 6 slots: split by shard
    reads = _reads_by_slot(urls, monkeypatch)
    _assert_each_pass_reads_every_sample_once(reads, keys)
    for slot in reads.values():  # by shard: a slot reads whole shards
        for e in range(2):
            shards = {k.split("-")[0] for k in slot[e]}
            assert sum(k.split("-")[0] in shards for k in keys) == len(slot[e])
    assert any(slot[0] != slot[1] for slot in reads.values()), "shards are reshuffled every epoch"


def test_slots_split_samples_disjointly_and_completely_when_shards_are_few(tmp_path, threads_restored, monkeypatch):
    urls, keys = _shards(tmp_path, [7, 9, 11])  # 3 shards < 6 slots: split by sample index
    reads = _reads_by_slot(urls, monkeypatch)
    _assert_each_pass_reads_every_sample_once(reads, keys)
    sizes = sorted(len(slot[0]) for slot in reads.values())
    assert sizes[-1] - sizes[0] <= 1, sizes  # an even share of the samples, not of the shards
