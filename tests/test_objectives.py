"""Every registered objective: prepare, forward, a gradient on every parameter, no NaN.

Parametrized over the registry, so a new built-in objective is tested the moment
it is registered (timm tests every registered model the same way).
"""
import numpy as np
import pytest
import torch

from vlpt import registered_objectives
from vlpt.testing import DOWNSTREAM_META, prepare_batch, tiny_pretrain_model, tiny_samples, tiny_task

#: metadata an objective reads differently from DOWNSTREAM_META's (a label is a class name for ve)
META = {"ve": {**DOWNSTREAM_META, "label": "neutral"}}
#: options for the tiny data (4 answers)
OPTIONS = {"vqa": {"num_answers": 4}}


def _companions(cls) -> list[str]:
    """Objectives that must come before ``cls`` in its task: those that provide what it uses."""
    reg = registered_objectives()
    return [next(n for n, c in reg.items() if value in c.provides) for value in cls.used(cls.Options())]


@pytest.mark.parametrize("name", sorted(registered_objectives()))
def test_objective_trains(name):
    cls = registered_objectives()[name]
    task = tiny_task({**{c: 1.0 for c in [*_companions(cls), *cls.requires]}, name: OPTIONS.get(name, 1.0)}, name=name)
    model = tiny_pretrain_model([task])
    vl = model.vl
    if name == "itr":  # its rank bias is shared by every pair: its gradient, the sum of sigmoid'(negative) -
        # sigmoid'(positive), is zero while every pair scores alike (a fresh head); started from ITM they differ
        torch.nn.init.normal_(model.objectives["itr"].rank.weight, std=1.0)
    samples = tiny_samples(meta=META.get(name, DOWNSTREAM_META), second_image=True)  # soft labels: 1601 classes
    batch = prepare_batch(model, task, samples)
    loss, metrics = model(name, batch)
    assert loss.ndim == 0 and torch.isfinite(loss), loss
    assert all(np.isfinite(v) for v in metrics.values())
    loss.backward()
    head = model.objectives[name]
    for pname, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: no gradient for head parameter {pname}"
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for head parameter {pname}"
    trunk_grads = [p.grad for p in vl.trunk.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in trunk_grads)
