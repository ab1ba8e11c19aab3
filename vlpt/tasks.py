"""Tasks: the units the trainer mixes, from the recipe to the model's forward pass.

A *task* is one prepared batch, one trunk forward pass and one or more weighted objectives on it
(UNITER's ITM task carries WRA on the same forward). This module is its one home:

* :class:`TaskSpec` — a task resolved against the registry, with what its objectives need computed
  once: the modalities its samples must carry, the sample fields they read, the pad value of every
  batch field they add, whether ``prepare`` needs a pool of other samples;
* :func:`resolve_tasks` — the recipe's ``tasks:`` section to specs, with every check that needs no
  data (unknown objectives, options, companions, the order of values shared within a task);
* :class:`TaskPipeline` — the worker-side half: prepare one sample for all the task's objectives;
* :class:`PretrainModel` — the trunk and every objective's heads in one module (so DDP, checkpoints
  and optimizers see one), whose ``forward`` runs one task on one batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import RecipeError, UserError
from .objective import Objective
from .recipe import Recipe, convert, from_dict

#: recent clean samples kept for objectives that draw from a pool (ITM's negatives)
POOL_SIZE = 64


@dataclass
class ObjectiveSpec:
    """One objective inside a task, resolved against the registry."""

    name: str
    cls: type[Objective]
    weight: float
    options: Any


@dataclass
class TaskSpec:
    """A task with its objectives in recipe order (the order ``prepare`` and ``forward`` run in)."""

    name: str
    weight: float
    objectives: list[ObjectiveSpec]
    needs: frozenset[str] = field(init=False)  # modalities every sample must carry
    sample_fields: dict[str, str] = field(init=False)  # field a sample must carry -> the objective reading it
    pad_values: dict[str, Any] = field(init=False)  # batch field -> its padding value
    wants_pool: bool = field(init=False)

    def __post_init__(self):
        self.needs = frozenset().union(*(o.cls.needs for o in self.objectives))
        self.sample_fields = {f: o.name for o in self.objectives for f in o.cls.sample_fields}
        self.pad_values = merged_pad_values([self])
        self.wants_pool = any(o.cls.wants_pool for o in self.objectives)

    @property
    def pool_size(self) -> int:
        return POOL_SIZE if self.wants_pool else 0

    @property
    def objective_names(self) -> str:
        return ", ".join(o.name for o in self.objectives)


def merged_pad_values(tasks: list[TaskSpec]) -> dict[str, Any]:
    """The pad value of every batch field the tasks' objectives add (evaluation collates them all)."""
    out: dict[str, Any] = {}
    for task in tasks:
        for o in task.objectives:
            out.update(o.cls.pad_values)
    return out


# --------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------


def objective_spec(tname: str, oname: str, value: Any) -> ObjectiveSpec:
    from .registry import get_objective

    path = f"tasks.{tname}.objectives.{oname}"
    try:
        cls = get_objective(oname)
    except UserError as e:  # unknown name: say where the recipe names it
        raise RecipeError(f"recipe key '{path}': {e}") from None
    if isinstance(value, dict):
        value = dict(value)
        weight = convert(float, value.pop("weight", 1.0), f"{path}.weight")
        options = from_dict(cls.Options, value, path, also=("weight",))
    else:
        weight = convert(float, value, path)
        options = cls.Options()
    return ObjectiveSpec(oname, cls, weight, options)


def check_task(task: TaskSpec) -> None:
    """What the objectives of one task promise each other, checked before training.

    * ``requires``: objectives that must share the task;
    * shared values: each value an objective ``uses`` is ``provided`` by one before it;
    * pairs: an objective that needs matched image-text pairs shares no task with one that swaps
      images in ``prepare``;
    * the objectives' own ``check_task`` hooks.
    """
    names = [o.name for o in task.objectives]
    where = f"recipe key 'tasks.{task.name}.objectives"
    for o in task.objectives:
        missing = [r for r in o.cls.requires if r not in names]
        if missing:
            raise RecipeError(f"{where}': '{o.name}' needs {missing} in the same task "
                              f"(e.g. tasks.{task.name}.objectives: {{{', '.join([*missing, o.name])}}})")
    provided: dict[str, str] = {}
    for i, o in enumerate(task.objectives):
        for value in o.cls.used(o.options):
            if value not in provided:
                raise RecipeError(f"{where}.{o.name}': {o.name} uses '{value}', which "
                                  f"{_provider_hint(task, i, value)}")
        for value in o.cls.provided(o.options):
            provided[value] = o.name
    swapping = [o.name for o in task.objectives if o.cls.swaps_images(o.options)]
    for o in task.objectives:
        if o.cls.needs_matched_pairs and swapping:
            raise RecipeError(f"{where}.{o.name}': {o.name} needs matched image-text pairs, but {swapping[0]} in the "
                              f"same task pairs captions with other images; give {o.name} a task of its own")
    listed = [(o.name, o.options) for o in task.objectives]
    for o in task.objectives:
        problem = o.cls.check_task(o.options, listed)
        if problem:
            raise RecipeError(f"{where}.{o.name}': {problem}")


def _provider_hint(task: TaskSpec, index: int, value: str) -> str:
    """Why ``value`` is not there for objective ``index`` of ``task``, naming who provides it."""
    later = [o.name for o in task.objectives[index + 1:] if value in o.cls.provided(o.options)]
    if later:
        return f"{later[0]} provides only after it: put {later[0]} before {task.objectives[index].name}"
    from .registry import registered_objectives

    others = [name for name, cls in registered_objectives().items() if value in cls.provides]
    if others:
        me = task.objectives[index].name
        return (f"no objective before it in task '{task.name}' provides ({others[0]} does: put {others[0]} before "
                f"{me}, e.g. tasks.{task.name}.objectives: {{{others[0]}: 1.0, {me}: ...}})")
    return f"no objective before it in task '{task.name}' provides, and no registered objective does"


def resolve_tasks(recipe: Recipe) -> list[TaskSpec]:
    """Load the recipe's plugins, look up each task's objectives, type-check their options and check
    each task (:func:`check_task`). A task of weight 0 under ``mixing: sample`` is switched off."""
    from .registry import load_plugin

    base = Path(recipe.source).parent if recipe.source else None
    for spec in recipe.plugins:
        load_plugin(spec, base)
    if not recipe.tasks:
        raise RecipeError("recipe key 'tasks' is empty: name at least one task with objectives")
    out = []
    for tname, task in recipe.tasks.items():
        if task.weight == 0 and recipe.mixing == "sample":
            continue  # switched off: built nowhere, never drawn
        if not task.objectives:
            raise RecipeError(f"recipe key 'tasks.{tname}.objectives' is empty")
        if task.weight < 0:
            raise RecipeError(f"recipe key 'tasks.{tname}.weight' must be >= 0, got {task.weight}")
        spec = TaskSpec(tname, task.weight, [objective_spec(tname, o, v) for o, v in task.objectives.items()])
        check_task(spec)
        out.append(spec)
    if not out or sum(t.weight for t in out) <= 0:
        raise RecipeError("recipe key 'tasks': every task has weight 0")
    return out


# --------------------------------------------------------------------------------------
# the worker side and the model side
# --------------------------------------------------------------------------------------


@dataclass
class TaskPipeline:
    """The worker-side half of a task: prepare a sample for all its objectives, in order."""

    objectives: list[Objective]

    def __call__(self, sample: dict, rng: np.random.Generator, pool=None) -> dict:
        for obj in self.objectives:
            sample = obj.prepare(sample, rng, pool)
        return sample


class PretrainModel(nn.Module):
    """The trunk (``vl``) and every objective's heads (``objectives.<name>``), one per name."""

    def __init__(self, vl: nn.Module, tasks: list[TaskSpec], tokenizer):
        super().__init__()
        self.vl = vl
        self.objectives = nn.ModuleDict()
        options: dict[str, Any] = {}
        for task in tasks:
            for spec in task.objectives:
                if spec.name in options:
                    if options[spec.name] != spec.options:
                        raise RecipeError(
                            f"recipe key 'tasks.{task.name}.objectives.{spec.name}': objective '{spec.name}' "
                            "appears in several tasks with different options (its heads are shared)"
                        )
                    continue
                options[spec.name] = spec.options
                self.objectives[spec.name] = spec.cls(spec.options, vl, tokenizer)
        self.tasks = {t.name: t for t in tasks}
        #: tasks with an objective that reads every final state (Objective.needs_all_states)
        self.whole_last_layer = {t.name for t in tasks
                                 if any(self.objectives[s.name].needs_all_states for s in t.objectives)}

    def pipeline(self, task: str) -> TaskPipeline:
        return TaskPipeline([self.objectives[s.name] for s in self.tasks[task].objectives])

    def forward(self, task: str, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """One task's weighted loss on one batch, with per-objective metrics (detached tensors or floats)."""
        out = self.vl(batch)  # out.shared: what the task's objectives leave for the ones after them
        if task in self.whole_last_layer:
            out.hidden  # noqa: B018  (the last layer on every position now; see Objective.needs_all_states)
        total = None
        metrics: dict[str, torch.Tensor | float] = {}
        for spec in self.tasks[task].objectives:
            res = self.objectives[spec.name](out, batch)
            weighted = spec.weight * res.loss
            total = weighted if total is None else total + weighted
            metrics[f"{spec.name}/loss"] = res.loss.detach()
            for k, v in res.metrics.items():
                metrics[f"{spec.name}/{k}"] = v.detach() if torch.is_tensor(v) else v
        return total, metrics
