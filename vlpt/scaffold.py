"""``vlpt new-objective NAME``: write a working objective plugin and its test, ready to edit.

The plugin is a real (toy) objective — it predicts how many regions an image has
from the pooled ``[CLS]`` state — with every hook commented, so a user starts from
something that trains and replaces what it computes. The test checks one batch by
hand and trains 5 steps through ``vlpt train`` on the built-in shapes data, offline.
"""
from __future__ import annotations

import keyword
import re
import sys
from pathlib import Path

from .errors import UserError

PLUGIN_TEMPLATE = '''\
"""__NAME__: predict how many regions an image has, from the pooled [CLS] state.

Written by `vlpt new-objective __NAME__` as a starting point: a small but real
objective (it trains and evaluates) with every hook commented. Keep the shape,
replace what it computes. The whole contract is in vlpt's docs/objectives.md.

Use it from a recipe (paths are relative to the current folder or to the recipe's):

    plugins: [__PATH__]
    tasks:
      __NAME__: {weight: 1, objectives: {__NAME__: {weight: 1.0, max_count: 16}}}

Test it: python -m pytest test___NAME__.py
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlpt import EncoderOutput, Objective, ObjectiveOutput, register_objective


# The name recipes use. It must be unique: `vlpt objectives` lists the taken ones, and a
# clash is reported when a recipe naming this file is validated.
@register_objective("__NAME__")
class __CLASS__(Objective):
    # Modalities a sample must carry for this objective: "text", "image" or both.
    needs = {"text", "image"}
    # Padding value of each batch field `prepare` adds, when samples differ in length
    # (e.g. a label per word: {"__NAME___labels": -100}). The label below is one integer
    # per sample, which the collator stacks into a (B,) tensor: nothing to pad.
    pad_values = {}
    # Other declarations (see docs/objectives.md):
    #   wants_pool = True                 -> `prepare` also gets `pool`: recent clean samples
    #   sample_fields = ("soft_labels",)  -> fields a sample must carry ("meta.KEY": a json key)
    #   provides = ("my_scores",)         -> values `forward` leaves in out.shared for later objectives
    #   uses = ("itm_label",)             -> values it reads from out.shared (an earlier objective's)

    @dataclass
    class Options:
        # What a recipe may set, with defaults: `objectives: {__NAME__: {weight: 1.0, max_count: 8}}`
        # is checked against these fields (unknown keys and wrong types are errors) before training.
        max_count: int = 16  # images with more regions share the last class

    def __init__(self, options: Options, model, tokenizer):
        # Build the heads. `model` is the shared VLModel: read sizes from `model.config`
        # (hidden_size, vocab_size, ...) and `model.feature_dim`, but do not keep it; reach its
        # weights through `out.model` in `forward`. Parameters created here are trained,
        # checkpointed and exported with the trunk.
        super().__init__(options, model, tokenizer)
        self.head = nn.Linear(model.config.hidden_size, options.max_count + 1)  # classes 0..max_count
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def prepare(self, sample: dict, rng: np.random.Generator, pool=None) -> dict:
        # Data-loader worker, once per sample, on numpy data. `sample` holds input_ids
        # ([CLS] ... [SEP]), word_ids, features (K, D), boxes (K, 4), key and, when the data has
        # them, soft_labels, conf, meta (the sample's json). Draw randomness from `rng` (never np.random) so
        # runs repeat. Add fields named after the objective: ints and floats become (B,)
        # tensors, numpy arrays are padded on their first axis with `pad_values`.
        sample["__NAME___label"] = min(len(sample["features"]), self.options.max_count)
        return sample

    def forward(self, out: EncoderOutput, batch: dict) -> ObjectiveOutput:
        # Training process, one padded batch, after the task's trunk pass. `out.pooled` (B, H)
        # is the pooled [CLS], `out.text` (B, T, H) and `out.regions` (B, K, H) the states,
        # `out.model` the VLModel (for tied weights or extra passes). `batch` holds input_ids and
        # text_mask (B, T), features, boxes and region_mask (B, K, ...) and the fields `prepare` added.
        logits = self.head(out.pooled)  # (B, max_count + 1)
        target = batch["__NAME___label"]  # (B,)
        loss = F.cross_entropy(logits.float(), target)
        acc = (logits.argmax(-1) == target).float().mean()
        # metrics.jsonl logs the loss as `__NAME__/loss` and each metric as `__NAME__/<key>`.
        # Return detached tensors: the trainer turns them into numbers only on logging steps.
        return ObjectiveOutput(loss, {"acc": acc.detach()})

    @torch.no_grad()
    def evaluate(self, model, data) -> dict[str, float]:
        # Optional: held-out metrics for eval.json (flat keys, prefixed with the name).
        # `data.samples` are clean validation samples, `data.batches(views)` collates them onto
        # the device, `data.encode(model, batch)` runs the trunk.
        rng = np.random.default_rng(0)
        views = [self.prepare(dict(s), rng) for s in data.samples if "features" in s]
        correct = total = 0
        for batch in data.batches(views):
            pred = self.head(data.encode(model, batch).pooled).argmax(-1)
            correct += int((pred == batch["__NAME___label"]).sum())
            total += len(pred)
        return {"__NAME___acc": correct / max(total, 1)}
'''

TEST_TEMPLATE = '''\
"""Tests of the __NAME__ objective, written by `vlpt new-objective __NAME__`.

    HF_HUB_OFFLINE=1 python -m pytest test___NAME__.py

The first test runs one batch by hand (prepare, collate, forward, backward); the
second trains 5 steps through `vlpt train` on vlpt's built-in shapes data, generated
into a temporary folder (nothing is downloaded). Edit the recipe in `write_recipe`
when your objective needs other data.
"""
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from vlpt.cli import main as vlpt_main  # noqa: E402
from vlpt.registry import load_plugin  # noqa: E402
from vlpt.testing import TINY_MODEL, prepare_batch, tiny_pretrain_model, tiny_samples, tiny_task  # noqa: E402

PLUGIN = Path(__file__).resolve().parent / "__NAME__.py"


def test_one_batch_has_a_finite_loss_and_trains_the_head():
    load_plugin(str(PLUGIN))  # as a recipe's `plugins:` would (never `import __NAME__` as well)
    task = tiny_task(["__NAME__"], name="__NAME__")  # resolved and checked as a recipe's task is
    model = tiny_pretrain_model([task])  # a 2-layer trunk and the objective's heads
    batch = prepare_batch(model, task, tiny_samples(8))  # prepare + collate, as training does
    loss, metrics = model("__NAME__", batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.objectives["__NAME__"].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {name}"


def write_recipe(folder: Path, steps: int = 5) -> Path:
    recipe = {
        "seed": 0,
        "output_dir": str(folder / "run"),
        "plugins": [str(PLUGIN)],
        "model": dict(TINY_MODEL),  # small; the shapes data's region features are 192-d
        "data": {"train": [{"shapes": {"samples": 200, "seed": 0}}],  # generated on first use
                 "val": {"shapes": {"samples": 40, "seed": 1}},
                 "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16},
        "tasks": {"__NAME__": {"weight": 1, "objectives": {"__NAME__": 1.0}}},
        "train": {"steps": steps, "lr": 1e-3, "warmup": 1},
        "eval": {"samples": 40, "retrieval_candidates": 20, "batch_size": 32},
        "log": {"every": 1, "progress": False},
        "checkpoint": {"every": None, "at_end": False},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_trains_five_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("VLPT_CACHE", str(tmp_path / "cache"))  # generated data stays in the temporary folder
    assert vlpt_main(["train", str(write_recipe(tmp_path))]) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [rec["__NAME__/loss"] for rec in lines if "__NAME__/loss" in rec]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    evaluation = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0.0 <= evaluation["__NAME___acc"] <= 1.0
'''


def class_name(name: str) -> str:
    """``region_count`` -> ``RegionCount``."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Objective"


def check_name(name: str) -> None:
    """A usable objective name, or a :class:`UserError` saying why not."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name or "") or keyword.iskeyword(name):
        raise UserError(f"objective name '{name}' must be a lowercase Python identifier that is not a keyword "
                        "(letters, digits and underscores, starting with a letter; e.g. 'region_count')")
    if name.startswith("test"):
        raise UserError(f"objective name '{name}' starts with 'test': pytest would collect the plugin "
                        "as a test file")
    if name in sys.stdlib_module_names:
        raise UserError(f"objective name '{name}' is a Python standard module: '{name}.py' would shadow it "
                        "when pytest puts its folder on the import path")
    from .registry import objective_source, registered_objectives

    if name in registered_objectives():
        raise UserError(f"objective name '{name}' is already registered ({objective_source(name)}); "
                        "`vlpt objectives` lists the taken names")


def write_objective(name: str, folder: str | Path = ".", force: bool = False) -> tuple[Path, Path]:
    """Write ``folder/NAME.py`` and ``folder/test_NAME.py``; returns their paths."""
    check_name(name)
    folder = Path(folder).expanduser()
    plugin, test = folder / f"{name}.py", folder / f"test_{name}.py"
    existing = [str(p) for p in (plugin, test) if p.exists()]
    if existing and not force:
        raise UserError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                        "use --force to overwrite")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--dir '{folder}' is not a folder")
    folder.mkdir(parents=True, exist_ok=True)

    def fill(template: str) -> str:
        for placeholder, value in (("__CLASS__", class_name(name)), ("__PATH__", str(plugin)), ("__NAME__", name)):
            template = template.replace(placeholder, value)
        return template

    plugin.write_text(fill(PLUGIN_TEMPLATE))
    test.write_text(fill(TEST_TEMPLATE))
    return plugin, test


def main(args) -> int:
    plugin, test = write_objective(args.name, args.dir, args.force)
    print(f"wrote {plugin} (the objective) and {test} (its test)")
    print(f"  test it:  HF_HUB_OFFLINE=1 python -m pytest {test}")
    print(f"  use it:   plugins: [{plugin}]")
    print(f"            tasks: {{{args.name}: {{weight: 1, objectives: {{{args.name}: 1.0}}}}}}")
    return 0
