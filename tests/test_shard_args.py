"""Shard arguments that name a folder, and a tokenizer learned from shards written elsewhere."""
from __future__ import annotations

import io
import json

import numpy as np
import webdataset as wds

from vlpt.cli import main as vlpt_main

from conftest import tiny_recipe


def _foreign_shards(folder, n=3, per=20, seed=0):
    """Shards as another writer makes them: plain TarWriter, np.savez regions (with real time stamps),
    captions of words vlpt's shapes grammar does not know."""
    rng = np.random.default_rng(seed)
    words = "zebra giraffe runs across grass under blue sky near tall trees".split()
    folder.mkdir()
    for s in range(n):
        with wds.TarWriter(str(folder / f"part-{s:03d}.tar")) as w:
            for i in range(per):
                buf = io.BytesIO()
                k = int(rng.integers(2, 5))
                np.savez(buf, features=rng.normal(size=(k, 192)).astype(np.float32),
                         boxes=np.sort(rng.random((k, 4)), axis=1).astype(np.float32))
                w.write({"__key__": f"p{s}_{i:03d}", "txt": " ".join(rng.choice(words, 6)), "regions.npz": buf.getvalue()})
    return folder


def test_inspect_and_train_take_a_folder_and_a_learned_tokenizer(tmp_path, capsys):
    shards = _foreign_shards(tmp_path / "foreign")
    assert vlpt_main(["data", "inspect", str(shards), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 60 and summary["shards"] == 3
    tok = tmp_path / "tokenizer.json"
    assert vlpt_main(["data", "tokenizer", str(shards), "--out", str(tok), "--vocab-size", "60", "--quiet"]) == 0
    from vlpt.data.tokenizer import TextTokenizer

    ids, _ = TextTokenizer.from_path(tok).encode("zebra runs across grass")
    assert TextTokenizer.from_path(tok).unk_id not in ids  # every word of those captions is known
    recipe = tiny_recipe(tmp_path, data={"train": [{"shards": str(shards)}], "val": None},
                         model={"tokenizer": str(tok)}, checkpoint={"every": None, "keep": 1})
    assert vlpt_main(["train", str(recipe)]) == 0, capsys.readouterr().err[-2000:]
    assert json.loads((tmp_path / "run" / "done.json").read_text())["step"] == 3


def test_a_folder_without_shards_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert vlpt_main(["data", "inspect", str(tmp_path / "empty")]) == 2
    assert "holds no .tar files" in capsys.readouterr().err
    assert vlpt_main(["data", "tokenizer", str(tmp_path / "empty"), "--out", str(tmp_path / "t.json")]) == 2
