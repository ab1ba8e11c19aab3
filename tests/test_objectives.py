"""Every registered objective: prepare, forward, a gradient on every parameter, no NaN.

Parametrized over the registry, so a new built-in objective is tested the moment
it is registered (timm tests every registered model the same way).
"""
import numpy as np
import pytest
import torch

from vlpt import registered_objectives
from vlpt.data.collate import Collator
from vlpt.model import VLModel
from vlpt.recipe import ModelConfig, ObjectiveSpec, TaskSpec
from vlpt.tasks import PretrainModel, task_pipeline


class FakeTokenizer:
    pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4
    special_ids = frozenset({0, 1, 2, 3, 4})
    vocab_size = 40


def _samples(rng, n=12, dim=16):
    out = []
    for i in range(n):
        t, k = int(rng.integers(3, 9)), int(rng.integers(1, 5))
        out.append({
            "key": f"s{i}",
            "input_ids": np.array([2, *rng.integers(5, 40, t), 3]),
            "word_ids": [-1, *range(t), -1],
            "features": rng.normal(size=(k, dim)).astype(np.float32),
            "boxes": np.sort(rng.random((k, 4)).astype(np.float32), axis=1)[:, [0, 1, 2, 3]],
            "soft_labels": rng.dirichlet(np.ones(1601), size=k).astype(np.float32),  # UNITER's 1601 classes
        })
    return out


@pytest.mark.parametrize("name", sorted(registered_objectives()))
def test_objective_trains(name):
    torch.manual_seed(0)
    cls = registered_objectives()[name]
    vl = VLModel(ModelConfig(hidden_size=32, layers=2, heads=2, ffn_size=64, max_positions=32, vocab_size=40,
                             region_feature_dim=16, dropout=0.0))
    reg = registered_objectives()
    specs = [ObjectiveSpec(r, reg[r], 1.0, reg[r].Options()) for r in cls.requires]  # companions first
    task = TaskSpec(name, 1.0, [*specs, ObjectiveSpec(name, cls, 1.0, cls.Options())])
    model = PretrainModel(vl, [task], FakeTokenizer())
    pipe = task_pipeline(model, task)
    rng = np.random.default_rng(0)
    samples = _samples(rng)
    views = [pipe(dict(s), rng, samples if pipe.wants_pool else None) for s in samples]
    batch = Collator(0, pipe.pad_values)(views)
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
