"""Elastic resume on real ranks: a run stopped mid-epoch on two ranks goes on with one, and one with
two; the samples trained on across both parts cover the epoch exactly once.

A plugin objective records, in ``forward``, every sample it trains on with the pass (epoch) its
reader read it in (``prepare`` tags it from the stream's ``epoch`` field), one file per rank.
"""
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from conftest import TORCHRUN, tiny_recipe, torchrun

SHARDS, PER_SHARD, BATCH = 6, 25, 5

PLUGIN = '''
import os
import torch
from vlpt import Objective, ObjectiveOutput, register_objective


@register_objective("seen_log")
class SeenLog(Objective):
    needs = {"text"}

    def __init__(self, options, model, tokenizer):
        super().__init__(options, model, tokenizer)
        self.head = torch.nn.Linear(model.config.hidden_size, 1)

    def prepare(self, sample, rng, pool=None):
        sample["seen"] = f"{sample['key']}@{sample['epoch']}"
        return sample

    def forward(self, out, batch):
        with open(os.environ["SEEN_LOG"] + "." + os.environ.get("RANK", "0"), "a") as f:
            f.write("\\n".join(batch["seen"]) + "\\n")
        return ObjectiveOutput(self.head(out.pooled).pow(2).mean())
'''


def _data(folder):
    import webdataset as wds

    from vlpt.data.shapes import make_sample, train_tokenizer

    captions, keys = [], []
    for s in range(SHARDS):
        with wds.TarWriter(str(folder / f"part-{s:06d}.tar")) as w:
            for i in range(PER_SHARD):
                sample = make_sample(np.random.default_rng([s, i]))
                captions.append(sample["txt"])
                keys.append(f"p{s}-{i:03d}")
                w.write({"__key__": keys[-1], **sample})
    train_tokenizer(captions).save(str(folder / "tokenizer.json"))
    (folder / "seen_log.py").write_text(PLUGIN)
    return keys


def _train(folder, ranks, steps, env):
    recipe = tiny_recipe(
        folder, plugins=[str(folder / "seen_log.py")],
        model={"tokenizer": str(folder / "tokenizer.json")},
        data={"train": [{"shards": str(folder / f"part-{{000000..{SHARDS - 1:06d}}}.tar")}], "val": None,
              "batch_size": BATCH, "num_workers": 1, "shuffle_buffer": 8, "resample": False},
        tasks={"mlm": {"weight": 0, "objectives": {"mlm": 1.0}}, "itm": {"weight": 0, "objectives": {"itm": 1.0}},
               "seen": {"weight": 1, "objectives": {"seen_log": 1.0}}},
        train={"steps": steps, "lr": 1e-3, "warmup": 1, "threads": 1},
        checkpoint={"every": None, "at_end": True}, eval={"at_end": False})
    command = ["-m", "vlpt.cli", "train", str(recipe)]
    launch = torchrun(ranks, *command) if ranks > 1 else [sys.executable, *command]
    res = subprocess.run(launch, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stderr


def _seen(log) -> list[tuple[str, str]]:
    lines = [line for r in (0, 1) if os.path.exists(f"{log}.{r}") for line in open(f"{log}.{r}").read().split()]
    return [tuple(line.rsplit("@", 1)) for line in lines]


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
@pytest.mark.parametrize("before, after", [(2, 1), (1, 2)])
def test_resumed_on_another_number_of_ranks_the_epoch_is_trained_once(tmp_path, before, after):
    keys = _data(tmp_path)
    log = str(tmp_path / "seen")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "SEEN_LOG": log}
    first = 60 // (BATCH * before)  # 60 of the epoch's 150 samples: stopped mid-epoch
    _train(tmp_path, before, first, env)
    part1 = _seen(log)
    assert len(part1) == 60 and {p for _, p in part1} == {"0"}
    err = _train(tmp_path, after, first + 200 // (BATCH * after), env)  # then 200 more: past the epoch's end
    assert "resuming from" in err and "the new readers finish the pass" in err
    seen = _seen(log)
    counts = Counter(k for k, p in seen if p == "0")
    assert sorted(counts) == sorted(keys), f"never trained on: {sorted(set(keys) - set(counts))[:5]}"
    assert set(counts.values()) == {1}, f"trained twice: {[k for k, c in counts.items() if c > 1][:5]}"
    assert any(p == "1" for _, p in seen)  # and the next epoch began
