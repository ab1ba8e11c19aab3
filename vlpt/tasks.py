"""Tasks and the pretraining model: the glue between objectives and the trunk.

A *task* is what the trainer mixes: one prepared batch, one trunk forward pass,
one or more weighted objectives on it (UNITER's ITM task carries WRA on the same
forward). :class:`PretrainModel` owns the trunk (``vl``) and every objective's
heads (``objectives.<name>``), so DDP, checkpoints and optimizers see one module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import RecipeError
from .model import VLModel
from .objective import Objective
from .recipe import TaskSpec


class PretrainModel(nn.Module):
    def __init__(self, vl: VLModel, tasks: list[TaskSpec], tokenizer):
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

    def forward(self, task: str, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """One task's weighted loss on one batch, with per-objective metrics (detached tensors or floats)."""
        out = self.vl(batch)
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


@dataclass
class TaskPipeline:
    """The worker-side half of a task: prepare a sample for all its objectives."""

    objectives: list[Objective]

    def __call__(self, sample: dict, rng: np.random.Generator, pool=None) -> dict:
        for obj in self.objectives:
            sample = obj.prepare(sample, rng, pool)
        return sample

    @property
    def wants_pool(self) -> bool:
        return any(o.wants_pool for o in self.objectives)

    @property
    def pad_values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for o in self.objectives:
            out.update(o.pad_values)
        return out

    @property
    def needs(self) -> set[str]:
        out: set[str] = set()
        for o in self.objectives:
            out |= set(o.needs)
        return out


def task_pipeline(model: PretrainModel, task: TaskSpec) -> TaskPipeline:
    return TaskPipeline([model.objectives[s.name] for s in task.objectives])
