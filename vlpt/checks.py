"""Checks of what a recipe names, before any heavy work: files, folders, batch settings.

Each failure is a :class:`~vlpt.errors.RecipeError` naming the recipe key. (Types and unknown keys
are checked when the recipe loads, objectives and tasks when :func:`vlpt.tasks.resolve_tasks`
resolves them.)
"""
from __future__ import annotations

from pathlib import Path

from .data.shards import expand_shards
from .errors import RecipeError, UserError
from .recipe import Recipe


def check_init_from(path: str) -> None:
    """``model.init_from``: a Hugging Face BERT folder, a vlpt run folder or a vlpt checkpoint."""
    from .run_dir import RECIPE, WEIGHTS, has_weights

    p = Path(path).expanduser()
    if p.is_file():
        raise RecipeError(f"recipe key 'model.init_from': '{path}' is a file; name the folder that holds it "
                          "(a Hugging Face checkpoint folder, a vlpt run or one of its checkpoints/step-N folders)")
    if not p.is_dir():
        raise RecipeError(f"recipe key 'model.init_from': folder '{path}' not found")
    if not ((p / "config.json").is_file() or (p / RECIPE).is_file() or has_weights(p)):
        raise RecipeError(f"recipe key 'model.init_from': '{path}' is neither a Hugging Face checkpoint folder "
                          f"(config.json) nor a vlpt run ({RECIPE}) or checkpoint ({WEIGHTS}) folder")


def check_files(recipe: Recipe, data: bool = True) -> None:
    """Every local file the recipe names must exist (shards, checkpoint folder, tokenizer).

    ``data=False`` skips the data files (shards, tokenizer) and the init checkpoint, for dry runs
    (a finetune recipe may name a pretraining run that does not exist yet).
    """
    m, d = recipe.model, recipe.data
    if m.init_from is not None and data:
        check_init_from(m.init_from)
    if data and m.tokenizer is not None and not Path(m.tokenizer).expanduser().exists():
        raise RecipeError(f"recipe key 'model.tokenizer': '{m.tokenizer}' not found")
    if not d.train:
        raise RecipeError("recipe key 'data.train' is empty: name at least one source")
    if (d.batch_tokens is None) == (d.batch_size is None):
        raise RecipeError("recipe keys 'data.batch_tokens' and 'data.batch_size': set exactly one of them")
    sources = [(f"data.train.{i}", s) for i, s in enumerate(d.train)]
    if d.val is not None:
        sources.append(("data.val", d.val))
    for path, src in sources:
        if (src.shards is None) == (src.shapes is None):
            raise RecipeError(f"recipe key '{path}': set exactly one of 'shards' and 'shapes'")
        if src.weight < 0:
            raise RecipeError(f"recipe key '{path}.weight' must be >= 0")
        if src.shards is not None and data:
            try:
                expand_shards(src.shards)
            except UserError as e:
                raise RecipeError(f"recipe key '{path}.shards': {e} (pattern '{src.shards}')") from None


#: the least value each numeric recipe key can take (None values of optional keys are not checked)
MINIMUM = {
    "model.hidden_size": 1, "model.layers": 1, "model.heads": 1, "model.ffn_size": 1, "model.max_positions": 1,
    "model.region_feature_dim": 1, "model.vocab_size": 1,
    "data.batch_tokens": 1, "data.batch_size": 1, "data.bucket_size": 1, "data.size_multiple": 1,
    "data.max_text_len": 1, "data.max_regions": 1, "data.num_workers": 0, "data.shuffle_buffer": 0,
    "train.steps": 1, "train.warmup": 0, "train.accumulate": 1, "train.threads": 1, "train.max_bad_steps": 1,
    "train.lr": 0.0, "train.weight_decay": 0.0, "train.head_lr_mul": 0.0,
    "eval.every": 1, "eval.samples": 0, "eval.retrieval_candidates": 0, "eval.batch_size": 1,
    "log.every": 1, "checkpoint.every": 1, "checkpoint.keep": 1, "checkpoint.keep_every": 1,
}
#: keys that are probabilities or fractions
UNIT_INTERVAL = ("model.dropout", "data.max_bad_fraction")


def check_values(recipe: Recipe) -> None:
    """Numbers a run cannot use (a batch of 0 samples, log every 0 steps, a hidden size the heads do
    not divide): one line before anything is built, not an error deep inside training."""
    def value(key: str):
        obj = recipe
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    for key, least in MINIMUM.items():
        v = value(key)
        if v is not None and not isinstance(v, bool) and v < least:
            raise RecipeError(f"recipe key '{key}' must be at least {least}, got {v}")
    for key in UNIT_INTERVAL:
        v = value(key)
        if not 0.0 <= v <= 1.0:
            raise RecipeError(f"recipe key '{key}' must be between 0 and 1, got {v}")
    m = recipe.model
    if m.init_from is None and m.hidden_size % m.heads:  # an init checkpoint brings its own sizes
        raise RecipeError(f"recipe keys 'model.hidden_size' ({m.hidden_size}) and 'model.heads' ({m.heads}): "
                          "the hidden size must be a multiple of the number of heads")
