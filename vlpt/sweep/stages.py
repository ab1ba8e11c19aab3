"""The stages after a variant's pretraining: a common ``finetune:`` and the ``downstream:`` tasks.

Each is a recipe of its own, trained in a folder below the variant's (``finetune/``,
``downstream/<task>/``) with the variant's ``model`` section and ``seed``, and started from the
variant's pretrained run through ``model.init_from`` (the encoder; with ``carry: all`` also
``model.init_heads``: the heads whose names and shapes match), so no weights are moved by the
sweep itself. The variant's folder does not exist yet when the sweep validates every stage up
front: a stage is validated without ``init_from``, and the recipe it is written with names it.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..recipe import to_dict
from .spec import NAME_OK, PRETRAIN, Stage, apply, build_recipe, check_keys, load_recipe_raw, mapping, resolve_path

FINETUNE_KEYS = ("recipe", "overrides", "carry")
DOWNSTREAM_KEYS = ("recipe", "overrides", "carry", "metrics")
CARRY = ("encoder", "all")


@dataclass
class LaterStageSpec:
    """One stage every variant trains after its pretraining."""

    label: str  # "finetune" or "downstream/<task>": also its folder below the variant's
    raw: dict  # the stage's recipe with its overrides applied
    carry: str  # "encoder" or "all"
    metrics: list[str] = field(default_factory=list)  # downstream: the metrics Meta-Sum adds

    def stage(self, pre: Stage, where: str, check_data: bool) -> Stage:
        """This stage for the variant whose pretraining is ``pre``."""
        raw = copy.deepcopy(self.raw)
        raw["model"] = {**to_dict(pre.recipe.model), "init_from": None, "init_heads": self.carry == "all"}
        raw["seed"] = pre.recipe.seed
        run_dir = pre.run_dir / self.label
        recipe = build_recipe(raw, where, run_dir, check_data)
        recipe.model.init_from = str(pre.run_dir)  # the pretraining makes the folder: checked when the stage runs
        return Stage(self.label, recipe, run_dir, list(self.metrics))


def _spec(label: str, section: dict, where: str, allowed: tuple, here: Path, base_path: Path) -> LaterStageSpec:
    check_keys(section, allowed, where)
    recipe_path = resolve_path(section["recipe"], here) if section.get("recipe") else base_path
    if not recipe_path.is_file():
        raise UserError(f"sweep key '{where}.recipe': recipe '{section['recipe']}' not found"
                        + ("" if Path(section["recipe"]).expanduser().is_absolute() else f" (looked in {here})"))
    raw = apply(load_recipe_raw(recipe_path, f"{where}.recipe"), mapping(section.get("overrides"), f"{where}.overrides"),
                f"sweep key '{where}.overrides'")
    carry = section.get("carry", "encoder")
    if carry not in CARRY:
        raise UserError(f"sweep key '{where}.carry' must be 'encoder' or 'all', got {carry!r}")
    return LaterStageSpec(label, raw, carry)


def later_stage_specs(data: dict, here: Path, base_path: Path) -> list[LaterStageSpec]:
    """The sweep file's ``finetune:`` (at most one) and ``downstream:`` tasks, in that order."""
    specs = []
    if data.get("finetune") is not None:
        specs.append(_spec("finetune", mapping(data["finetune"], "finetune"), "finetune", FINETUNE_KEYS, here,
                           base_path))
    for task, section in mapping(data.get("downstream"), "downstream").items():
        where = f"downstream.{task}"
        if not isinstance(task, str) or not NAME_OK.match(task) or task == PRETRAIN:
            raise UserError(f"sweep key '{where}': a downstream task's name uses letters, digits and ._=+- only "
                            f"(and is not '{PRETRAIN}')")
        section = mapping(section, where)
        spec = _spec(f"downstream/{task}", section, where, DOWNSTREAM_KEYS, here, base_path)
        metrics = section.get("metrics")
        if not (isinstance(metrics, list) and metrics and all(isinstance(m, str) for m in metrics)):
            raise UserError(f"sweep key '{where}.metrics' must be a non-empty list of the task's eval.json metrics "
                            "(the ones Meta-Sum adds)")
        spec.metrics = list(metrics)
        specs.append(spec)
    return specs
