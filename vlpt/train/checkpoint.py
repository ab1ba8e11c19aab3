"""Checkpoints: ``checkpoints/step-NNNNNNN/`` with ``model.safetensors`` holding every weight.

Beside it: ``trainer.pt`` (optimizer, schedule, grad scaler), ``state.json``
(step, batches consumed per task: the data cursor) and one ``rank-NNNNN.pt``
per process (its RNG states and bad-sample counts), all loaded with
safetensors or ``torch.load(weights_only=True)``: a checkpoint is data, never
code. A checkpoint is staged in a temporary folder (every rank writes its file
there) and renamed by the main process, so a crash never leaves a half-written
``step-*`` folder behind; a latest checkpoint that cannot be read anyway (a
truncated file on a full disk, say) is skipped for the one before it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..run_dir import STATE, TRAINER_STATE, WEIGHTS, RunDir, rank_file_name


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    return RunDir(output_dir).checkpoints()


def staging_dir(output_dir: str | Path, step: int, fresh: bool = True) -> Path:
    """The temporary folder a checkpoint is written into before it is renamed to ``step-*``."""
    tmp = RunDir(output_dir).staging(step)
    if fresh:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    return tmp


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / rank_file_name(rank)


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    extra: dict | None = None, keep: int | None = None, staged: bool = False,
                    scaler=None) -> Path:
    """Write ``step-NNNNNNN``; with ``staged``, other ranks have already put their files in :func:`staging_dir`."""
    run = RunDir(output_dir)
    run.checkpoint_root.mkdir(parents=True, exist_ok=True)
    final = run.checkpoint(step)
    tmp = staging_dir(output_dir, step, fresh=not staged)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(step)})
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                    "scaler": scaler.state_dict() if scaler is not None else None},
                   tmp / TRAINER_STATE)
    (tmp / STATE).write_text(json.dumps({"step": step, **(extra or {})}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep is not None and keep > 0:
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_weights(model: torch.nn.Module, ckpt: str | Path, strict: bool = True) -> None:
    state = load_file(str(Path(ckpt) / WEIGHTS))
    model.load_state_dict(state, strict=strict)


def load_trainer_state(ckpt: str | Path) -> dict | None:
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text())


def load_rank_state(ckpt: str | Path, rank: int) -> dict | None:
    path = rank_file(Path(ckpt), rank)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def readable(ckpt: Path, rank: int) -> str | None:
    """Why ``ckpt`` cannot be resumed from on ``rank`` (None if it can), without loading it twice:
    the weights' header must match the file's size, the other files' checksums must hold."""
    import zipfile

    from safetensors import safe_open

    try:
        state = read_state(ckpt)
        int(state["step"])
        with safe_open(str(ckpt / WEIGHTS), framework="pt"):  # checks the header against the file size
            pass
        for path in (ckpt / TRAINER_STATE, rank_file(ckpt, rank)):
            if path.is_file():
                with zipfile.ZipFile(path) as z:  # torch.save writes a zip: CRCs without unpickling twice
                    bad = z.testzip()
                if bad is not None:
                    raise ValueError(f"{path.name}: {bad} is corrupt")
    except Exception as e:  # a truncated or missing file shows up as any of several errors
        return f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return None
