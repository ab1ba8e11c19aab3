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
    recipe = load_recipe(tiny_recipe(tmp_path), ["data.batch_size=null", "data.batch_tokens=400", "data.bucket_size=64"])
    sources, _ = resolve_sources(recipe, progress=False)
    b = build_model(recipe)
    it = iter(task_streams(b, sources)["mlm"])
    sizes = []
    for _ in range(10):
        batch = next(it)
        n, L = batch["input_ids"].shape[0], batch["input_ids"].shape[1] + batch["features"].shape[1]
        sizes.append(n)
        assert n * L <= 400 + 8 * L
    assert len(set(sizes)) > 1 or sizes[0] % 8 == 0


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
    slot, slots = stream._slot()
    it = stream._source_samples(0, stream.sources[0], slot, slots)
    return [next(it)["key"] for _ in range(n)]


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
