"""Resolving a recipe's data sources to shard URLs (building generated data on first use)."""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from ..errors import RecipeError
from ..recipe import Recipe, ShapesConfig, SourceConfig, expand_shards
from .stream import Source


def cache_dir(recipe: Recipe | None = None) -> Path:
    if recipe is not None and recipe.data.cache_dir:
        return Path(recipe.data.cache_dir).expanduser()
    return Path(os.environ.get("VLPT_CACHE", "~/.cache/vlpt")).expanduser()


def shapes_dir(cfg: ShapesConfig, root: Path) -> Path:
    return root / "shapes" / f"v1-n{cfg.samples}-seed{cfg.seed}-px{cfg.image_size}"


def ensure_shapes(cfg: ShapesConfig, root: Path, progress: bool = True, quiet: bool = False) -> Path:
    """Generate the shapes split into the cache unless it is there already (safe across ranks)."""
    from .shapes import write_shapes

    out = shapes_dir(cfg, root)
    if (out / "info.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process builds; the others wait, then reuse
        if not (out / "info.json").is_file():
            if not quiet:
                print(f"vlpt: building the shapes data set ({cfg.samples} samples, seed {cfg.seed}) in {out}", file=sys.stderr)
            write_shapes(out, cfg.samples, seed=cfg.seed, image_size=cfg.image_size, progress=progress,
                         desc=f"shapes seed {cfg.seed}")
    return out


def source_urls(src: SourceConfig, root: Path, progress: bool = True, quiet: bool = False) -> list[str]:
    if src.shapes is not None:
        folder = ensure_shapes(src.shapes, root, progress, quiet)
        return sorted(str(p) for p in folder.glob("shapes-*.tar"))
    urls = expand_shards(os.path.expanduser(src.shards))
    import glob as _glob

    out: list[str] = []
    for u in urls:
        if "://" not in u and not u.startswith("pipe:") and _glob.has_magic(u):
            matches = sorted(_glob.glob(u))
            if not matches:
                raise RecipeError(f"shard pattern '{src.shards}' matches no file")
            out.extend(matches)
        else:
            out.append(u)
    return out


def resolve_sources(recipe: Recipe, progress: bool = True, quiet: bool = False) -> tuple[list[Source], Source | None]:
    root = cache_dir(recipe)
    train = [Source(source_urls(s, root, progress, quiet), s.weight) for s in recipe.data.train]
    val = None
    if recipe.data.val is not None:
        val = Source(source_urls(recipe.data.val, root, progress, quiet), 1.0)
    return train, val


def default_tokenizer_path(recipe: Recipe) -> str:
    """``model.tokenizer``, else the init checkpoint's, else ``tokenizer.json`` beside the first train source."""
    if recipe.model.tokenizer:
        return recipe.model.tokenizer
    if recipe.model.init_from:
        return recipe.model.init_from
    src = recipe.data.train[0]
    if src.shapes is not None:
        return str(shapes_dir(src.shapes, cache_dir(recipe)) / "tokenizer.json")
    first = expand_shards(os.path.expanduser(src.shards))[0]
    if "://" in first or first.startswith("pipe:"):
        raise RecipeError("recipe key 'model.tokenizer' must be set when the train shards are remote")
    cand = Path(first).parent / "tokenizer.json"
    if not cand.is_file():
        raise RecipeError(f"recipe key 'model.tokenizer' is not set and there is no tokenizer.json beside '{first}'")
    return str(cand)
