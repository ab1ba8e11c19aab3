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
    elif kind in ("nonfinite_regions", "inf_regions"):
        with np.load(io.BytesIO(good["regions.npz"])) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["features"] = arrays["features"].astype(np.float32)
        arrays["features"][0, 0] = np.nan if kind == "nonfinite_regions" else np.inf
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


def _cut_inside_a_member(path, member_index):
    """Truncate a tar in the middle of one member's data (a copy that stopped, a disk that filled up)."""
    import tarfile

    with tarfile.open(path) as tar:
        member = tar.getmembers()[member_index]
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + member.size // 2])


def test_truncated_tar_and_inf_features_are_skipped_counted_and_training_ends(tmp_path):
    import webdataset as wds

    from vlpt.data.shapes import make_sample, train_tokenizer

    captions = []
    for shard, n in enumerate((40, 40)):
        with wds.TarWriter(str(tmp_path / f"part-{shard:06d}.tar")) as w:
            for i in range(n):
                s = make_sample(np.random.default_rng([shard, i]))
                captions.append(s["txt"])
                if shard == 0 and i % 10 == 3:  # inf in the features of 4 samples of the first shard
                    s = _bad("inf_regions", s)
                w.write({"__key__": f"p{shard}-{i:03d}", **s})
    _cut_inside_a_member(tmp_path / "part-000001.tar", 4 * 20 + 2)  # sample 20's regions.npz, half written
    train_tokenizer(captions).save(str(tmp_path / "tokenizer.json"))
    recipe = tiny_recipe(tmp_path, data={"train": [{"shards": str(tmp_path / "part-{000000..000001}.tar")}],
                                         "val": None, "max_bad_fraction": 0.2},
                         train={"steps": 24, "lr": 1e-3, "warmup": 1}, log={"every": 4, "progress": False},
                         checkpoint={"every": None, "at_end": False})
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe),
                          f"model.tokenizer={tmp_path / 'tokenizer.json'}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 24
    counted = {k.split("/")[-1]: v for k, v in last.items() if k.startswith("data/skipped/")}
    assert set(counted) == {"bad_tar", "nonfinite_regions"}, counted  # each under its own reason, nothing else
    assert counted["bad_tar"] >= 1 and counted["nonfinite_regions"] >= 4, counted  # at least one pass each


@pytest.mark.parametrize("damage", ["garbage header", "cut inside a header"])
def test_a_damaged_header_inside_a_shard_is_counted_as_bad_tar(tmp_path, damage):
    """A damaged header block in the middle of a shard ends the shard: the samples after it are
    lost, so the loss must be counted, as it is for a member whose data is cut short."""
    import tarfile

    import webdataset as wds

    from vlpt.data.stream import read_tar_samples

    path = tmp_path / "damaged-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for i in range(10):
            w.write({"__key__": f"g{i:03d}", "txt": f"caption {i}", "json": b"{}"})
    with tarfile.open(path) as tar:
        offset = tar.getmembers()[8].offset  # the header of the fifth sample's first member
    data = bytearray(path.read_bytes())
    if damage == "garbage header":
        data[offset:offset + 512] = b"\xde\xad" * 256
    else:
        data = data[:offset + 100]
    path.write_bytes(bytes(data))
    errors = []
    samples = list(read_tar_samples(str(path), lambda reason, detail="": errors.append(reason)))
    assert len(samples) == 4  # the samples before the damage
    assert errors == ["bad_tar"], "the rest of the shard was dropped without being counted"
