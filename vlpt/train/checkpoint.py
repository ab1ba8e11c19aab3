"""Checkpoints: ``checkpoints/step-NNNNNNN/`` with ``model.safetensors`` holding every weight.

Beside it: ``trainer.pt`` (optimizer, schedule, grad scaler), ``state.json``
(step, batches taken per task, the readers' layout) and one ``rank-NNNNN.pt``
per process (its RNG states, bad-sample counts and its readers' positions: the
data cursor, see ``docs/resume.md``), all loaded with
safetensors or ``torch.load(weights_only=True)``: a checkpoint is data, never
code. A sharded (FSDP) run writes ``sharded/`` instead of ``model.safetensors``
and the optimizer (:mod:`vlpt.train.sharded`); everything that reads weights
goes through :func:`read_weights`, which takes either.

A checkpoint is staged in a temporary folder (every rank writes its file
there) and renamed by the main process, so a crash or a full disk never leaves
a half-written ``step-*`` folder behind; a latest checkpoint that cannot be
read anyway (a file truncated by other means) is skipped for the one before it.
Retention keeps the newest ``checkpoint.keep`` and every ``checkpoint.keep_every``-th
(:func:`vlpt.run_dir.to_prune`), and prunes only after the new one is in place.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..run_dir import SHARDED, STATE, TRAINER_STATE, WEIGHTS, RunDir, rank_file_name, to_prune


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


def discard_staging(output_dir: str | Path, step: int) -> None:
    """Remove a staged checkpoint that could not be finished (a full disk): the space is needed."""
    shutil.rmtree(RunDir(output_dir).staging(step), ignore_errors=True)


def write_errno(write) -> int:
    """0 when ``write()`` succeeds (or ``write`` is None); else the errno of the OSError it raised,
    also from inside torch.distributed.checkpoint, which hands a failure on any rank to every rank."""
    from torch.distributed.checkpoint.api import CheckpointException

    if write is None:
        return 0
    try:
        write()
    except OSError as e:
        return e.errno or errno.EIO
    except CheckpointException as e:
        causes = [f[0] if isinstance(f, tuple) else f for f in e.failures.values()]  # (exception, traceback)
        if not all(isinstance(c, OSError) for c in causes):
            raise
        return next((c.errno for c in causes if c.errno), errno.EIO)
    return 0


def write_or_stop(accelerator, output_dir: str | Path, step: int, write) -> None:
    """Run this rank's part of a save (``write``; None or False: nothing here). When it fails with an
    OSError on any rank (a full disk), every rank stops with the same one-line error, the staged
    folder removed; the checkpoints before it stay as they were. Collective: every rank calls it."""
    failed = write_errno(write or None)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        flag = torch.tensor([failed], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = int(flag.item())
    if not failed:
        return
    run = RunDir(output_dir)
    if accelerator.is_main_process:
        discard_staging(output_dir, step)
    kept = [p.name for p in run.checkpoints()]
    before = f"the latest checkpoint, {kept[-1]}, is intact" if kept else "no earlier checkpoint exists"
    raise UserError(f"cannot write the checkpoint of step {step} in {run.checkpoint_root} ({os.strerror(failed)}): "
                    f"training stopped; {before}; free space, then run the same command to resume")


def weights_fingerprint(parameters) -> torch.Tensor:
    """Sum and sum of squares of every weight, in float64: ranks holding the same weights write the
    same numbers, so replicas that drifted apart show up by comparing the rank files (a sharded
    run: of this rank's slices)."""
    from .sharded import local_part

    with torch.no_grad():
        parts = [torch.stack([w.double().sum(), w.double().pow(2).sum()]) for w in map(local_part, parameters)]
    return torch.stack(parts).cpu()


def check_same_kind(ckpt: Path, sharded: bool) -> None:
    """A sharded run resumes from sharded checkpoints only, an unsharded run from unsharded ones."""
    if is_sharded_checkpoint(ckpt) == bool(sharded):
        return
    kinds = ["an unsharded (DDP or one-process)", "a sharded (FSDP)"]
    wrote, runs = kinds[is_sharded_checkpoint(ckpt)], kinds[bool(sharded)]
    raise UserError(f"{ckpt} was written by {wrote} run and this is {runs} run: resume with the launch config "
                    "that wrote it, or start from its weights with model.init_from")


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / rank_file_name(rank)


def save_checkpoint(output_dir: str | Path, step: int, model: torch.nn.Module | None, optimizer=None,
                    scheduler=None, extra: dict | None = None, keep: int | None = None, staged: bool = False,
                    scaler=None, keep_every: int | None = None) -> Path:
    """Write ``step-NNNNNNN``; with ``staged``, other ranks have already put their files in :func:`staging_dir`
    (a sharded run: its weights and optimizer, so ``model`` and ``optimizer`` are None)."""
    run = RunDir(output_dir)
    run.checkpoint_root.mkdir(parents=True, exist_ok=True)
    final = run.checkpoint(step)
    tmp = staging_dir(output_dir, step, fresh=not staged)
    if model is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt", "step": str(step)})
    if optimizer is not None or scheduler is not None:
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "scheduler": scheduler.state_dict() if scheduler else None,
                    "scaler": scaler.state_dict() if scaler is not None else None},
                   tmp / TRAINER_STATE)
    (tmp / STATE).write_text(json.dumps({"step": step, **(extra or {})}, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in to_prune(checkpoint_dirs(output_dir), keep, keep_every):
        shutil.rmtree(old, ignore_errors=True)
    return final


def is_sharded_checkpoint(ckpt: str | Path) -> bool:
    return (Path(ckpt) / SHARDED).is_dir() and not (Path(ckpt) / WEIGHTS).is_file()


def read_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every weight of a checkpoint, whole, in this process: ``model.safetensors``, or a sharded
    run's slices put together."""
    if is_sharded_checkpoint(ckpt):
        from .sharded import read_model_state

        return read_model_state(ckpt)
    return load_file(str(Path(ckpt) / WEIGHTS))


def load_model_weights(model: torch.nn.Module, ckpt: str | Path, strict: bool = True) -> None:
    """The checkpoint's weights into ``model``; with ``strict``, a checkpoint of another model (other
    sizes, other tasks or objectives: the recipe changed since it was saved) is one line, not torch's
    list of every key."""
    weights = read_weights(ckpt)
    if strict:
        check_same_model(model.state_dict(), weights, ckpt)
    model.load_state_dict(weights, strict=strict)


def check_same_model(own: dict, weights: dict, ckpt: str | Path) -> None:
    """A :class:`UserError` naming one weight of each kind of mismatch between a model's state
    (``own``) and a checkpoint's: other shape, missing from the checkpoint, not in the model."""
    wrong = [k for k in own if k in weights and tuple(own[k].shape) != tuple(weights[k].shape)]
    missing = [k for k in own if k not in weights]
    extra = [k for k in weights if k not in own]
    if not (wrong or missing or extra):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} weight(s) of other shapes (e.g. {k}: {tuple(weights[k].shape)} saved, "
                     f"{tuple(own[k].shape)} now)")
    if missing:
        parts.append(f"{len(missing)} this recipe's model has and the checkpoint lacks (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} the checkpoint has and this recipe's model lacks (e.g. {extra[0]})")
    raise UserError(f"checkpoint '{ckpt}' holds another model than this recipe builds: {'; '.join(parts)}. "
                    "Use the recipe it was trained with (model sizes, tasks and objectives), or another output_dir")


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
        if is_sharded_checkpoint(ckpt):
            from .sharded import sharded_unreadable

            why = sharded_unreadable(ckpt / SHARDED)
            if why:
                return why
        else:
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
