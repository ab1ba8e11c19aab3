"""The run folder: what a run writes into ``output_dir``, under which names, and how to read it back.

One module owns the layout so that the trainer, ``vlpt eval``/``export``, ``vlpt plot``,
``vlpt sweep`` and ``vlpt report`` agree on it (and it imports no torch, so the sweep and the
report stay light)::

    output_dir/
      recipe.yaml            the fully resolved recipe
      tokenizer.json         the tokenizer the run used
      metrics.jsonl          one JSON object per logged step (and per evaluation)
      eval.json              the latest evaluation, flat keys
      done.json              written by the trainer when the run has reached train.steps
      checkpoints/step-NNNNNNN/
        model.safetensors    every weight (DDP and one-process runs)
        sharded/             instead, in sharded (FSDP) runs: every rank's slices of the weights
                             and optimizer state (torch.distributed.checkpoint's format)
        trainer.pt           optimizer (not in sharded runs), schedule, grad scaler
        state.json           step, data cursor, counters
        rank-NNNNN.pt        per process: RNG states, bad-sample counts

``done.json`` is the completion marker: a run is finished when it exists and names a step at least
the recipe's ``train.steps``. A run stopped by a signal, killed, or extended to more steps is not.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from .errors import UserError

RECIPE = "recipe.yaml"
METRICS = "metrics.jsonl"
EVAL = "eval.json"
DONE = "done.json"
TOKENIZER = "tokenizer.json"  # the run's tokenizer, so a finetune or export never looks for the data
CHECKPOINTS = "checkpoints"
TRAIN_LOG = "train.log"  # where a sweep's local launcher copies a run's console output

# inside a checkpoint folder
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
STATE = "state.json"
SHARDED = "sharded"  # a folder: torch.distributed.checkpoint's files
SHARDED_INDEX = ".metadata"  # written last by torch.distributed.checkpoint: the folder is complete

STEP_RE = re.compile(r"^step-(\d{7,})$")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def has_weights(path: str | Path) -> bool:
    """The folder holds a checkpoint's weights: ``model.safetensors``, or a sharded run's ``sharded/``."""
    p = Path(path)
    return (p / WEIGHTS).is_file() or (p / SHARDED / SHARDED_INDEX).is_file()


def is_checkpoint(path: str | Path) -> bool:
    """A finished checkpoint folder (``step-NNNNNNN`` holding its weights)."""
    p = Path(path)
    return bool(STEP_RE.match(p.name)) and has_weights(p)


def to_prune(checkpoints: list[Path], keep: int | None, keep_every: int | None = None) -> list[Path]:
    """The checkpoints (oldest first) that retention removes: all but the newest ``keep``, except
    milestones, whose step is a multiple of ``keep_every``. ``keep`` None or 0 keeps everything."""
    if not keep or keep <= 0:
        return []
    old = checkpoints[:-keep]
    if keep_every:
        old = [c for c in old if step_of(c) % keep_every]
    return old


def step_of(checkpoint: str | Path) -> int:
    return int(STEP_RE.match(Path(checkpoint).name).group(1))


def read_json(path: str | Path) -> dict | None:
    """A JSON object from ``path``, or None when it is missing or unreadable (a write cut short)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class RunDir:
    """A run's ``output_dir`` (it need not exist yet)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def recipe(self) -> Path:
        return self.path / RECIPE

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def eval(self) -> Path:
        return self.path / EVAL

    @property
    def done(self) -> Path:
        return self.path / DONE

    @property
    def train_log(self) -> Path:
        return self.path / TRAIN_LOG

    @property
    def checkpoint_root(self) -> Path:
        return self.path / CHECKPOINTS

    # -- checkpoints -------------------------------------------------------------------
    def checkpoint(self, step: int) -> Path:
        return self.checkpoint_root / step_name(step)

    def staging(self, step: int) -> Path:
        """The temporary folder a checkpoint is written into before it is renamed to ``step-*``."""
        return self.checkpoint_root / f".tmp-{step_name(step)}"

    def checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first."""
        root = self.checkpoint_root
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def latest_step(self) -> int | None:
        latest = self.latest_checkpoint()
        return None if latest is None else step_of(latest)

    # -- results -----------------------------------------------------------------------
    def read_eval(self) -> dict | None:
        return read_json(self.eval)

    def write_eval(self, result: dict[str, Any]) -> None:
        self.eval.write_text(json.dumps(result, indent=2) + "\n")

    def read_done(self) -> dict | None:
        return read_json(self.done)

    def finished(self, steps: int) -> bool:
        """The trainer marked the run done at ``steps`` or later."""
        done = self.read_done()
        return bool(done) and int(done.get("step", done.get("steps", -1))) >= steps  # "steps": older sweeps

    def mark_done(self, step: int, wall_s: float | None = None, **extra: Any) -> None:
        """The completion marker (main process only), with where and how long the run trained."""
        record = {"step": step, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "wall_s": None if wall_s is None else round(wall_s, 1), "host": socket.gethostname(),
                  "cpus": os.cpu_count(), "loadavg": _loadavg(), **extra}
        tmp = self.done.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(self.done)

    def clear_done(self) -> None:
        self.done.unlink(missing_ok=True)

    def state(self, steps: int) -> str:
        """One phrase for listings: finished, partial (step s of n), started, not started."""
        if self.finished(steps):
            return "finished"
        step = self.latest_step()
        if step is not None:
            return f"partial (step {step} of {steps})"
        return "started, no checkpoint yet" if self.metrics.is_file() else "not started"

    # -- logs --------------------------------------------------------------------------
    def truncate_metrics(self, step: int) -> None:
        """Drop ``metrics.jsonl`` lines past ``step`` (a resumed run logs those steps again) and any
        line cut short by a kill."""
        if not self.metrics.is_file():
            return
        keep = []
        for line in self.metrics.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except (json.JSONDecodeError, AttributeError):
                pass
        self.metrics.write_text("".join(line + "\n" for line in keep))

    def clear_outputs(self) -> None:
        """Remove what a previous run wrote (``--no-resume --force``); the recipe is rewritten anyway."""
        for p in (self.checkpoint_root, self.metrics, self.eval, self.done):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)


def locate(path: str | Path, checkpoint: str | Path | None = None) -> tuple[RunDir, Path]:
    """(run folder, checkpoint folder) from a run folder (its latest checkpoint, or ``checkpoint``)
    or from a checkpoint folder itself; a user error naming the reason otherwise."""
    p = Path(path)
    if is_checkpoint(p):
        return RunDir(p.parent.parent), p
    run = RunDir(p)
    if not p.exists():
        raise UserError(f"'{path}' not found")
    if not run.recipe.is_file():
        raise UserError(f"'{path}' is neither a run folder (no {RECIPE}) nor a checkpoint folder")
    if checkpoint is not None:
        c = Path(checkpoint)
        if not has_weights(c):
            raise UserError(f"checkpoint '{checkpoint}' has no weights ({WEIGHTS} or {SHARDED}/)")
        return run, c
    latest = run.latest_checkpoint()
    if latest is None:
        raise UserError(f"run '{path}' has no checkpoints yet")
    return run, latest
