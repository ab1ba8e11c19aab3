"""A recipe's data sources: shard URLs (generated data built on first use), the tokenizer that
goes with them, and what each source's samples carry (probed before training)."""
from __future__ import annotations

import fcntl
import os
import sys
from collections import Counter
from pathlib import Path

from ..batch import has_field, modalities
from ..errors import RecipeError
from ..recipe import Recipe, ShapesConfig, SourceConfig
from .samples import BadSample, DecodeSettings, decode_sample
from .shards import expand_shards, first_shard, is_local
from .stream import Source, read_tar_samples


def cache_dir(recipe: Recipe | None = None) -> Path:
    if recipe is not None and recipe.data.cache_dir:
        return Path(recipe.data.cache_dir).expanduser()
    return Path(os.environ.get("VLPT_CACHE", "~/.cache/vlpt")).expanduser()


#: version of the generated data's folder name: a change to what is generated gets new folders
SHAPES_VERSION = "v2"  # v2: one vocabulary for captions and the downstream suite
#: a task of the suite whose generation changed since: its own folder version
TASK_VERSIONS = {"nlvr2": "v3", "refexp": "v3"}  # v3: nlvr2 statements about captions, not counts; refexp
# relations whose target is not given away by where the boxes stand


def shapes_dir(cfg: ShapesConfig, root: Path) -> Path:
    kind = f"-{cfg.task}" if cfg.task else ""
    version = TASK_VERSIONS.get(cfg.task, SHAPES_VERSION)
    return root / "shapes" / f"{version}{kind}-n{cfg.samples}-seed{cfg.seed}-px{cfg.image_size}"


def ensure_shapes(cfg: ShapesConfig, root: Path, progress: bool = True, quiet: bool = False) -> Path:
    """Generate the shapes split (or a split of the downstream suite) into the cache unless it is
    there already (safe across ranks: one process builds, the others wait and reuse it)."""
    out = shapes_dir(cfg, root)
    if (out / "info.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "info.json").is_file():
            what = f"shapes {cfg.task} task" if cfg.task else "shapes data set"
            if not quiet:
                print(f"vlpt: building the {what} ({cfg.samples} samples, seed {cfg.seed}) in {out}", file=sys.stderr)
            if cfg.task:
                from .shapes_tasks import write_shapes_task

                write_shapes_task(out, cfg.task, cfg.samples, seed=cfg.seed, image_size=cfg.image_size,
                                  progress=progress, desc=f"shapes {cfg.task} seed {cfg.seed}")
            else:
                from .shapes import write_shapes

                write_shapes(out, cfg.samples, seed=cfg.seed, image_size=cfg.image_size, progress=progress,
                             desc=f"shapes seed {cfg.seed}")
    return out


def source_urls(src: SourceConfig, root: Path, progress: bool = True, quiet: bool = False) -> list[str]:
    if src.shapes is not None:
        folder = ensure_shapes(src.shapes, root, progress, quiet)
        return sorted(str(p) for p in folder.glob("shapes-*.tar"))
    try:
        return expand_shards(src.shards)
    except Exception as e:  # a UserError naming the shard: say which recipe pattern
        raise RecipeError(f"{e} (recipe pattern '{src.shards}')") from None


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
        from ..init_from import init_tokenizer_path

        return init_tokenizer_path(recipe.model.init_from)
    src = recipe.data.train[0]
    if src.shapes is not None:
        return str(shapes_dir(src.shapes, cache_dir(recipe)) / "tokenizer.json")
    first = first_shard(src.shards)
    if not is_local(first):
        raise RecipeError("recipe key 'model.tokenizer' must be set when the train shards are remote")
    cand = Path(first).parent / "tokenizer.json"
    if not cand.is_file():
        raise RecipeError(f"recipe key 'model.tokenizer' is not set and there is no tokenizer.json beside '{first}'")
    return str(cand)


# --------------------------------------------------------------------------------------
# what the sources carry
# --------------------------------------------------------------------------------------


def probe_source(url: str, tokenizer, settings: DecodeSettings, fields: set[str], probe: int = 64):
    """(modalities, fields found, refusal counts) of the first ``probe`` samples of one shard."""
    found: set[str] = set()
    carried: set[str] = set()
    refused: Counter = Counter()
    seen = 0
    for raw in read_tar_samples(url, lambda *a: refused.update(["bad_tar"])):
        seen += 1
        try:
            sample = decode_sample(raw, tokenizer, settings)
        except BadSample as e:
            refused[e.reason] += 1
        else:
            found |= modalities(sample)
            carried |= {f for f in fields if has_field(sample, f)}
        if seen >= probe:
            break
    return found, carried, refused


def _describe(i: int, src: Source, found: set[str], carried: set[str], refused: Counter, fields) -> str:
    what = f"the samples of data.train.{i} ('{src.urls[0]}') carry only {'+'.join(sorted(found)) or 'nothing usable'}"
    if fields - carried:
        what += f" without {', '.join(sorted(fields - carried))}"
    if refused:
        reasons = ", ".join(f"{k}: {v}" for k, v in refused.most_common())
        what += f" (of the first samples read, {sum(refused.values())} were refused: {reasons})"
    return what


def probe_sources(tasks, sources: list[Source], settings: DecodeSettings, tokenizer, probe: int = 64) -> list[list[int]]:
    """Which sources can feed each task, read from the first samples of each source's first shard.

    ``tasks`` are :class:`vlpt.tasks.TaskSpec` (their ``needs`` and ``sample_fields``). A source feeds a
    task when its samples carry every modality and field the task's objectives read: a caption-only
    source feeds a text-only ``mlm`` task and is kept away from ``itm``. No source that can feed a
    task fails before training (exit 2), naming what the samples carry and why any were refused.
    Returns, per task, the indices of the sources that feed it."""
    fields = {f for t in tasks for f in t.sample_fields}
    probed = [probe_source(src.urls[0], tokenizer, settings, fields, probe) for src in sources]
    feeding = []
    for task in tasks:
        mine = [i for i, (found, carried, _) in enumerate(probed)
                if task.needs <= found and set(task.sample_fields) <= carried]
        if sources and not mine:
            need = "+".join(sorted(task.needs)) + "".join(f" and '{f}' (read by {o})" for f, o in task.sample_fields.items())
            what = "; ".join(_describe(i, s, *p, set(task.sample_fields)) for i, (s, p) in enumerate(zip(sources, probed)))
            raise RecipeError(f"recipe key 'tasks.{task.name}': its objectives ({task.objective_names}) need "
                              f"{need}, but no source can feed it: {what}")
        feeding.append(mine)
    return feeding
