"""Two real CPU ranks (torchrun, gloo) over shards of very different sizes: no hang, same steps."""
import json
import os
import subprocess

import numpy as np
import pytest

from conftest import TORCHRUN, tiny_recipe, torchrun


def _write_shards(folder, sizes):
    import webdataset as wds

    from vlpt.data.shapes import make_sample, train_tokenizer

    captions = []
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"uneven-{s:06d}.tar")) as w:
            for i in range(n):
                sample = make_sample(np.random.default_rng([s, i]))
                captions.append(sample["txt"])
                w.write({"__key__": f"s{s}-{i:05d}", **sample})
    train_tokenizer(captions).save(str(folder / "tokenizer.json"))


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_two_ranks_uneven_shards_same_number_of_steps(tmp_path):
    _write_shards(tmp_path, [5, 40, 200])
    recipe = tiny_recipe(
        tmp_path,
        data={"train": [{"shards": str(tmp_path / "uneven-{000000..000002}.tar")}], "val": None, "num_workers": 1},
        train={"steps": 12, "lr": 1e-3, "warmup": 1},
        checkpoint={"every": None, "keep": 2},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        torchrun(2, "-m", "vlpt.cli", "train", str(recipe)),
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps == list(range(1, 13))  # written once (rank 0), every step
    assert "2 process(es)" in res.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000012"]
