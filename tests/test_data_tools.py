"""The data tools: images + captions -> shards -> regions -> training; UNITER's layout; inspect.

The tools are scripts (``tools/*.py``); they are imported and their ``main`` called
in-process (no second torch/timm import), except the training run, which goes
through ``python -m vlpt.cli train`` as a user would.

The UNITER text DB is tested in its JSON Lines form (no optional package needed);
the LMDB form needs ``lmdb``, ``msgpack`` and ``lz4`` and is skipped without them.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, tiny_recipe

COLORS = {"red": (230, 30, 30), "green": (30, 190, 40), "blue": (40, 80, 245), "yellow": (240, 230, 30)}
SHAPES = ("circle", "square")


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # worker processes find its functions by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def captions_to_shards():
    return _tool("captions_to_shards")


@pytest.fixture(scope="module")
def extract_regions():
    return _tool("extract_regions")


@pytest.fixture(scope="module")
def uniter_to_shards():
    return _tool("uniter_to_shards")


def make_images(folder: Path, n: int, seed: int = 0) -> list[dict]:
    """``n`` images of one colored shape (sizes vary, some PNG) and a caption each."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = (int(v) for v in rng.integers(48, 120, size=2))
        img = Image.fromarray(rng.integers(0, 20, size=(h, w, 3), dtype=np.uint8))
        color = list(COLORS)[i % len(COLORS)]
        shape = SHAPES[(i // len(COLORS)) % len(SHAPES)]
        box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
        draw = ImageDraw.Draw(img)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
        name = f"img{i:03d}.{'png' if i % 7 == 0 else 'jpg'}"
        img.save(folder / name)
        rows.append({"image": name, "caption": f"a {color} {shape} on a dark background", "n": i})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_shard(path: Path) -> list[dict]:
    from vlpt.data.stream import read_tar_samples

    return list(read_tar_samples(str(path), lambda *a: pytest.fail(f"broken shard {path}: {a}")))


# --------------------------------------------------------------------------------------
# images + captions -> shards -> regions -> vlpt train
# --------------------------------------------------------------------------------------


def test_captions_then_regions_train(tmp_path, captions_to_shards, extract_regions, capsys):
    rows = make_images(tmp_path / "images", 50)
    rows.append({"image": "not-there.jpg", "caption": "a picture that was lost"})
    captions = write_jsonl(tmp_path / "pairs.jsonl", rows)
    raw = tmp_path / "raw"
    assert captions_to_shards.main([str(captions), "--images", str(tmp_path / "images"), "--out", str(raw),
                                    "--shard-size", "20", "--workers", "2", "--resize", "64", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 missing image(s)" in err and "not-there.jpg" in err
    info = json.loads((raw / "info.json").read_text())
    assert info["samples"] == 50 and info["missing_images"] == 1
    shards = sorted(raw.glob("shard-*.tar"))
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    first = read_shard(shards[0])[0]
    assert {"__key__", "txt", "jpg", "json"} <= set(first)
    meta = json.loads(first["json"])
    assert min(meta["width"], meta["height"]) == min(64, meta["orig_width"], meta["orig_height"])
    assert (raw / "tokenizer.json").is_file()

    feats = tmp_path / "regions"
    assert extract_regions.main([f"{raw}/shard-{{000000..000002}}.tar", "--out", str(feats), "--model", "resnet18",
                                 "--pretrained", "none", "--grid", "3", "--image-size", "64", "--batch-size", "25",
                                 "--quiet"]) == 0
    assert "region_feature_dim=512" in capsys.readouterr().err
    samples = [s for p in sorted(feats.glob("shard-*.tar")) for s in read_shard(p)]
    assert len(samples) == 50
    with np.load(io.BytesIO(samples[0]["regions.npz"]), allow_pickle=False) as z:
        assert z["features"].shape == (9, 512) and z["features"].dtype == np.float16
        assert z["soft_labels"].shape == (9, 1000) and z["conf"].shape == (9,)
        np.testing.assert_allclose(z["boxes"][0], [0, 0, 1 / 3, 1 / 3], atol=1e-6)
        np.testing.assert_allclose(z["soft_labels"].astype(np.float32).sum(1), 1.0, atol=1e-2)
    assert samples[0]["txt"] == read_shard(shards[0])[0]["txt"]  # everything else copied as it was
    assert (feats / "tokenizer.json").is_file()

    recipe = tiny_recipe(tmp_path, model={"hidden_size": 32, "layers": 2, "heads": 2, "ffn_size": 64,
                                          "max_positions": 64, "region_feature_dim": 512},
                         data={"train": [{"shards": f"{feats}/shard-{{000000..000002}}.tar"}],
                               "val": {"shards": f"{feats}/shard-000002.tar"}},
                         eval={"samples": 10, "retrieval_candidates": 5, "batch_size": 16})
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)
    assert "itm_acc" in json.loads((tmp_path / "run" / "eval.json").read_text())


def test_captions_to_shards_resumes_and_refuses_other_settings(tmp_path, captions_to_shards, capsys):
    rows = make_images(tmp_path / "images", 25, seed=1)
    captions = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "out"
    args = [str(captions), "--images", str(tmp_path / "images"), "--out", str(out), "--shard-size", "10",
            "--workers", "1", "--quiet"]
    assert captions_to_shards.main(args) == 0
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == 3
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    # an interrupted run: one shard missing, a half-written temporary left behind
    shards[1].unlink()
    (out / ".shard-000001.tar.tmp-999").write_bytes(b"half a shard")
    capsys.readouterr()
    assert captions_to_shards.main(args) == 0
    assert "2 of 3 shard(s) already complete" in capsys.readouterr().err
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.glob("shard-*.tar"))}
    assert after["shard-000000.tar"][0] == before["shard-000000.tar"][0]  # skipped, not rewritten
    assert after["shard-000002.tar"][0] == before["shard-000002.tar"][0]
    assert after["shard-000001.tar"][1] == before["shard-000001.tar"][1]  # rewritten identically
    assert not list(out.glob(".*.tmp-*"))
    # other settings into the same folder: refused in one line, exit 2
    assert captions_to_shards.main(args[:-5] + ["--shard-size", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite" in err and "Traceback" not in err


def test_captions_to_shards_coco_csv_and_mistakes(tmp_path, captions_to_shards, capsys):
    make_images(tmp_path / "images", 6, seed=2)
    coco = {"images": [{"id": i, "file_name": f"img{i:03d}.{'png' if i % 7 == 0 else 'jpg'}"} for i in range(6)],
            "annotations": [{"id": 100 + k, "image_id": k % 6, "caption": f"caption {k}"} for k in range(12)]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    out = tmp_path / "coco"
    assert captions_to_shards.main([str(tmp_path / "captions.json"), "--images", str(tmp_path / "images"),
                                    "--out", str(out), "--workers", "1", "--vocab-size", "0", "--quiet"]) == 0
    samples = read_shard(out / "shard-000000.tar")
    assert len(samples) == 12 and not (out / "tokenizer.json").exists()
    meta = json.loads(samples[0]["json"])
    assert {"image_id", "caption_id", "image"} <= set(meta)

    (tmp_path / "pairs.csv").write_text("path,text\nimg001.jpg,a red circle\nimg002.jpg,a green circle\n")
    base = [str(tmp_path / "pairs.csv"), "--images", str(tmp_path / "images"), "--workers", "1", "--quiet"]
    capsys.readouterr()
    assert captions_to_shards.main(base + ["--out", str(tmp_path / "csv")]) == 2  # default columns absent
    err = capsys.readouterr().err
    assert "no column 'image'" in err and "--image-column" in err and err.count("\n") == 1
    assert captions_to_shards.main(base + ["--out", str(tmp_path / "csv"), "--image-column", "path",
                                           "--caption-column", "text"]) == 0
    assert {s["txt"] for s in read_shard(tmp_path / "csv" / "shard-000000.tar")} == {b"a red circle", b"a green circle"}
    assert captions_to_shards.main([str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err


def test_extract_regions_own_boxes_local_weights_and_no_pickle(tmp_path, extract_regions, capsys):
    import torch
    import webdataset as wds
    from PIL import Image
    from safetensors.torch import save_file

    import timm

    shard = tmp_path / "in" / "boxes-000000.tar"
    shard.parent.mkdir()
    boxes = [[0.1, 0.1, 0.5, 0.6], [0.4, 0.2, 0.9, 0.9]]
    with wds.TarWriter(str(shard)) as w:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (40, 30), (200, 30 * i, 10)).save(buf, format="JPEG")
            w.write({"__key__": f"s{i}", "txt": f"sample {i}", "jpg": buf.getvalue(),
                     "json": json.dumps({"boxes": boxes if i != 1 else [[0.5, 0.5, 0.2, 0.9]]}).encode()})
        w.write({"__key__": "textonly", "txt": "no image here"})
    net = timm.create_model("resnet18", num_classes=7)
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    out = tmp_path / "out"
    assert extract_regions.main([str(shard), "--out", str(out), "--model", "resnet18", "--weights",
                                 str(tmp_path / "r18.safetensors"), "--image-size", "64", "--dtype", "float32",
                                 "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "bad_boxes: 1" in err and "no_image (copied unchanged): 1" in err
    samples = {s["__key__"]: s for s in read_shard(out / shard.name)}
    assert set(samples) == {"s0", "s2", "textonly"} and "regions.npz" not in samples["textonly"]
    with np.load(io.BytesIO(samples["s0"]["regions.npz"]), allow_pickle=False) as z:
        np.testing.assert_allclose(z["boxes"], boxes, atol=1e-6)
        assert z["features"].dtype == np.float32 and z["soft_labels"].shape == (2, 7)  # the file's 7 classes

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"fc.weight": Payload()}, str(tmp_path / "evil.pth"))
    assert extract_regions.main([str(shard), "--out", str(tmp_path / "o2"), "--model", "resnet18", "--weights",
                                 str(tmp_path / "evil.pth"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "refusing" in err and err.count("\n") == 1
    assert extract_regions.main([str(tmp_path / "missing-000000.tar"), "--out", str(tmp_path / "o3")]) == 2
    assert "not found" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# UNITER's layout
# --------------------------------------------------------------------------------------


def make_uniter(root: Path, n_img: int = 5, D: int = 24, C: int = 9) -> dict:
    """A folder of UNITER-style npz files (the last one missing) and a JSONL text DB, 3 captions per image."""
    rng = np.random.default_rng(0)
    (root / "npz").mkdir(parents=True)
    dumps = {}
    for i in range(n_img):
        n = int(rng.integers(4, 12))
        xy = rng.random((n, 2)) * 0.5
        wh = 0.1 + rng.random((n, 2)) * 0.4
        dump = {"features": rng.random((n, D)).astype(np.float16),
                "norm_bb": np.concatenate([xy, xy + wh, wh], 1).astype(np.float32),
                "conf": np.sort(rng.random(n).astype(np.float32))[::-1].copy(),
                "soft_labels": rng.dirichlet(np.ones(C), n).astype(np.float16)}
        fname = f"coco_train2014_{i:012d}.npz"
        dumps[fname] = dump
        if i < n_img - 1:
            np.savez(root / "npz" / fname, **dump)
    entries = [{"id": f"{j // 3}_{j % 3}", "img_fname": f"coco_train2014_{j // 3:012d}.npz",
                "raw": f"caption {j} of image {j // 3}", "input_ids": [7, 8, 9], "image_id": j // 3}
               for j in range(3 * n_img)]
    write_jsonl(root / "txt.jsonl", entries)
    return {"dumps": dumps, "entries": entries}


def _check_converted(out: Path, data: dict, D: int = 24) -> list[dict]:
    from vlpt.data.samples import DecodeSettings, decode_sample
    from vlpt.data.stream import read_tar_samples

    from vlpt.data.inspect import WordTokenizer

    samples = [decode_sample(raw, WordTokenizer(), DecodeSettings(feature_dim=D))
               for p in sorted(out.glob("*.tar")) for raw in read_tar_samples(str(p), print)]
    for s in samples:
        dump = data["dumps"][s["meta"]["img_fname"]]
        np.testing.assert_array_equal(s["boxes"], dump["norm_bb"][: len(s["boxes"]), :4])
        np.testing.assert_array_equal(s["features"], dump["features"][: len(s["features"])])
        assert s["features"].dtype == np.float16 and s["soft_labels"].shape[1] == 9 and len(s["conf"]) == len(s["boxes"])
    return samples


def test_uniter_npz_folder_and_jsonl_text_db(tmp_path, uniter_to_shards, capsys):
    data = make_uniter(tmp_path)
    out = tmp_path / "out"
    args = ["--img-db", str(tmp_path / "npz"), "--txt-db", str(tmp_path / "txt.jsonl"), "--out", str(out),
            "--shard-size", "5", "--workers", "2", "--quiet"]
    assert uniter_to_shards.main(args) == 0
    assert "missing_image: 3" in capsys.readouterr().err  # the 3 captions of the missing image
    samples = _check_converted(out, data)
    assert len(samples) == 12
    assert sorted(s["text"] for s in samples)[0] == "caption 0 of image 0"
    assert all(len(s["boxes"]) == len(data["dumps"][s["meta"]["img_fname"]]["features"]) for s in samples)
    assert uniter_to_shards.main(args) == 0  # resumes: everything already there
    assert "3 of 3 shard(s) already complete" in capsys.readouterr().err

    # UNITER's region selection: max(min_bb, min(max_bb, #conf > th))
    out2 = tmp_path / "cut"
    assert uniter_to_shards.main(args[:4] + ["--out", str(out2), "--conf-th", "0.5", "--min-bb", "2", "--max-bb", "4",
                                             "--workers", "1", "--quiet"]) == 0
    for s in _check_converted(out2, data):
        conf = data["dumps"][s["meta"]["img_fname"]]["conf"]
        assert len(s["boxes"]) == min(4, max(2, int((conf > 0.5).sum())))

    # captions only as input_ids: needs --tokenizer, says so in one line
    ids_only = [{k: v for k, v in e.items() if k != "raw"} for e in data["entries"]]
    write_jsonl(tmp_path / "ids.jsonl", ids_only)
    capsys.readouterr()
    base = ["--img-db", str(tmp_path / "npz"), "--txt-db", str(tmp_path / "ids.jsonl"), "--quiet", "--workers", "1"]
    assert uniter_to_shards.main(base + ["--out", str(tmp_path / "ids")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and err.count("\n") == 1
    from vlpt.data.shapes import train_tokenizer

    train_tokenizer(["zero one two three four five six"]).save(str(tmp_path / "tok.json"))
    assert uniter_to_shards.main(base + ["--out", str(tmp_path / "ids"), "--tokenizer", str(tmp_path / "tok.json")]) == 0
    texts = {s["txt"] for p in (tmp_path / "ids").glob("*.tar") for s in read_shard(p)}
    assert len(texts) == 1 and texts.pop().decode().split() != []
    assert uniter_to_shards.main(["--img-db", str(tmp_path / "nothing"), "--txt-db", str(tmp_path / "txt.jsonl"),
                                  "--out", str(tmp_path / "x")]) == 2


def test_uniter_lmdb(tmp_path, uniter_to_shards):
    lmdb = pytest.importorskip("lmdb")
    msgpack = pytest.importorskip("msgpack")
    lz4_frame = pytest.importorskip("lz4.frame")
    data = make_uniter(tmp_path)

    def msgpack_numpy(o):  # msgpack-numpy's encoding of an array
        if isinstance(o, np.ndarray):
            return {b"nd": True, b"type": o.dtype.str, b"kind": b"", b"shape": o.shape, b"data": o.tobytes()}
        return o

    img_db = tmp_path / "img_db" / "coco_train2014" / "feat_th0.2_max100_min10"
    img_db.mkdir(parents=True)
    env = lmdb.open(str(img_db), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, (fname, dump) in enumerate(list(data["dumps"].items())[:-1]):
            if k % 2:  # the _compressed DBs hold npz bytes, the others msgpack-numpy: accept both
                buf = io.BytesIO()
                np.savez_compressed(buf, **dump)
                value = buf.getvalue()
            else:
                value = msgpack.packb(dump, default=msgpack_numpy, use_bin_type=True)
            txn.put(fname.encode(), value)
    env.close()
    txt_db = tmp_path / "txt_db" / "pretrain_coco_train.db"
    txt_db.mkdir(parents=True)
    env = lmdb.open(str(txt_db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for e in data["entries"]:
            value = {k: v for k, v in e.items() if k != "id"}
            txn.put(e["id"].encode(), lz4_frame.compress(msgpack.packb(value, use_bin_type=True)))
    env.close()
    (txt_db / "txt2img.json").write_text(json.dumps({e["id"]: e["img_fname"] for e in data["entries"]}))
    out = tmp_path / "out"
    assert uniter_to_shards.main(["--img-db", str(img_db.parent), "--txt-db", str(txt_db), "--out", str(out),
                                  "--workers", "1", "--quiet"]) == 0
    assert len(_check_converted(out, data)) == 12


# --------------------------------------------------------------------------------------
# vlpt data inspect
# --------------------------------------------------------------------------------------


def test_inspect_reports_bad_samples_by_reason_and_missing_shard_exits_2(tmp_path, capsys):
    import webdataset as wds

    from vlpt.cli import main as vlpt_main
    from vlpt.data.shapes import make_sample, train_tokenizer

    captions = []
    with wds.TarWriter(str(tmp_path / "mixed-000000.tar")) as w:
        for i in range(30):
            s = make_sample(np.random.default_rng([3, i]))
            captions.append(s["txt"])
            if i in (3, 4):
                s["regions.npz"] = b"not an npz"
            elif i == 5:
                s["txt"] = "   "
            elif i == 6:
                s["txt"] = b"\xff\xfe"
            elif i == 7:
                s["txt"] = " ".join(["red"] * 80)
            w.write({"__key__": f"m{i:03d}", **s})
    train_tokenizer(captions).save(str(tmp_path / "tokenizer.json"))
    with wds.TarWriter(str(tmp_path / "mixed-000001.tar")) as w:
        for i in range(10):
            w.write({"__key__": f"n{i:03d}", **make_sample(np.random.default_rng([4, i]))})

    assert vlpt_main(["data", "inspect", str(tmp_path / "mixed-{000000..000001}.tar"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["samples"] == 40 and r["bad_samples"] == 5
    assert r["bad_by_reason"] == {"bad_regions": 2, "empty_caption": 1, "bad_caption": 1, "caption_too_long": 1}
    assert r["fields"] == {"jpg": 40, "txt": 40, "regions.npz": 40, "json": 40}
    assert [s["samples"] for s in r["per_shard"]] == [30, 10] and [s["bad"] for s in r["per_shard"]] == [5, 0]
    assert r["feature_dims"] == {"192": 35} and r["regions_per_image"]["max"] <= 3

    assert vlpt_main(["data", "inspect", str(tmp_path / "mixed-*.tar"), "--limit", "12"]) == 0
    text = capsys.readouterr().out
    assert "12 samples in 1 shard(s)" in text and "bad_regions" in text and "caption length (words)" in text
    assert "│" in text  # the histogram

    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "data", "inspect", str(tmp_path / "absent-000000.tar")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "absent-000000.tar" in res.stderr and "Traceback" not in res.stderr


def test_every_tool_has_help_with_examples(captions_to_shards, extract_regions, uniter_to_shards, capsys):
    tools = [captions_to_shards, extract_regions, uniter_to_shards, _tool("bench_data")]
    for tool in tools:
        with pytest.raises(SystemExit) as exc:
            tool.main(["--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "Examples" in out or "python tools/" in out, tool.__name__


def test_bench_data_prints_pipeline_and_step_rates(tmp_path, capsys):
    bench = _tool("bench_data")
    recipe = tiny_recipe(tmp_path)
    assert bench.main([str(recipe), "--workers", "0", "1", "--seconds", "0.3", "--min-batches", "4",
                       "--steps", "2", "--warmup", "1", "--json"]) == 0
    out = capsys.readouterr().out
    assert "data pipeline, 0 worker(s)/task" in out and "data pipeline, 1 worker(s)/task" in out
    assert "training step" in out
    r = json.loads(out.strip().splitlines()[-1])
    assert [p["workers_per_task"] for p in r["pipeline"]] == [0, 1]
    assert all(p["samples_per_s"] > 0 for p in r["pipeline"]) and r["step"]["samples_per_s"] > 0
    assert bench.main([str(tmp_path / "missing.yaml")]) == 2


def test_data_commands_and_export_refuse_mistakes_in_one_line(tmp_path, capsys):
    """`vlpt data shapes|tokenizer` and `vlpt export` on values or paths they cannot use: one line,
    exit 2 (were ValueError, FileExistsError, OverflowError tracebacks, or a 1-caption tokenizer)."""
    from vlpt.cli import main as vlpt_main

    afile = tmp_path / "afile"
    afile.write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    shards = tmp_path / "shapes"
    assert vlpt_main(["data", "shapes", "--out", str(shards), "--samples", "20", "--shard-size", "10"]) == 0
    capsys.readouterr()
    cases = [
        (["data", "shapes", "--out", str(tmp_path / "s"), "--samples", "-5"], "--samples must be >= 1, got -5"),
        (["data", "shapes", "--out", str(tmp_path / "s"), "--shard-size", "0"], "--shard-size must be >= 1"),
        (["data", "shapes", "--out", str(afile)], "is a file, not a folder"),
        (["data", "shapes", "--out", str(tmp_path / "other"), "--samples", "5"], "holds other files than a shapes"),
        (["data", "tokenizer", str(shards), "--out", str(tmp_path / "other")], "is a folder; name the tokenizer file"),
        (["data", "tokenizer", str(shards), "--out", str(tmp_path / "t.json"), "--vocab-size", "-1"],
         "--vocab-size must be more than the 5 special tokens, got -1"),
        (["data", "tokenizer", str(shards), "--out", str(tmp_path / "t.json"), "--limit", "0"],
         "--limit must be at least 1, got 0"),
        (["export", str(tmp_path / "norun"), str(afile)], "is a file; name a folder to export into"),
    ]
    for argv, expected in cases:
        assert vlpt_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine" and not (tmp_path / "t.json").exists()
    syn = _tool("synthetic_shards")
    for argv, expected in (([], "is a file, not a folder"), (["--regions", "5-2"], "1 <= MIN <= MAX, got '5-2'"),
                           (["--samples", "0"], "--samples must be at least 1, got 0")):
        out = afile if not argv else tmp_path / "syn"
        assert syn.main(["--out", str(out), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "syn").exists()
