"""Sharded training (FSDP2) on two real CPU ranks: train, SIGKILL, resume, `vlpt eval`, `vlpt export`;
the same weights as DDP; sharded checkpoints read as data only."""
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TORCHRUN, tiny_recipe, torchrun
from safetensors.torch import load_file
from test_plot_launch import launch_env
from test_resume import _kill_all

STEPS = 6
# No dropout: FSDP runs the whole last trunk layer (its weights are gathered in the layer's forward),
# DDP only the positions the heads read; the same states up to rounding, but with dropout on, the
# two would draw different masks.
SECTIONS = dict(model={"dropout": 0.0}, data={"num_workers": 1}, train={"steps": STEPS, "lr": 1e-3, "warmup": 2, "threads": 1},
                checkpoint={"every": 3, "keep": 2}, eval={"every": 4, "samples": 24, "retrieval_candidates": 8})


def fsdp_env() -> dict[str, str]:
    """What `accelerate launch --config_file recipes/launch/fsdp-1x8.yaml` hands each process about FSDP."""
    _, env = launch_env(REPO / "recipes/launch/fsdp-1x8.yaml")
    return {k: v for k, v in env.items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"}


def _env(sharded: bool) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return {**env, **fsdp_env()} if sharded else env


def _train_cmd(recipe: Path) -> list[str]:
    return torchrun(2, "-m", "vlpt.cli", "train", str(recipe))


def _losses(out: Path) -> dict[int, float]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_fsdp_launch_config_is_fsdp2_with_trunk_layers_as_units():
    from unittest import mock

    from accelerate.utils import FullyShardedDataParallelPlugin

    env = fsdp_env()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_TRANSFORMER_CLS_TO_WRAP"] == "TrunkLayer"
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is False


def _killed_and_resumed(recipe: Path, out: Path) -> None:
    """Train with FSDP on two ranks, SIGKILL the whole job (launcher, ranks, workers) after the
    checkpoint at step 3, as a node failure would, then run the same command again: it resumes."""
    proc = subprocess.Popen(_train_cmd(recipe), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=_env(True))
    t0 = time.time()
    while time.time() - t0 < 240 and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and '"step": 5,' in (out / "metrics.jsonl").read_text():
            _kill_all(str(recipe))
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)
    assert not (out / "checkpoints" / f"step-{STEPS:07d}").exists()
    res = subprocess.run(_train_cmd(recipe), capture_output=True, text=True, env=_env(True), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "step-0000003" in res.stderr


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun not installed")
def test_fsdp_two_ranks_kill_resume_eval_export_match_ddp(tmp_path):
    """FSDP killed and resumed ends with the weights of DDP uninterrupted, within fp32 tolerance."""
    runs = {}
    for name in ("ddp", "fsdp"):
        (tmp_path / name).mkdir()
        runs[name] = (tiny_recipe(tmp_path / name, **SECTIONS), tmp_path / name / "run")
    (ddp_recipe, ddp), (fsdp_recipe, fsdp) = runs["ddp"], runs["fsdp"]
    res = subprocess.run(_train_cmd(ddp_recipe), capture_output=True, text=True, env=_env(False), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    _killed_and_resumed(fsdp_recipe, fsdp)

    # a sharded checkpoint: every rank's slices, no whole-weights file; the slices add up to DDP's weights
    final, ddp_final = (run / "checkpoints" / f"step-{STEPS:07d}" for run in (fsdp, ddp))
    assert sorted(p.name for p in final.iterdir()) == ["rank-00000.pt", "rank-00001.pt", "sharded", "state.json",
                                                       "trainer.pt"]
    assert sorted(p.name for p in (final / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    f0, f1, whole = (torch.load(d / f"rank-0000{r}.pt", weights_only=True)["fingerprint"]
                     for d, r in ((final, 0), (final, 1), (ddp_final, 0)))
    assert not torch.allclose(f0, f1) and torch.allclose(f0 + f1, whole, rtol=1e-5, atol=1e-6)

    from vlpt.train.checkpoint import read_weights

    weights, reference = read_weights(final), load_file(str(ddp_final / "model.safetensors"))
    assert weights.keys() == reference.keys()
    for k in reference:  # the same updates as DDP, within fp32 tolerance
        assert torch.allclose(weights[k], reference[k], rtol=1e-5, atol=1e-6), k
    la, lb = _losses(ddp), _losses(fsdp)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert all(abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]) for s in la), (la, lb)

    # `vlpt eval` in one process gives what every rank computed together at the end of training
    trained_eval = json.loads((fsdp / "eval.json").read_text())
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "eval", str(fsdp)], capture_output=True, text=True,
                         env=_env(False), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((fsdp / "eval.json").read_text())
    assert again["step"] == trained_eval["step"] == STEPS and again.keys() == trained_eval.keys()
    assert all(abs(again[k] - trained_eval[k]) <= 1e-6 for k in again), (again, trained_eval)

    # `vlpt export`: the trunk loads in transformers.BertModel; every vlpt weight in one file
    out = tmp_path / "exported"
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "export", str(fsdp), str(out)], capture_output=True,
                         text=True, env=_env(False), timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(out))
    assert torch.equal(bert.embeddings.word_embeddings.weight, weights["vl.text_embedder.word_embeddings.weight"])
    exported = load_file(str(out / "vlpt_model.safetensors"))
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


# -- sharded checkpoints are data ----------------------------------------------------------------

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sharded_checkpoint(folder: Path, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A one-process DCP checkpoint as a sharded run writes it (``sharded/`` beside ``state.json``)."""
    import torch.distributed.checkpoint as dcp

    weights = {"vl.a.weight": torch.randn(4, 3), "vl.b.bias": torch.arange(5.0)}
    optimizer = {"param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": list(weights)}], **(extra or {})}
    dcp.save({"model": weights, "optimizer": optimizer}, storage_writer=dcp.FileSystemWriter(str(folder / "sharded")),
             no_dist=True)
    (folder / "state.json").write_text(json.dumps({"step": 3}))
    return weights


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_reads_back_whole_and_a_truncated_slice_is_caught(tmp_path):
    from vlpt.train.checkpoint import read_weights, readable

    ckpt = tmp_path / "step-0000003"
    weights = _sharded_checkpoint(ckpt)
    got = read_weights(ckpt)
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)
    assert readable(ckpt, 0) is None
    data = next((ckpt / "sharded").glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:100])  # a write cut short
    assert "holds 100 of its" in readable(ckpt, 0)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_that_would_run_code_is_refused(tmp_path):
    from vlpt.errors import UserError
    from vlpt.train import sharded
    from vlpt.train.checkpoint import readable

    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "step-0000003"
    _sharded_checkpoint(ckpt, extra={"note": _RunsCode(marker)})  # DCP pickles non-tensor values
    with pytest.raises(BaseException) as err:  # torch.distributed.checkpoint wraps the refusal
        sharded._load({"optimizer": {"note": None}}, ckpt / "sharded", no_dist=True)
    assert "Weights only load failed" in str(err.value) and not marker.exists()

    (ckpt / "sharded" / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))  # the index itself
    with pytest.raises(UserError, match=r"refusing to read .*\.metadata': it names (posix|os)\.system"):
        sharded.read_metadata(ckpt / "sharded")
    assert "refusing to read" in readable(ckpt, 0) and not marker.exists()
