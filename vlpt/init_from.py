"""``model.init_from``: start a model from a Hugging Face BERT checkpoint or from a vlpt run.

* A **Hugging Face BERT folder** (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``):
  its sizes replace the recipe's, its text embedder and trunk are loaded (``bert_io``), its
  tokenizer (``tokenizer.json`` or ``vocab.txt``) is the run's unless ``model.tokenizer`` is set.
* A **vlpt run folder** (its latest checkpoint) or **checkpoint folder** (``step-NNNNNNN``): the
  pretrained run's model sizes and tokenizer, its embedders and trunk (every ``vl.*`` weight); the
  objectives' heads start fresh. This is how a finetune starts from a pretraining run.

Either way, weights are read with safetensors (or ``torch.load(weights_only=True)``): a checkpoint
is data, never code. :func:`load_init_weights` returns a one-line report of what was loaded and what
was left at its initialization.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import UserError
from .model.bert_io import apply_bert_config, load_bert_into
from .recipe import ModelConfig, load_recipe
from .run_dir import RECIPE, TOKENIZER, RunDir, is_checkpoint, locate

#: model sizes a finetune takes from the pretrained run (everything that shapes a weight)
SIZE_KEYS = ("hidden_size", "layers", "heads", "ffn_size", "max_positions", "region_feature_dim", "vocab_size",
             "image_backbone")


def is_vlpt_init(path: str | Path) -> bool:
    p = Path(path).expanduser()
    return (p / RECIPE).is_file() or is_checkpoint(p)


def _run_and_checkpoint(path: str | Path) -> tuple[RunDir, Path]:
    try:
        return locate(Path(path).expanduser())
    except UserError as e:
        raise UserError(f"model.init_from: {e}") from None


def init_tokenizer_path(path: str | Path) -> str:
    """The tokenizer that goes with an init checkpoint: a BERT folder's own, or the vlpt run's."""
    if not is_vlpt_init(path):
        return str(Path(path).expanduser())
    run, _ = _run_and_checkpoint(path)
    saved = run.path / TOKENIZER
    if saved.is_file():
        return str(saved)
    from .data.sources import default_tokenizer_path  # a run written before runs kept their tokenizer

    return default_tokenizer_path(load_recipe(run.recipe))


def apply_init_config(mcfg: ModelConfig, path: str | Path) -> ModelConfig:
    """The init checkpoint's sizes into ``mcfg`` (they win over the recipe's)."""
    if not is_vlpt_init(path):
        return apply_bert_config(mcfg, path)
    run, _ = _run_and_checkpoint(path)
    pretrained = load_recipe(run.recipe).model
    for key in SIZE_KEYS:
        setattr(mcfg, key, getattr(pretrained, key))
    return mcfg


def load_init_weights(model: torch.nn.Module, path: str | Path, heads: bool = False) -> str:
    """Load the init checkpoint into a :class:`vlpt.tasks.PretrainModel` (with ``heads``, a vlpt
    run's objective heads too, where names and shapes match); a report of what was loaded."""
    if not is_vlpt_init(path):
        fresh = set(load_bert_into(model.vl, path))
        own = model.vl.state_dict()
        loaded = sorted({k.split(".")[0] for k in own if k not in fresh})
        left = sorted({k.split(".")[0] for k in fresh})
        return (f"model.init_from: loaded {len(own) - len(fresh)} BERT tensors ({', '.join(loaded)}) from {path}; "
                f"fresh: {', '.join(left) or 'nothing'} of the encoder, and every objective head")
    from .train.checkpoint import read_weights  # model.safetensors, or a sharded run's slices put together

    run, ckpt = _run_and_checkpoint(path)
    saved = read_weights(ckpt)
    weights = {k[len("vl."):]: v for k, v in saved.items() if k.startswith("vl.")}
    own = model.vl.state_dict()
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"model.init_from: {ckpt}: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, "
                        f"the model expects {tuple(own[wrong[0]].shape)} (different model sizes?)")
    missing = sorted(set(own) - set(weights))
    model.vl.load_state_dict(weights, strict=False)
    note = f"; left at init: {', '.join(missing[:5])}" if missing else ""
    if not heads:
        took = {name: obj.init_from_pretrained(saved) for name, obj in model.objectives.items()}
        started = "".join(f"; {name}: {what}" for name, what in took.items() if what)
        fresh = [name for name, what in took.items() if not what]
        return (f"model.init_from: loaded the encoder ({len(weights)} tensors: embedders, trunk, pooler) from {ckpt}; "
                f"fresh heads: {', '.join(fresh) or 'none'}{started}{note}")
    mine = model.objectives.state_dict()
    carried = {k[len("objectives."):]: v for k, v in saved.items() if k.startswith("objectives.")
               and k[len("objectives."):] in mine and mine[k[len("objectives."):]].shape == v.shape}
    model.objectives.load_state_dict(carried, strict=False)
    return (f"model.init_from: loaded the encoder ({len(weights)} tensors) and {len(carried)} of "
            f"{len(mine)} head tensors (matching names and shapes) from {ckpt}{note}")
