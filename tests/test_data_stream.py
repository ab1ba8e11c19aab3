"""The task stream: ITM negatives, token-budget batching, and the shapes data through the pipeline."""
import numpy as np
import pytest

from vlpt.build import build_model, task_streams
from vlpt.data.batching import token_budget_batches
from vlpt.data.sources import resolve_sources
from vlpt.recipe import load_recipe

from conftest import tiny_recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stream")
    recipe = load_recipe(tiny_recipe(tmp))
    sources, _ = resolve_sources(recipe, progress=False)
    b = build_model(recipe)
    return b, sources


def test_itm_negatives_never_pair_an_image_with_its_own_caption(built):
    b, sources = built
    stream = task_streams(b, sources)["itm"]
    pipe = stream.prepare
    # rebuild each view's pairing: a negative carries another sample's features
    from vlpt.data.samples import decode_sample
    from vlpt.data.stream import read_tar_samples

    by_text = {}
    for url in sources[0].urls:
        for raw in read_tar_samples(url, lambda *a: None):
            s = decode_sample(raw, b.tokenizer, stream.decode)
            by_text.setdefault(s["key"], s)
    rng = np.random.default_rng(0)
    pool = list(by_text.values())[:64]
    labels = []
    for s in list(by_text.values())[:400]:
        v = pipe(dict(s), rng, pool)
        labels.append(v["itm_label"])
        own = np.array_equal(v["features"], s["features"])
        assert own == (v["itm_label"] == 1), "label must say whether the image is the caption's own"
    assert 0.4 < np.mean(labels) < 0.6


def test_stream_batches_have_labels_and_negatives(built):
    b, sources = built
    it = iter(task_streams(b, sources)["itm"])
    labels = np.concatenate([next(it)["itm_label"].numpy() for _ in range(20)])
    assert 0.3 < labels.mean() < 0.7


def test_token_budget_batches_respect_budget_and_multiples():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(5, 120, 3000))
    batches = token_budget_batches(lengths, max_tokens=2048, size_multiple=8)
    assert sorted(i for b in batches for i in b) == list(range(3000))  # every sample exactly once
    for batch in batches[:-1]:
        assert max(lengths[i] for i in batch) * len(batch) <= 2048 or len(batch) <= 8
        assert len(batch) % 8 == 0
    # sorting keeps padding small
    pad = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)
    assert pad / sum(lengths) < 0.1


def test_token_budget_training_stream(tmp_path):
    budget, bucket, multiple = 400, 60, 8  # a bucket of 60 leaves a remainder that is no multiple of 8
    recipe = load_recipe(tiny_recipe(tmp_path), ["data.batch_size=null", f"data.batch_tokens={budget}",
                                                 f"data.bucket_size={bucket}", f"data.size_multiple={multiple}"])
    sources, _ = resolve_sources(recipe, progress=False)
    b = build_model(recipe)
    it = iter(task_streams(b, sources)["mlm"])
    buckets, current, seen = [], [], 0
    while len(buckets) < 4:  # a bucket's batches come out together: their counts add up to the bucket
        batch = next(it)
        lengths = batch["text_mask"].sum(1) + batch["region_mask"].sum(1)  # (B,) tokens + regions per sample
        current.append((len(lengths), int(lengths.max())))
        seen += len(lengths)
        assert seen <= bucket * (len(buckets) + 1), "a batch mixes samples of two buckets"
        if seen == bucket * (len(buckets) + 1):
            buckets.append(current)
            current = []
    batches = [nl for bk in buckets for nl in bk]
    assert max(longest for _, longest in batches) * multiple <= budget  # no sample too long for a batch here
    for n, longest in batches:
        assert longest * n <= budget, (n, longest)  # the padded size stays within the budget
    for bk in buckets:  # counts are multiples of size_multiple, except one remainder per bucket
        assert sum(n % multiple != 0 for n, _ in bk) <= 1, bk
    assert any(n % multiple for n, _ in batches)  # (there is a remainder to see)
    # batch sizes follow length: the batches of the longest samples hold fewer of them than the shortest
    by_length = sorted(batches, key=lambda nl: nl[1])
    assert len({n for n, _ in batches}) > 2
    longest, shortest = by_length[-1][1], by_length[0][1]
    assert max(n for n, L in batches if L == longest) < min(n for n, L in batches if L == shortest)


def test_token_budget_itm_draws_negatives_from_the_whole_bucket(tmp_path):
    """A token-budget batch is a length-sorted slice of its bucket: ITM's negatives pool is the
    whole bucket (its samples of every length), not the samples just before in sorted order."""
    bucket = 60
    recipe = load_recipe(tiny_recipe(tmp_path), ["data.batch_size=null", "data.batch_tokens=400",
                                                 f"data.bucket_size={bucket}"])
    sources, _ = resolve_sources(recipe, progress=False)
    b = build_model(recipe)
    it = iter(task_streams(b, sources)["itm"])
    seen, pools, lengths = 0, [], []
    while seen < 2 * bucket:
        batch = next(it)
        seen += len(batch["itm_label"])
        pool = batch["data_position"]["pools"][0]
        pools.append({tuple(row) for row in pool.tolist()})
        real = batch["text_mask"].sum(1) + batch["region_mask"].sum(1)
        lengths.append((int(real.min()), int(real.max())))
    assert all(len(p) == bucket for p in pools)  # every batch of a bucket draws from all of it
    assert len({frozenset(p) for p in pools}) == 2  # one pool per bucket
    assert len(lengths) > 2 and len(set(lengths)) > 1  # (the bucket's batches do differ in length)


def test_two_sources_mixed_three_to_one(tmp_path):
    import webdataset as wds

    from vlpt.data.shapes import make_sample, train_tokenizer

    captions = []
    for name in ("coco", "vg"):
        with wds.TarWriter(str(tmp_path / f"{name}-000000.tar")) as w:
            for i in range(150):
                s = make_sample(np.random.default_rng([len(name), i]))
                captions.append(s["txt"])
                w.write({"__key__": f"{name}{i:04d}", **s})
    train_tokenizer(captions).save(str(tmp_path / "tokenizer.json"))
    recipe = load_recipe(tiny_recipe(tmp_path, data={
        "train": [{"shards": str(tmp_path / "coco-000000.tar"), "weight": 3},
                  {"shards": str(tmp_path / "vg-000000.tar"), "weight": 1}],
        "val": None, "batch_size": 50}), [f"model.tokenizer={tmp_path / 'tokenizer.json'}"])
    sources, _ = resolve_sources(recipe, progress=False)
    b = build_model(recipe)
    it = iter(task_streams(b, sources)["mlm"])
    keys = [k for _ in range(40) for k in next(it)["key"]]  # 2000 samples
    share = sum(k.startswith("coco") for k in keys) / len(keys)
    assert abs(share - 0.75) < 0.05 * 0.75, share


def _first_keys(stream, n):
    """Keys of the first ``n`` clean samples the stream's source stage gives this reader."""
    from vlpt.data.stream import StreamRun

    run = StreamRun(stream, *stream._slot(), stream._worker()[0], None)
    it = run.readers[0].samples()
    return [next(it)[1]["key"] for _ in range(n)]


def test_epochs_split_shards_and_resampling_draws_them_per_reader(built, tmp_path):
    import webdataset as wds

    from vlpt.data.shapes import make_sample
    from vlpt.data.stream import Source

    b, sources = built
    urls = []
    for s in range(4):  # at least one shard per reader
        urls.append(str(tmp_path / f"part-{s}.tar"))
        with wds.TarWriter(urls[-1]) as w:
            for i in range(40):
                w.write({"__key__": f"s{s}-{i:03d}", **make_sample(np.random.default_rng([s, i]))})
    shards = Source(urls)
    per_epoch = {}
    for resample in (False, True):
        keys = []
        for rank in (0, 1):
            s = task_streams(b, [shards], rank=rank, world_size=2)["mlm"]
            s.resample = resample
            keys.append(_first_keys(s, 60))
            assert keys[-1] == _first_keys(s, 60)  # deterministic: what exact resume replays
        per_epoch[resample] = keys
    # epochs: the two ranks read different shards; resampling: each rank draws its own shards
    assert per_epoch[False][0] != per_epoch[False][1]
    assert per_epoch[True][0] != per_epoch[True][1]
    assert per_epoch[True] != per_epoch[False]  # resampling draws another order than the epochs
    auto = task_streams(b, [shards], rank=0, world_size=2)["mlm"]
    assert auto._resampling(shards, 2) and not auto._resampling(Source(sources[0].urls[:1]), 2)


def test_sum_mode_tasks_share_one_stream_that_decodes_each_sample_once(tmp_path, monkeypatch):
    from test_positions import count_decodes

    recipe = load_recipe(tiny_recipe(tmp_path, mixing="sum"))
    sources, _ = resolve_sources(recipe, progress=False)
    b = build_model(recipe)
    assert task_streams(b, sources)["mlm"] is not task_streams(b, sources)["itm"]  # mixing: sample
    streams = task_streams(b, sources, share=True)
    assert streams["mlm"] is streams["itm"]
    decoded = count_decodes(monkeypatch)
    it = iter(streams["mlm"])
    items = [next(it) for _ in range(5)]
    for item in items:  # every task's batch of the same samples, prepared by its own objectives
        mlm, itm = item["parts"]["mlm"], item["parts"]["itm"]
        assert mlm["key"] == itm["key"] and "mlm_labels" in mlm and "itm_label" in itm
        assert "itm_label" not in mlm and "mlm_labels" not in itm
    trained = sum(len(item["parts"]["mlm"]["key"]) for item in items)
    assert set(decoded.values()) == {1}  # once for both tasks
    assert sum(decoded.values()) <= trained + recipe.data.shuffle_buffer + 1


def test_half_floats_travel_half_and_are_widened_on_the_device(built, monkeypatch):
    from types import SimpleNamespace

    import torch

    import vlpt.data.collate as collate_module
    from vlpt.data.collate import move_to

    b, sources = built
    batch = next(iter(task_streams(b, sources)["mlm"]))
    assert batch["features"].dtype == torch.float16  # the shapes data stores half floats
    moved = move_to(batch, torch.device("cpu"))
    assert moved["features"].dtype == torch.float32 and torch.equal(moved["features"], batch["features"].float())
    assert not batch["features"].is_shared()
    # inside a data-loader worker the batch is collated straight into shared memory (no copy to hand it over)
    monkeypatch.setattr(collate_module, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=1))
    in_worker = next(iter(task_streams(b, sources)["mlm"]))
    assert in_worker["features"].is_shared() and in_worker["input_ids"].is_shared()
    assert torch.equal(in_worker["features"], batch["features"])
