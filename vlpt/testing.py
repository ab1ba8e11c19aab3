"""A test kit: tiny tokenizers, samples, models, batches and recipes, for tests and benchmarks.

vlpt's own tests, the test that ``vlpt new-objective`` writes for a plugin, and ``tools/bench.py``
build their small inputs here, so they all exercise the code path training uses: a task resolved
against the registry (:func:`tiny_task`), its samples prepared by the task's pipeline and collated
with the task's pad values (:func:`prepare_batch`), exactly as a training stream does.

Nothing here downloads anything or needs pytest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import yaml

from .data.collate import Collator
from .recipe import ModelConfig
from .tasks import POOL_SIZE, PretrainModel, TaskSpec, objective_spec, check_task

#: a trunk small enough for a test step in milliseconds (region features of the shapes data: 192-d)
TINY_MODEL = {"hidden_size": 32, "layers": 2, "heads": 2, "ffn_size": 64, "max_positions": 64,
              "region_feature_dim": 192}


class TinyTokenizer:
    """The tokenizer attributes objectives read (special ids, vocabulary size), for synthetic ids."""

    pad_id, unk_id, cls_id, sep_id, mask_id = 0, 1, 2, 3, 4
    special_ids = frozenset({0, 1, 2, 3, 4})
    vocab_size = 40


def shapes_tokenizer():
    """A real :class:`~vlpt.data.tokenizer.TextTokenizer`: the shapes grammar, one token per word."""
    from .data.shapes import train_tokenizer
    from .data.tokenizer import TextTokenizer

    return TextTokenizer(train_tokenizer(()), "shapes grammar")


#: metadata every downstream objective can read (VQA answers, a referred region, a label, a picture)
DOWNSTREAM_META = {"answer_ids": {"0": 3, "2": 1}, "target_region": 0, "target_box": [0.0, 0.0, 0.5, 0.5],
                   "label": True}


def tiny_samples(n: int = 12, seed: int = 0, feature_dim: int = 16, vocab_size: int = 40, text_len=(3, 9),
                 regions=(1, 5), soft_label_classes: int | None = 1601, meta: dict | None = None,
                 second_image: bool = False) -> list[dict[str, Any]]:
    """Clean samples (as ``decode_sample`` makes them) with random ids, features and boxes; ``meta``
    (e.g. :data:`DOWNSTREAM_META`) as each sample's metadata, with a distinct ``image_id``; with
    ``second_image``, a second set of regions (``features2``, ``boxes2``) as NLVR2 samples carry."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t, k = int(rng.integers(*text_len)), int(rng.integers(*regions))
        sample = {
            "key": f"s{i}",
            "input_ids": np.array([2, *rng.integers(5, vocab_size, t)] + [3]),
            "word_ids": [-1, *range(t), -1],
            "features": rng.normal(size=(k, feature_dim)).astype(np.float32),
            "boxes": np.sort(rng.random((k, 4)).astype(np.float32), axis=1),
        }
        if soft_label_classes:
            sample["soft_labels"] = rng.dirichlet(np.ones(soft_label_classes), size=k).astype(np.float32)
        if meta is not None:
            sample["meta"] = {**meta, "image_id": i}
        if second_image:
            k2 = int(rng.integers(*regions))
            sample["features2"] = rng.normal(size=(k2, feature_dim)).astype(np.float32)
            sample["boxes2"] = np.sort(rng.random((k2, 4)).astype(np.float32), axis=1)
        out.append(sample)
    return out


def tiny_model_config(**overrides) -> ModelConfig:
    """A 2-layer, 32-wide model for :class:`TinyTokenizer` ids and 16-d features, without dropout."""
    cfg = dict(hidden_size=32, layers=2, heads=2, ffn_size=64, max_positions=32, vocab_size=40,
               region_feature_dim=16, dropout=0.0)
    cfg.update(overrides)
    return ModelConfig(**cfg)


def tiny_task(objectives: dict[str, Any] | Iterable[str], name: str = "t", weight: float = 1.0) -> TaskSpec:
    """A task of registered objectives (name -> weight or options mapping, in order), checked as a
    recipe's task is (shared values, matched pairs)."""
    items = objectives.items() if isinstance(objectives, dict) else ((o, 1.0) for o in objectives)
    task = TaskSpec(name, weight, [objective_spec(name, o, v if v is not None else 1.0) for o, v in items])
    check_task(task)
    return task


def tiny_pretrain_model(tasks: list[TaskSpec], config: ModelConfig | None = None, tokenizer=None,
                        seed: int = 0) -> PretrainModel:
    """Trunk and heads for ``tasks`` (initialized from ``seed``)."""
    from .model import VLModel

    torch.manual_seed(seed)
    return PretrainModel(VLModel(config or tiny_model_config()), tasks, tokenizer or TinyTokenizer())


def prepare_batch(model: PretrainModel, task: TaskSpec, samples: list[dict], seed: int = 0,
                  pad_id: int = 0) -> dict[str, Any]:
    """``samples`` through the task's pipeline and collator, as a training stream makes a batch
    (objectives that draw from a pool get the samples themselves, at most the stream's pool size)."""
    pipe = model.pipeline(task.name)
    rng = np.random.default_rng(seed)
    pool = samples[-POOL_SIZE:] if task.wants_pool else None
    views = [pipe(dict(s), rng, pool) for s in samples]
    return Collator(pad_id, task.pad_values)(views)


def tiny_recipe(tmp_path: Path, **sections) -> Path:
    """Write a small, fast recipe on generated shapes data; ``sections`` override top-level keys
    (a mapping merges into the section, anything else replaces it)."""
    recipe = {
        "seed": 0,
        "output_dir": str(tmp_path / "run"),
        "model": dict(TINY_MODEL),
        "data": {
            "train": [{"shapes": {"samples": 200, "seed": 0}}],
            "val": {"shapes": {"samples": 60, "seed": 1}},
            "batch_size": 8,
            "num_workers": 0,
            "shuffle_buffer": 16,
        },
        "tasks": {"mlm": {"weight": 1, "objectives": {"mlm": 1.0}}, "itm": {"weight": 1, "objectives": {"itm": 1.0}}},
        "mixing": "sample",
        "train": {"steps": 3, "lr": 1e-3, "warmup": 1},
        "eval": {"samples": 40, "retrieval_candidates": 20, "batch_size": 32},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": 2, "keep": 2},
    }
    for k, v in sections.items():
        if isinstance(v, dict) and isinstance(recipe.get(k), dict):
            recipe[k] = {**recipe[k], **v}
        else:
            recipe[k] = v
    path = Path(tmp_path) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
