"""Checkpoint retention for long runs: the newest `checkpoint.keep` plus every `checkpoint.keep_every`-th
as a milestone; a disk that fills up during a save leaves the previous checkpoint usable and stops the
run with one line (exit 2)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_recipe
from safetensors.torch import load_file

from vlpt.run_dir import step_name, to_prune


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _steps(paths) -> list[int]:
    return [int(Path(p).name.split("-")[1]) for p in paths]


@pytest.mark.parametrize("keep, keep_every, pruned", [
    (2, None, [1, 2, 3, 4, 5, 6, 7]),  # the newest two only
    (2, 4, [1, 2, 3, 5, 6, 7]),  # and steps 4 and 8 as milestones
    (3, 3, [1, 2, 4, 5]),
    (0, 4, []),  # keep 0: everything kept
    (20, 4, []),
])
def test_to_prune_keeps_newest_and_milestones(keep, keep_every, pruned):
    checkpoints = [Path("checkpoints") / step_name(s) for s in range(1, 10)]
    assert _steps(to_prune(checkpoints, keep, keep_every)) == pruned


def test_a_run_keeps_the_newest_and_every_nth(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"steps": 9, "threads": 1},
                         checkpoint={"every": 1, "keep": 2, "keep_every": 4}, eval={"at_end": False})
    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe)], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "step-0000004", "step-0000008", "step-0000009"]


# `vlpt train` on a disk that fills up while the weights of the checkpoint at step FULL_AT are written:
# part of the file lands, then the write fails with ENOSPC, as a real full disk does
FULL_DISK = '''
import errno, os, sys
import vlpt.train.checkpoint as checkpoint
from vlpt.cli import main

real_save_file = checkpoint.save_file

def save_file(state, path, metadata=None):
    if (metadata or {}).get("step") == os.environ["FULL_AT"]:
        with open(path, "wb") as f:
            f.write(bytes(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    return real_save_file(state, path, metadata=metadata)

checkpoint.save_file = save_file
sys.exit(main(sys.argv[1:]))
'''


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_with_one_line(tmp_path):
    from vlpt.train.checkpoint import readable

    driver = tmp_path / "full_disk.py"
    driver.write_text(FULL_DISK)
    recipe = tiny_recipe(tmp_path, train={"steps": 6, "threads": 1}, checkpoint={"every": 2, "keep": 3},
                         eval={"at_end": False})
    res = subprocess.run([sys.executable, str(driver), "train", str(recipe)], capture_output=True, text=True,
                         env={**_env(), "FULL_AT": "4"}, timeout=300)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if "error" in line]
    assert errors == [res.stderr.strip().splitlines()[-1]]  # one line, the last
    assert errors[0].startswith("vlpt: error: cannot write the checkpoint of step 4 in ")
    assert "No space left on device" in errors[0] and "step-0000002, is intact" in errors[0]

    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002"]  # the half-written one was removed
    assert readable(root / "step-0000002", 0) is None
    assert load_file(str(root / "step-0000002" / "model.safetensors"))

    res = subprocess.run([sys.executable, "-m", "vlpt.cli", "train", str(recipe)], capture_output=True, text=True,
                         env=_env(), timeout=300)  # space freed: the same command resumes
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr and "step-0000002" in res.stderr
    assert (root / "step-0000006").is_dir()
