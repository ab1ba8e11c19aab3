"""Tests of the synthetic shapes data set (vlpt.data.shapes).

They check the properties the rest of vlpt relies on: determinism, captions
that describe the image exactly (every object once, true relation), grounding
indices that point at the right words and regions, region features from which
color and shape are recoverable, and shards that webdataset can read.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tarfile  # noqa: E402
from itertools import combinations  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from vlpt.data import shapes as S  # noqa: E402

N_WRITE = 50


# --------------------------------------------------------------------------- helpers


def _sample(seed, i, image_size=64):
    return S.decode_sample(S.make_sample(np.random.default_rng([seed, i]), image_size))


@pytest.fixture(scope="module")
def many():
    """300 decoded samples made directly (no tar round trip), shared by the statistical tests."""
    return [_sample(123, i) for i in range(300)]


def _read_dir(out_dir):
    """Decode every sample of a written data set, in shard order, with webdataset."""
    import webdataset as wds

    info = json.loads((out_dir / "info.json").read_text())
    urls = [str(out_dir / name) for name in info["shards"]]
    return info, [S.decode_sample(s) for s in wds.WebDataset(urls, shardshuffle=False)]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two writes with seed 0 and one with seed 1, N_WRITE samples each, 3 shards."""
    root = tmp_path_factory.mktemp("shapes")
    dirs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        paths = S.write_shapes(root / name, N_WRITE, seed=seed, shard_size=20, progress=False)
        dirs[name] = (root / name, paths)
    return root, dirs


def _center(box):
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _phrase(obj):
    return f"a {obj['size']} {obj['color']} {obj['shape']}"


# --------------------------------------------------------------------------- constants


def test_constants():
    assert len(S.COLORS) >= 8 and len(set(S.COLORS)) == len(S.COLORS)
    assert S.SHAPES == ("circle", "square", "triangle", "cross")
    assert S.SIZES == ("small", "large")
    assert S.RELATIONS == ("left of", "right of", "above", "below")
    assert S.FEATURE_DIM == 192
    assert S.NUM_CLASSES == 1 + len(S.COLORS) * len(S.SHAPES)
    rgb = np.array([S.COLOR_RGB[c] for c in S.COLORS], dtype=float)
    # Well separated even after +-10 jitter per channel (at most ~35 in distance).
    dists = [np.linalg.norm(a - b) for a, b in combinations(rgb, 2)]
    assert min(dists) > 70
    assert min(np.linalg.norm(rgb, axis=1)) > 100  # every color far from the black background
    seen = set()
    for c in S.COLORS:
        for s in S.SHAPES:
            k = S.class_index(c, s)
            assert 0 < k < S.NUM_CLASSES and S.class_name(k) == f"{c} {s}"
            seen.add(k)
    assert seen == set(range(1, S.NUM_CLASSES))
    assert S.class_name(0) == "background"


# --------------------------------------------------------------------------- determinism


def test_make_sample_is_a_function_of_the_rng():
    a = S.make_sample(np.random.default_rng([5, 17]))
    b = S.make_sample(np.random.default_rng([5, 17]))
    c = S.make_sample(np.random.default_rng([5, 18]))
    assert set(a) == {"jpg", "txt", "regions.npz", "json"}
    assert a == b  # byte-identical, npz included
    assert a["jpg"] != c["jpg"]


def test_write_is_deterministic_and_seed_dependent(written):
    _, dirs = written
    info_a, a = _read_dir(dirs["a"][0])
    info_b, b = _read_dir(dirs["b"][0])
    _, c = _read_dir(dirs["c"][0])
    assert len(a) == len(b) == len(c) == N_WRITE
    assert info_a == info_b
    for x, y in zip(a, b):
        assert x["__key__"] == y["__key__"]
        assert x["caption"] == y["caption"]
        assert x["meta"] == y["meta"]
        np.testing.assert_array_equal(x["image"], y["image"])
        assert set(x["regions"]) == set(y["regions"])
        for k in x["regions"]:
            np.testing.assert_array_equal(x["regions"][k], y["regions"][k])
    # Even the shard files are byte-identical (fixed tar and zip timestamps).
    for pa, pb in zip(dirs["a"][1], dirs["b"][1]):
        assert open(pa, "rb").read() == open(pb, "rb").read()
    # Another seed gives other data.
    assert sum(x["caption"] != z["caption"] for x, z in zip(a, c)) > N_WRITE // 2
    assert not any(np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))
    assert all(z["__key__"].startswith("0001-") for z in c)


# --------------------------------------------------------------------------- captions


def test_object_count_distribution(many):
    counts = np.bincount([len(s["meta"]["objects"]) for s in many], minlength=4)
    assert counts[0] == 0 and counts.sum() == 300
    # Expected 30 / 135 / 135; the bounds are more than 3.5 standard deviations wide.
    assert 10 <= counts[1] <= 55
    assert 100 <= counts[2] <= 170
    assert 100 <= counts[3] <= 170


def test_caption_names_every_object_once_with_a_true_relation(many):
    obj_re = r"a (?:%s) (?:%s) (?:%s)" % ("|".join(S.SIZES), "|".join(S.COLORS), "|".join(S.SHAPES))
    rel_re = "|".join(S.RELATIONS)
    grammar = re.compile(rf"^{obj_re}(?: (?:{rel_re}) {obj_re}(?: and {obj_re})?)?$")
    relations_seen = set()
    for s in many:
        cap, meta, boxes = s["caption"], s["meta"], s["regions"]["boxes"]
        objs = meta["objects"]
        n = len(objs)
        assert re.fullmatch(r"[a-z]+( [a-z]+)*", cap), cap
        assert grammar.match(cap), cap
        assert len(boxes) == n
        assert sorted(o["region"] for o in objs) == list(range(n))
        # Each object phrase occurs exactly once, the phrases in caption order, nothing else named.
        phrases = [_phrase(o) for o in objs]
        assert len(set((o["color"], o["shape"]) for o in objs)) == n
        for p in phrases:
            assert len(re.findall(rf"(?:^| ){p}(?= |$)", cap)) == 1, (p, cap)
        assert cap.split(" ").count("a") == n
        assert [cap.index(p) for p in phrases] == sorted(cap.index(p) for p in phrases)
        if n == 1:
            assert meta["relation"] is None
            assert cap == phrases[0]
            continue
        rel = meta["relation"]
        words = cap.split(" ")
        assert " ".join(words[rel["words"][0] : rel["words"][1]]) == rel["relation"]
        assert rel["relation"] in S.RELATIONS
        assert rel["subject"] == objs[0]["region"] and rel["object"] == objs[1]["region"]
        expected = f"{phrases[0]} {rel['relation']} {phrases[1]}" + (f" and {phrases[2]}" if n == 3 else "")
        assert cap == expected
        # The relation is true from the stored boxes, along the dominant axis.
        (sx, sy), (ox, oy) = _center(boxes[rel["subject"]]), _center(boxes[rel["object"]])
        dx, dy = ox - sx, oy - sy
        r = rel["relation"]
        if r in ("left of", "right of"):
            assert abs(dx) >= abs(dy) - 1e-6, (cap, boxes)
            assert (dx > 0) if r == "left of" else (dx < 0), (cap, boxes)
        else:
            assert abs(dy) >= abs(dx) - 1e-6, (cap, boxes)
            assert (dy > 0) if r == "above" else (dy < 0), (cap, boxes)
        relations_seen.add(r)
    assert relations_seen == set(S.RELATIONS)


def test_grounding_indices_and_soft_labels(many):
    total = correct = 0
    for s in many:
        words = s["caption"].split(" ")
        soft = s["regions"]["soft_labels"]
        for o in s["meta"]["objects"]:
            w = o["words"]
            assert words[w["size"]] == o["size"]
            assert words[w["color"]] == o["color"]
            assert words[w["shape"]] == o["shape"]
            assert words[w["size"] - 1] == "a" and w["color"] == w["size"] + 1 and w["shape"] == w["size"] + 2
            pred = 1 + int(np.argmax(soft[o["region"], 1:]))
            correct += pred == S.class_index(o["color"], o["shape"])
            total += 1
    assert correct / total >= 0.9, correct / total
    assert correct < total  # labels are noisy, not a copy of the answer


def test_soft_labels_and_conf(many):
    for s in many:
        reg = s["regions"]
        n = len(reg["boxes"])
        assert reg["soft_labels"].dtype == np.float16 and reg["soft_labels"].shape == (n, S.NUM_CLASSES)
        p = reg["soft_labels"].astype(np.float32)
        assert np.all(p >= 0) and np.allclose(p.sum(1), 1, atol=2e-2)
        assert np.all(p[:, 0] < 0.2)  # background is unlikely
        assert reg["conf"].dtype == np.float32 and reg["conf"].shape == (n,)
        assert np.all((reg["conf"] >= 0.6) & (reg["conf"] <= 1.0))


def test_regions_are_not_in_caption_order(many):
    multi = [s for s in many if len(s["meta"]["objects"]) > 1]
    assert len(multi) >= 200
    orders = [[o["region"] for o in s["meta"]["objects"]] for s in multi]
    shuffled = sum(order != list(range(len(order))) for order in orders)
    assert shuffled / len(multi) >= 0.2


# --------------------------------------------------------------------------- regions


def test_features_are_centered_crops_of_the_object(many):
    checked_squares = 0
    for s in many[:150]:
        reg, img = s["regions"], s["image"]
        f = reg["features"]
        n = len(reg["boxes"])
        assert f.dtype == np.float16 and f.shape == (n, S.FEATURE_DIM)
        assert np.all(f >= -1) and np.all(f <= 1)
        for feat, box in zip(f.astype(np.float32), reg["boxes"]):
            x1, y1, x2, y2 = np.rint(box * 64).astype(int)
            # Same crop from the decoded JPEG: close, up to compression artefacts.
            crop = Image.fromarray(img[y1:y2, x1:x2]).resize((8, 8), Image.BOX)
            ref = 2 * np.asarray(crop, dtype=np.float32).reshape(-1) / 255 - 1
            assert np.abs(ref - feat).mean() < 0.05
            assert feat.max() > -0.2  # the object is in the crop, not background
        for o in s["meta"]["objects"]:
            feat = f[o["region"]].astype(np.float32).reshape(8, 8, 3)
            target = 2 * np.array(S.COLOR_RGB[o["color"]]) / 255 - 1
            if o["shape"] == "square":  # fills its box: every cell is the (jittered) color
                assert np.abs(feat - target).max() <= 2 * 11 / 255 + 1e-3
                checked_squares += 1
            else:  # other shapes leave dark corner cells
                assert feat[0, 0].max() < 0 or feat[0, -1].max() < 0
    assert checked_squares > 10


def test_gray_and_white_differ_beyond_scale(many):
    """Centering makes gray sit near 0 and white near 1, on a -1 background."""
    means = {"gray": [], "white": []}
    for s in many:
        for o in s["meta"]["objects"]:
            if o["color"] in means and o["shape"] == "square":
                means[o["color"]].append(s["regions"]["features"][o["region"]].astype(np.float32).mean())
    assert means["gray"] and means["white"]
    assert max(abs(m) for m in means["gray"]) < 0.15
    assert min(means["white"]) > 0.8


def test_boxes_normalized_sized_and_disjoint(many):
    for s in many:
        b = s["regions"]["boxes"]
        assert b.dtype == np.float32 and b.shape == (len(s["meta"]["objects"]), 4)
        assert np.all(b >= 0) and np.all(b <= 1)
        assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
        px = np.rint(b * 64).astype(int)
        for o in s["meta"]["objects"]:
            x1, y1, x2, y2 = px[o["region"]]
            side = x2 - x1
            assert side == y2 - y1
            assert (12 <= side <= 14) if o["size"] == "small" else (20 <= side <= 24), (o, side)
        for (ax1, ay1, ax2, ay2), (bx1, by1, bx2, by2) in combinations(px, 2):
            # Disjoint with a gap of at least 2 px on one axis.
            assert ax2 + 2 <= bx1 or bx2 + 2 <= ax1 or ay2 + 2 <= by1 or by2 + 2 <= ay1


def test_image_is_dark_with_colored_objects(many):
    for s in many[:50]:
        img = s["image"]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        mask = np.zeros((64, 64), bool)
        for x1, y1, x2, y2 in np.rint(s["regions"]["boxes"] * 64).astype(int):
            mask[max(0, y1 - 1) : y2 + 1, max(0, x1 - 1) : x2 + 1] = True
        assert img[~mask].mean() < 15  # background (JPEG ringing stays next to the objects)


def test_other_image_size():
    s = _sample(0, 3, image_size=96)
    assert s["image"].shape == (96, 96, 3) and s["meta"]["width"] == s["meta"]["height"] == 96
    assert s["regions"]["features"].shape[1] == S.FEATURE_DIM
    with pytest.raises(ValueError):
        S.make_sample(np.random.default_rng(0), image_size=8)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_one_token_per_word(many):
    captions = [s["caption"] for s in many]
    tok = S.train_tokenizer(captions)
    vocab = tok.get_vocab()
    for i, special in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]):
        assert vocab[special] == i
    for cap in captions:
        words = cap.split(" ")
        enc = tok.encode(cap)
        assert enc.tokens == ["[CLS]", *words, "[SEP]"]
        assert enc.ids[0] == 2 and enc.ids[-1] == 3 and 1 not in enc.ids
        assert enc.word_ids == [None, *range(len(words)), None]
        assert tok.decode(enc.ids) == cap
    # The grammar's words are covered even when the captions miss some.
    small = S.train_tokenizer(["a small red circle"])
    assert small.get_vocab() == vocab
    other = "a large white cross below a small gray triangle and a large blue square"
    assert 1 not in small.encode(other).ids
    # Upper case is normalized away.
    assert tok.encode("A Large RED circle").tokens == ["[CLS]", "a", "large", "red", "circle", "[SEP]"]


# --------------------------------------------------------------------------- written data set


def test_written_data_set(written):
    from tokenizers import Tokenizer

    root, dirs = written
    out, paths = dirs["a"]
    assert [os.path.basename(p) for p in paths] == [f"shapes-{i:06d}.tar" for i in range(3)]
    assert all(os.path.isfile(p) for p in paths)
    info, samples = _read_dir(out)
    assert info["samples"] == N_WRITE and info["shards"] == [os.path.basename(p) for p in paths]
    assert info["seed"] == 0 and info["image_size"] == 64
    assert info["colors"] == list(S.COLORS) and info["shapes"] == list(S.SHAPES)
    assert info["sizes"] == list(S.SIZES)
    assert info["feature_dim"] == S.FEATURE_DIM and info["num_classes"] == S.NUM_CLASSES
    assert len(samples) == N_WRITE
    assert [s["__key__"] for s in samples] == [f"0000-{i:08d}" for i in range(N_WRITE)]
    # Members are exactly the four entries per sample, tar closed properly (readable to the end).
    names = []
    for p in paths:
        with tarfile.open(p) as t:
            names += t.getnames()
    assert len(names) == 4 * N_WRITE
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "regions.npz", "json"}
    # Raw regions.npz opens without pickle; and matches make_sample for the same index.
    with tarfile.open(paths[0]) as t:
        raw = t.extractfile("0000-00000007.regions.npz").read()
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        assert set(z.files) == {"features", "boxes", "soft_labels", "conf"}
    assert raw == S.make_sample(np.random.default_rng([0, 7]))["regions.npz"]
    # The saved tokenizer encodes every caption without [UNK], one token per word.
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    for s in samples:
        enc = tok.encode(s["caption"])
        assert len(enc.ids) == len(s["caption"].split(" ")) + 2 and 1 not in enc.ids
        assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    # No temporary folders left next to the outputs.
    assert sorted(p.name for p in root.iterdir()) == ["a", "b", "c"]


def test_write_replaces_only_shapes_folders_and_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    S.write_shapes(out, 5, seed=2, shard_size=2, progress=False)
    assert len(json.loads((out / "info.json").read_text())["shards"]) == 3
    # Rewriting a finished data set replaces it whole (no stale shards left).
    S.write_shapes(out, 3, seed=2, shard_size=10, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["info.json", "shapes-000000.tar", "tokenizer.json"]
    # A folder with other content is never overwritten.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        S.write_shapes(other, 3, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"

    # An interrupted run leaves neither a folder that looks complete nor temporary debris.
    real = S.make_sample
    calls = {"n": 0}

    def flaky(rng, image_size=64):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(rng, image_size)

    monkeypatch.setattr(S, "make_sample", flaky)
    with pytest.raises(KeyboardInterrupt):
        S.write_shapes(tmp_path / "broken", 10, shard_size=3, progress=False)
    assert not (tmp_path / "broken").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "mine"]


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError):
        S.write_shapes(tmp_path / "x", 0, progress=False)
    with pytest.raises(ValueError):
        S.write_shapes(tmp_path / "x", 5, shard_size=0, progress=False)
    assert not (tmp_path / "x").exists()
