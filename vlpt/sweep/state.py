"""Where a variant stands, read from its run folders (:class:`vlpt.run_dir.RunDir`) alone, and the
writing of each stage's resolved recipe into its folder.

A stage is finished when its ``done.json``, which the trainer writes when a run reaches
``train.steps``, says so (:meth:`RunDir.finished`); nothing else counts.
"""
from __future__ import annotations

import sys
from typing import Any

import yaml

from ..init_from import SIZE_KEYS
from ..recipe import to_dict
from .spec import Stage, Variant


def stage_state(stage: Stage) -> str:
    return stage.run.state(stage.recipe.train.steps)


def variant_state(v: Variant) -> str:
    """``finished``, the pretraining's state, or ``pretrained; <stage> <its state>`` for the first
    later stage that is not finished."""
    for stage in v.stages:
        state = stage_state(stage)
        if state != "finished":
            return state if stage is v.pretrain else f"pretrained; {stage.label} {state}"
    return "finished"


#: recipe keys whose change gives a model of other weights: a checkpoint of the old one cannot resume
WEIGHT_KEYS = tuple(f"model.{k}" for k in SIZE_KEYS) + ("model.init_heads",)


def changes_weights(key: str) -> bool:
    """Whether a changed recipe key adds or removes weights: a model size, or a task or objective
    added or removed (``tasks.<t>``, ``tasks.<t>.objectives``, ``tasks.<t>.objectives.<o>``)."""
    parts = key.split(".")
    if parts[0] == "tasks":
        return len(parts) <= 2 or (parts[2] == "objectives" and len(parts) <= 4)
    return key in WEIGHT_KEYS or any(key.startswith(k + ".") for k in WEIGHT_KEYS)


def write_recipe(stage: Stage) -> bool:
    """The resolved recipe into the stage's folder; a note when it differs from the one a run used
    (a finished run keeps the recipe it really used). False when the stage cannot run: an unfinished
    run whose checkpoint holds another model than the new recipe builds."""
    run = stage.run
    run.path.mkdir(parents=True, exist_ok=True)
    new = to_dict(stage.recipe)
    finished = stage.finished()
    if run.recipe.is_file() and (finished or run.latest_step() is not None):
        try:
            old = yaml.safe_load(run.recipe.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        changed = changed_keys(old, new)
        if changed:
            what = ", ".join(changed[:5]) + (" …" if len(changed) > 5 else "")
            head = f"vlpt sweep: note: {run.path} was started with another recipe (changed: {what})"
            if finished:
                print(f"{head}; it is finished: delete the folder to run it again", file=sys.stderr)
            elif any(changes_weights(k) for k in changed):
                print(f"{head}; its checkpoint holds another model, so it cannot resume: delete the folder to "
                      "run it with this recipe, or restore the recipe", file=sys.stderr)
                return False
            else:
                print(f"{head}; it resumes from its checkpoint", file=sys.stderr)
    if finished:
        return True  # a finished run keeps the recipe it really used
    run.recipe.write_text(yaml.safe_dump(new, sort_keys=False))
    return True


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two recipe mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]
