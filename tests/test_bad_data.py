"""Bad samples are skipped and counted by reason; too many stop the run with a clear message."""
import io
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_recipe

BAD_KINDS = ("bad_regions", "nonfinite_regions", "empty_caption", "bad_caption", "wrong_dim")


def _bad(kind, good):
    s = dict(good)
    if kind == "bad_regions":
        s["regions.npz"] = b"not an npz file"
    elif kind == "nonfinite_regions":
        with np.load(io.BytesIO(good["regions.npz"])) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["features"] = arrays["features"].astype(np.float32)
        arrays["features"][0, 0] = np.nan
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        s["regions.npz"] = buf.getvalue()
    elif kind == "wrong_dim":
        buf = io.BytesIO()
        np.savez(buf, features=np.zeros((2, 7), np.float32), boxes=np.zeros((2, 4), np.float32))
        s["regions.npz"] = buf.getvalue()
    elif kind == "empty_caption":
        s["txt"] = "   "
    elif kind == "bad_caption":
        s["txt"] = b"\xff\xfe not utf-8"
    return s


def _shards(folder, n, bad_fraction):
    import webdataset as wds

    from vlpt.data.shapes import make_sample, train_tokenizer

    rng = np.random.default_rng(0)
    captions = []
    bad_at = set(rng.choice(n, int(n * bad_fraction), replace=False).tolist())
    with wds.TarWriter(str(folder / "mixed-000000.tar")) as w:
        for i in range(n):
            s = make_sample(np.random.default_rng([7, i]))
            captions.append(s["txt"])
            if i in bad_at:
                s = _bad(BAD_KINDS[i % len(BAD_KINDS)], s)
            w.write({"__key__": f"m{i:05d}", **s})
    train_tokenizer(captions).save(str(folder / "tokenizer.json"))


def _train(tmp_path, bad_fraction, steps):
    _shards(tmp_path, 400, bad_fraction)
    recipe = tiny_recipe(tmp_path, data={"train": [{"shards": str(tmp_path / "mixed-000000.tar")}], "val": None,
                                         "max_bad_fraction": 0.1},
                         train={"steps": steps, "lr": 1e-3, "warmup": 1}, log={"every": 5, "progress": False})
    return subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe),
                           f"model.tokenizer={tmp_path / 'tokenizer.json'}"], capture_output=True, text=True, timeout=300)


def test_five_percent_bad_samples_train_to_the_end_and_are_counted(tmp_path):
    res = _train(tmp_path, 0.05, 60)
    assert res.returncode == 0, res.stderr[-3000:]
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 60
    counted = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("data/skipped/")}
    # every kind was seen; "wrong_dim" is reported as bad_regions; bad captions as bad_caption
    assert {"bad_regions", "nonfinite_regions", "empty_caption", "bad_caption"} <= set(counted), counted
    assert "skipping bad sample" in res.stderr  # warned (at most once per reason per minute)


def test_twenty_percent_bad_samples_stop_the_run_naming_the_threshold(tmp_path):
    res = _train(tmp_path, 0.20, 200)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "data.max_bad_fraction = 0.1" in res.stderr and "Traceback" not in res.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 200
