"""Checkpoints: ``checkpoints/step-NNNNNNN/`` with ``model.safetensors`` holding every weight.

Training state (optimizer, schedule, step) sits beside it in ``trainer.pt``,
loaded with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
A checkpoint is written to a temporary folder and renamed, so a crash never
leaves a half-written ``step-*`` folder behind.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STEP_RE = re.compile(r"^step-(\d{7,})$")


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def step_of(ckpt: Path) -> int:
    return int(STEP_RE.match(ckpt.name).group(1))


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    extra: dict | None = None, keep: int | None = None) -> Path:
    root = Path(output_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(step)})
    if optimizer is not None:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict() if scheduler else None},
                   tmp / "trainer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep is not None and keep > 0:
        for old in checkpoint_dirs(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_model_weights(model: torch.nn.Module, ckpt: str | Path, strict: bool = True) -> None:
    state = load_file(str(Path(ckpt) / "model.safetensors"))
    model.load_state_dict(state, strict=strict)


def load_trainer_state(ckpt: str | Path) -> dict | None:
    path = Path(ckpt) / "trainer.pt"
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state(ckpt: str | Path) -> dict:
    return json.loads((Path(ckpt) / "state.json").read_text())
