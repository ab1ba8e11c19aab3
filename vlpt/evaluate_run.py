"""``vlpt eval`` and ``vlpt export``: reopen a finished (or running) run from its folder."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from .build import build_model, decode_settings, eval_collator
from .data.sources import resolve_sources
from .errors import UserError
from .eval import EvalData, evaluate, load_samples
from .recipe import load_recipe
from .train.checkpoint import STEP_RE, checkpoint_dirs, load_model_weights, read_state


def locate(path: str | Path, checkpoint: str | None = None) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) from a run folder or a checkpoint folder."""
    p = Path(path)
    if STEP_RE.match(p.name) and (p / "model.safetensors").is_file():
        return p.parent.parent, p
    if not (p / "recipe.yaml").is_file():
        raise UserError(f"'{path}' is neither a run folder (no recipe.yaml) nor a checkpoint folder")
    if checkpoint:
        c = Path(checkpoint)
        if not (c / "model.safetensors").is_file():
            raise UserError(f"checkpoint '{checkpoint}' has no model.safetensors")
        return p, c
    ckpts = checkpoint_dirs(p)
    if not ckpts:
        raise UserError(f"run '{path}' has no checkpoints yet")
    return p, ckpts[-1]


def load_run(path, checkpoint=None, overrides=()):
    run, ckpt = locate(path, checkpoint)
    recipe = load_recipe(run / "recipe.yaml", list(overrides))
    built = build_model(recipe, load_init=False)
    load_model_weights(built.model, ckpt)
    return run, ckpt, built


def evaluate_run(path, checkpoint=None, overrides=()) -> dict:
    run, ckpt, built = load_run(path, checkpoint, overrides)
    recipe = built.recipe
    _, val = resolve_sources(recipe)
    if val is None:
        raise UserError(f"run '{run}' has no validation source (data.val)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built.model.to(device)
    samples = load_samples(val.urls, built.tokenizer, decode_settings(recipe, built.model), recipe.eval.samples)
    data = EvalData(samples, eval_collator(built), device, recipe.eval.batch_size, recipe.eval.retrieval_candidates)
    result = {"step": read_state(ckpt)["step"], **evaluate(built.model, data)}
    (run / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"vlpt: wrote {run / 'eval.json'} (checkpoint {ckpt.name})", file=sys.stderr)
    return result


def export_run(path, out_dir) -> None:
    """Trunk as a BertModel checkpoint + tokenizer, plus vlpt's full weights and recipe."""
    from .model.bert_io import export_bert

    run, ckpt, built = load_run(path)
    out = Path(out_dir)
    export_bert(built.model.vl, out)
    built.tokenizer.save_pretrained(out)
    shutil.copy(ckpt / "model.safetensors", out / "vlpt_model.safetensors")
    shutil.copy(run / "recipe.yaml", out / "vlpt_recipe.yaml")
    print(f"vlpt: exported {ckpt} to {out}: config.json + model.safetensors (transformers.BertModel), "
          "tokenizer.json, vlpt_model.safetensors (every vlpt weight), vlpt_recipe.yaml", file=sys.stderr)
