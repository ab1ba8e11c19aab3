"""``vlpt eval`` and ``vlpt export``: reopen a finished (or running) run from its folder.

Both run in one process, for any run: a sharded (FSDP) run's checkpoint is put together from its
slices on load (:func:`vlpt.train.checkpoint.read_weights`), so no cluster is needed."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from .build import Built, build_model, decode_settings, eval_collator
from .data.sources import resolve_sources
from .errors import UserError
from .eval import EvalData, evaluate, load_samples
from .recipe import load_recipe
from .run_dir import WEIGHTS, RunDir, locate
from .train.checkpoint import load_model_weights, read_state


def load_run(path, checkpoint=None, overrides=()) -> tuple[RunDir, Path, Built]:
    """The model of a run folder or checkpoint folder, with the checkpoint's weights."""
    run, ckpt = locate(path, checkpoint)
    recipe = load_recipe(run.recipe, list(overrides))
    if run.tokenizer.is_file() and not recipe.model.tokenizer:
        recipe.model.tokenizer = str(run.tokenizer)  # the run's own copy: the data may have moved
    built = build_model(recipe, load_init=False)
    load_model_weights(built.model, ckpt)
    return run, ckpt, built


def evaluate_run(path, checkpoint=None, overrides=()) -> dict:
    run, ckpt, built = load_run(path, checkpoint, overrides)
    recipe = built.recipe
    _, val = resolve_sources(recipe)
    if val is None:
        raise UserError(f"run '{run.path}' has no validation source (data.val)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built.model.to(device)
    samples = load_samples(val.urls, built.tokenizer, decode_settings(recipe, built.model), recipe.eval.samples)
    data = EvalData(samples, eval_collator(built), device, recipe.eval.batch_size, recipe.eval.retrieval_candidates)
    result = {"step": read_state(ckpt)["step"], **evaluate(built.model, data)}
    run.write_eval(result)
    print(json.dumps(result, indent=2))
    print(f"vlpt: wrote {run.eval} (checkpoint {ckpt.name})", file=sys.stderr)
    return result


def export_run(path, out_dir) -> None:
    """Trunk as a BertModel checkpoint + tokenizer, plus vlpt's full weights and recipe."""
    from .model.bert_io import export_bert

    run, ckpt, built = load_run(path)
    out = Path(out_dir)
    export_bert(built.model.vl, out)
    built.tokenizer.save_pretrained(out)
    if (ckpt / WEIGHTS).is_file():
        shutil.copy(ckpt / WEIGHTS, out / "vlpt_model.safetensors")
    else:  # a sharded run's checkpoint: its weights as one file, as an unsharded run writes them
        state = {k: v.detach().cpu().contiguous() for k, v in built.model.state_dict().items()}
        save_file(state, str(out / "vlpt_model.safetensors"), metadata={"format": "pt"})
    shutil.copy(run.recipe, out / "vlpt_recipe.yaml")
    print(f"vlpt: exported {ckpt} to {out}: config.json + model.safetensors (transformers.BertModel), "
          "tokenizer.json, vlpt_model.safetensors (every vlpt weight), vlpt_recipe.yaml", file=sys.stderr)
