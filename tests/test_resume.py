"""Runs that survive: exact resume after SIGKILL, SIGTERM preemption, a truncated checkpoint,
non-finite losses, and the same for two real ranks."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_recipe, torchrun

STEPS = 14


def _env():  # read when a test runs: conftest's private VLPT_CACHE is set by then
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _recipe(tmp_path, name, **sections):
    folder = tmp_path / name
    folder.mkdir()
    # mixing: sample, two data workers per task, token-budget batching (the hard case for resume)
    base = dict(
        data={"batch_size": None, "batch_tokens": 384, "bucket_size": 64, "num_workers": 2, "shuffle_buffer": 32},
        train={"steps": STEPS, "lr": 1e-3, "warmup": 2, "threads": 1},
        checkpoint={"every": 5, "keep": 3},
        eval={"at_end": False},
    )
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return tiny_recipe(folder, **base), folder / "run"


def _cmd(recipe, *extra):
    return [sys.executable, "-m", "vlpt.cli", "train", str(recipe), *extra]


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert len(losses) == sum("loss" in r for r in rows), "a step was logged twice"
    return losses


def _final_weights(out: Path):
    return load_file(str(out / "checkpoints" / f"step-{STEPS:07d}" / "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8)), k


def _run_until(cmd, out: Path, step: int, sig: int, timeout=240):
    """Start a run, wait until metrics.jsonl shows `step`, then send `sig`; return the process result."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    t0 = time.time()
    try:
        while time.time() - t0 < timeout:
            path = out / "metrics.jsonl"
            if path.is_file() and any(f'"step": {step},' in line for line in path.read_text().splitlines()):
                os.kill(proc.pid, sig)
                break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    recipe, out = _recipe(tmp, "a")
    res = subprocess.run(_cmd(recipe), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    recipe, out = _recipe(tmp_path, "b")
    rc, err = _run_until(_cmd(recipe), out, 7, signal.SIGKILL)  # between the checkpoints at 5 and 10
    assert rc == -signal.SIGKILL, err[-2000:]
    assert not (out / "checkpoints" / f"step-{STEPS:07d}").exists()
    res = subprocess.run(_cmd(recipe), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "step-0000005" in res.stderr
    _assert_same_weights(_final_weights(uninterrupted), _final_weights(out))
    la, lb = _losses(uninterrupted), _losses(out)
    assert sorted(la) == sorted(lb) == list(range(1, STEPS + 1))
    assert all(la[s] == lb[s] for s in la), [(s, la[s], lb[s]) for s in la if la[s] != lb[s]]


def test_sigterm_checkpoints_at_the_step_reached_and_exits_0(uninterrupted, tmp_path):
    recipe, out = _recipe(tmp_path, "c")
    rc, err = _run_until(_cmd(recipe), out, 3, signal.SIGTERM)
    assert rc == 0, err[-3000:]
    assert "SIGTERM received" in err
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    stopped = int(ckpts[-1].split("-")[1])
    assert 3 <= stopped < STEPS, ckpts
    assert max(_losses(out)) == stopped  # the checkpoint is at the step reached
    res = subprocess.run(_cmd(recipe), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"step-{stopped:07d}" in res.stderr
    _assert_same_weights(_final_weights(uninterrupted), _final_weights(out))


def test_truncated_latest_checkpoint_falls_back_with_a_warning(uninterrupted, tmp_path):
    import shutil

    recipe, out = _recipe(tmp_path, "d")
    shutil.copytree(uninterrupted / "checkpoints", out / "checkpoints")
    latest = out / "checkpoints" / f"step-{STEPS:07d}"
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that filled up
    res = subprocess.run(_cmd(recipe, f"train.steps={STEPS + 1}"), capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"checkpoint {latest} cannot be read" in res.stderr
    assert "resuming from" in res.stderr and "step-0000010" in res.stderr


def test_sum_mode_shared_stream_resumes_bitwise_after_sigkill(tmp_path):
    # mixing: sum: both tasks share one stream (each item holds both tasks' batches), two updates of
    # gradient accumulation each: the data cursor must count items, not batches per task
    sections = dict(mixing="sum", data={"num_workers": 1}, train={"accumulate": 2})
    recipe_a, out_a = _recipe(tmp_path, "a", **sections)
    res = subprocess.run(_cmd(recipe_a), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    recipe_b, out_b = _recipe(tmp_path, "b", **sections)
    rc, err = _run_until(_cmd(recipe_b), out_b, 7, signal.SIGKILL)
    assert rc == -signal.SIGKILL, err[-2000:]
    res = subprocess.run(_cmd(recipe_b), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0 and "step-0000005" in res.stderr, res.stderr[-3000:]
    _assert_same_weights(_final_weights(out_a), _final_weights(out_b))
    assert _losses(out_a) == _losses(out_b)
    data = torch.load(out_a / "checkpoints" / f"step-{STEPS:07d}" / "rank-00000.pt", weights_only=True)["data"]
    assert list(data["loaders"]) == ["mlm+itm"] and data["loaders"]["mlm+itm"]["taken"] == 2 * STEPS


# "device": the fused AdamW skips the update on the device; "host": without a fused kernel (as under
# FSDP), the trainer reads the gradient norm and does not step (the plugin takes the kernel away)
NO_FUSED_KERNEL = ("import vlpt.train.trainer\n"
                   "vlpt.train.trainer.fused_supported = lambda *args, **kwargs: False\n")


@pytest.mark.parametrize("skipped_on", ["device", "host"])
def test_non_finite_losses_skip_updates_then_stop(tmp_path, skipped_on):
    # the loss is NaN at step 3 alone, finite at steps 4-6, then NaN from step 7 on (max_bad_steps 3)
    plugin = tmp_path / "nan_at.py"
    plugin.write_text(
        (NO_FUSED_KERNEL if skipped_on == "host" else "") +
        "import torch\n"
        "from vlpt import Objective, ObjectiveOutput, register_objective\n\n"
        "@register_objective('nan_at')\n"
        "class NanAt(Objective):\n"
        "    needs = {'text'}\n"
        "    def __init__(self, options, model, tokenizer):\n"
        "        super().__init__(options, model, tokenizer)\n"
        "        self.head = torch.nn.Linear(model.config.hidden_size, 1)\n"
        "        self.calls = 0\n"
        "    def forward(self, out, batch):\n"
        "        self.calls += 1\n"
        "        loss = self.head(out.pooled).pow(2).mean()\n"
        "        return ObjectiveOutput(loss * float('nan') if self.calls == 3 or self.calls >= 7 else loss)\n"
    )
    recipe = tiny_recipe(tmp_path, plugins=[str(plugin)], tasks={"mlm": {"weight": 0, "objectives": {"mlm": 1.0}},  # off: only the plugin's task
                                                           "itm": {"weight": 0, "objectives": {"itm": 1.0}},
                                                           "nan": {"weight": 1, "objectives": {"nan_at": 1.0}}},
                         train={"steps": 20, "max_bad_steps": 3}, checkpoint={"every": 1, "keep": 20},
                         eval={"at_end": False})
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe)], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert "stopping at step 9, task nan" in res.stderr and "train.max_bad_steps = 3" in res.stderr
    assert res.stderr.count("update skipped") == 3  # steps 3, 7 and 8
    rows = {r["step"]: r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == list(range(1, 9))
    assert [rows[s].get("bad_updates", 0) for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 2, 3]

    ckpt = tmp_path / "run" / "checkpoints"
    weights = {s: load_file(str(ckpt / f"step-{s:07d}" / "model.safetensors")) for s in range(2, 9)}
    adam_steps = {s: {i: float(v["step"]) for i, v in torch.load(ckpt / f"step-{s:07d}" / "trainer.pt",
                                                                   weights_only=True)["optimizer"]["state"].items()}
                  for s in range(2, 9)}
    assert all(torch.isfinite(w).all() for ws in weights.values() for w in ws.values())
    for skipped in (3, 7, 8):  # the NaN update was skipped, not applied: weights and Adam state as before
        _assert_same_weights(weights[skipped - 1], weights[skipped])
        assert adam_steps[skipped] == adam_steps[skipped - 1]
    for applied in (4, 5, 6):  # and training went on after it
        changed = [k for k in weights[applied] if not torch.equal(weights[applied][k], weights[applied - 1][k])]
        assert "objectives.nan_at.head.weight" in changed and any(k.startswith("vl.trunk.") for k in changed)
        assert all(adam_steps[applied][i] == adam_steps[applied - 1][i] + 1 for i in adam_steps[applied])


def _kill_all(marker: str) -> None:
    """SIGKILL every process whose command line names ``marker``: torchrun starts its ranks in their
    own sessions, so killing the launcher's process group would leave them running."""
    for pid in os.listdir("/proc"):
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if marker in cmdline and int(pid) != os.getpid():
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            continue


def _torchrun(recipe):
    return torchrun(2, "-m", "vlpt.cli", "train", str(recipe))


def test_two_ranks_kill_and_resume_match_uninterrupted(tmp_path):
    sections = dict(data={"num_workers": 1}, train={"steps": 10, "lr": 1e-3, "warmup": 2, "threads": 1},
                    checkpoint={"every": 4, "keep": 2})
    recipe_a, out_a = _recipe(tmp_path, "a", **sections)
    res = subprocess.run(_torchrun(recipe_a), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # every update trains the same task on both ranks: the weights are the same on both ranks at the end,
    # and rank 0 wrote one checkpoint folder per save with a state file for each rank
    final = out_a / "checkpoints" / "step-0000010"
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "rank-00000.pt", "rank-00001.pt",
                                                       "state.json", "trainer.pt"]
    r0, r1 = (torch.load(final / f"rank-0000{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["consumed"] == r1["consumed"] and sum(r0["consumed"].values()) == 10  # the same task each update
    assert torch.equal(r0["fingerprint"], r1["fingerprint"])  # the same weights on both ranks

    recipe_b, out_b = _recipe(tmp_path, "b", **sections)
    proc = subprocess.Popen(_torchrun(recipe_b), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    t0 = time.time()
    while time.time() - t0 < 240 and proc.poll() is None:
        path = out_b / "metrics.jsonl"
        if path.is_file() and '"step": 6,' in path.read_text():
            _kill_all(str(recipe_b))  # the whole job dies (launcher, ranks, data workers), as a node failure would do
            break
        time.sleep(0.02)
    proc.communicate(timeout=60)
    res = subprocess.run(_torchrun(recipe_b), capture_output=True, text=True, env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "step-0000004" in res.stderr
    wa = load_file(str(final / "model.safetensors"))
    wb = load_file(str(out_b / "checkpoints" / "step-0000010" / "model.safetensors"))
    _assert_same_weights(wa, wb)
    la, lb = _losses(out_a), _losses(out_b)
    assert la == lb
