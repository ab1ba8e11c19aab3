"""Which task(s) an optimizer update trains.

``sample`` (UNITER): one task per update, drawn with probability ∝ its weight
from a generator seeded by ``(seed, step)`` — identical on every rank without
communication, and exactly reproducible after a resume at any step.
``sum`` (ViLT / ALBEF): every task every update, losses weighted and summed.
"""
from __future__ import annotations

import numpy as np


class TaskMixer:
    def __init__(self, names: list[str], weights: list[float], mode: str, seed: int):
        self.names = list(names)
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.weights = dict(zip(names, weights))
        self.mode = mode
        self.seed = seed

    def tasks_for(self, step: int) -> list[str]:
        if self.mode == "sum":
            return [n for n in self.names if self.weights[n] > 0]
        rng = np.random.default_rng([self.seed, 0x7A5C, step])
        return [self.names[int(rng.choice(len(self.names), p=self.p))]]

    def loss_scale(self, task: str) -> float:
        """Factor on a task's loss: 1 when sampled (the draw is the weighting), its weight when summed."""
        return self.weights[task] if self.mode == "sum" else 1.0
