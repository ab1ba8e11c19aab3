"""Recipes: one YAML file says everything about a run.

Loading order (later wins): the dataclass defaults below < the ``extends:`` chain
< the recipe file < dotted command-line overrides (``train.lr=1e-4``), all applied with one
override language (:func:`merge`), which sweeps use too. Type checking happens here, before
any heavy work: an unknown key or a wrong type raises :class:`~vlpt.errors.RecipeError` with
one line naming the key (and the closest valid key for typos). Files are checked by
:mod:`vlpt.checks`, objectives and tasks resolved by :mod:`vlpt.tasks`.

The top-level keys are a contract (see the README); keys inside each section are
documented on their dataclass.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import RecipeError, did_you_mean

# --------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------


@dataclass
class BackboneConfig:
    """A timm image backbone whose feature map becomes grid regions (ViLT / Pixel-BERT style)."""

    name: str = "resnet18"  # any timm model name
    pretrained: Optional[str] = None  # a local weights file; or "hub" to download (online only)
    frozen: bool = True  # freeze the backbone's weights
    image_size: int = 224  # images are resized to this square size


@dataclass
class ModelConfig:
    """Sizes of the shared trunk and its embedders (BERT names in comments)."""

    hidden_size: int = 768
    layers: int = 12  # num_hidden_layers
    heads: int = 12  # num_attention_heads
    ffn_size: int = 3072  # intermediate_size
    dropout: float = 0.1  # hidden and attention dropout
    max_positions: int = 512  # max_position_embeddings
    region_feature_dim: int = 2048  # D of regions.npz features (ignored with image_backbone)
    vocab_size: Optional[int] = None  # None: the tokenizer's size
    # a Hugging Face BERT folder, or a vlpt run or checkpoint folder (embedders and trunk; heads fresh);
    # its sizes win over the ones above
    init_from: Optional[str] = None
    init_heads: bool = False  # with a vlpt init_from: also the objectives' heads whose names and shapes match
    tokenizer: Optional[str] = None  # tokenizer.json / HF folder; None: tokenizer.json beside the train shards
    image_backbone: Optional[BackboneConfig] = None
    activation_checkpointing: bool = False  # recompute trunk layers in backward: less memory, ~1/3 more compute


@dataclass
class ShapesConfig:
    """The built-in synthetic shapes data, generated on first use into the cache folder."""

    samples: int = 20000  # samples (images for task: retrieval, each with 2-3 captions)
    seed: int = 0
    image_size: int = 64
    # null: captions (pretraining); or a task of the shapes downstream suite (docs/shapes-suite.md)
    task: Optional[Literal["vqa", "refexp", "nlvr2", "retrieval"]] = None


@dataclass
class SourceConfig:
    """One data source: webdataset shards (brace patterns allowed) or generated shapes."""

    shards: Optional[str] = None
    shapes: Optional[ShapesConfig] = None
    weight: float = 1.0


@dataclass
class DataConfig:
    train: list[SourceConfig] = field(default_factory=list)
    val: Optional[SourceConfig] = None
    batch_tokens: Optional[int] = None  # token budget per micro-batch (UNITER); or:
    batch_size: Optional[int] = None  # a fixed number of samples per micro-batch
    bucket_size: int = 1024  # samples held and sorted together by length for token batching (memory!)
    size_multiple: int = 8  # batch sizes are multiples of this (token batching)
    max_text_len: int = 60  # longer captions are dropped, not truncated (UNITER)
    max_regions: int = 100  # regions beyond this are dropped (highest confidence kept)
    num_workers: int = 1  # data-loader workers per task
    shuffle_buffer: int = 1000  # samples in the shuffle buffer
    # shards drawn with replacement by each rank and worker (no epochs); null: when several ranks
    # run and a source has at least one shard per reader, else shuffled epochs split across readers
    resample: Optional[bool] = None
    cache_dir: Optional[str] = None  # where generated data goes; default $VLPT_CACHE or ~/.cache/vlpt
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples read is skipped as bad


@dataclass
class TaskConfig:
    """A unit the trainer mixes: one prepared batch, one forward, weighted objectives."""

    weight: float = 1.0
    objectives: dict[str, Any] = field(default_factory=dict)  # name: weight, or name: {weight: w, option: value}


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer updates
    lr: float = 5e-5
    warmup: int = 0  # steps of linear warmup
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # after warmup
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    head_lr_mul: float = 1.0  # the objectives' heads (every weight outside the encoder) learn at lr × this (UNITER's VQA: 10)
    accumulate: int = 1  # micro-batches per update
    clip: Optional[float] = 5.0  # gradient-norm clip; null for none
    precision: Literal["no", "bf16", "fp16"] = "no"
    threads: Optional[int] = None  # torch CPU threads; None: torch's default
    max_bad_steps: int = 10  # non-finite loss or gradients: the update is skipped; stop after this many in a row
    unpad: bool = True  # the trunk runs on real tokens only (false: on the padded batch)
    compile: bool = False  # torch.compile the trunk's layers (same results; compiling takes a while at the start)


@dataclass
class EvalConfig:
    every: Optional[int] = None  # evaluate every N steps (and always at the end)
    samples: int = 1000  # validation samples used
    retrieval_candidates: int = 100  # images/captions ranked per query
    batch_size: int = 256
    at_end: bool = True


@dataclass
class LogConfig:
    every: int = 10  # metrics.jsonl line every N steps
    progress: bool = True  # progress bar
    trackers: list[str] = field(default_factory=list)  # also log to "tensorboard" and/or "wandb" (optional extras)
    project: Optional[str] = None  # tracker project name; None: the output_dir's name


@dataclass
class CheckpointConfig:
    every: Optional[int] = None  # save every N steps (and at the end)
    keep: int = 3  # newest checkpoints kept
    keep_every: Optional[int] = None  # also keep every checkpoint whose step is a multiple of this (milestones)
    at_end: bool = True


@dataclass
class Recipe:
    seed: int = 42
    output_dir: str = "runs/default"
    plugins: list[str] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: dict[str, TaskConfig] = field(default_factory=dict)
    mixing: Literal["sample", "sum"] = "sample"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    #: where the recipe was read from (not a recipe key)
    source: Optional[str] = field(default=None, metadata={"internal": True})
    #: the command-line overrides applied to it, as given (not a recipe key)
    overrides: list[str] = field(default_factory=list, metadata={"internal": True})


# --------------------------------------------------------------------------------------
# typed conversion with key paths in errors
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def convert(tp: Any, value: Any, path: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``; errors name ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, path)
            except RecipeError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise RecipeError(f"recipe key '{path}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise RecipeError(
                f"recipe key '{path}' must be {_type_name(tp)}, got {value!r}"
                + did_you_mean(value, [str(a) for a in typing.get_args(tp)])
            )
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{path}' must be a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key '{path}' must be {_type_name(tp)}, got {value!r}")
        return [convert(item, v, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key '{path}' must be a mapping, got {value!r}")
        return {str(k): convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise RecipeError(f"recipe key '{path}' must be {_type_name(tp)}, got {value!r}")


def from_dict(cls: type, data: dict, path: str = "", also: tuple[str, ...] = ()) -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys raise with did-you-mean (among ``cls``'s
    fields and ``also``: keys valid at this place that the caller takes out before, e.g. ``weight``)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise RecipeError(f"unknown recipe key '{key_path}'{_suggest(path, key, [*also, *names])}")
        kwargs[key] = convert(hints[key], value, key_path)
    return cls(**kwargs)


def _suggest(path: str, key: str, names: list[str]) -> str:
    hint = did_you_mean(key, names)
    if hint and path:
        hint = hint.replace("'", f"'{path}.", 1)
    return hint or f"; valid keys here: {', '.join(names)}"


def to_dict(obj: Any) -> Any:
    """The plain-YAML form of a recipe (for ``recipe.yaml`` in the run folder)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if not f.metadata.get("internal")}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------
# loading: extends + overrides
# --------------------------------------------------------------------------------------


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file '{path}' not found")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(f"recipe file '{path}'{where} is not valid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe file '{path}' must hold a mapping at the top level")
    return data


# --------------------------------------------------------------------------------------
# the override language: extends:, command-line overrides and sweeps all speak it
# --------------------------------------------------------------------------------------

#: keys that say what a mapping *is*: a mapping naming one replaces the one it extends instead of
#: merging into it (``val: {shards: ...}`` over a parent's ``val: {shapes: ...}`` is a new source)
_KIND_KEYS = frozenset({"shards", "shapes"})
_UNKNOWN = object()  # a path outside the schema: its value is set as given, from_dict names it later


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _child_type(tp: Any, part: str) -> Any:
    """The schema type one key below ``tp`` (Optional stripped), or ``_UNKNOWN``."""
    tp = _strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return _strip_optional(hints[part]) if part in hints else _UNKNOWN
    if typing.get_origin(tp) in (dict, list):
        return _strip_optional(typing.get_args(tp)[-1])
    return _UNKNOWN


def _is_free_mapping(tp: Any) -> bool:
    """A mapping whose keys the user names (``tasks``, a task's ``objectives``), not a section."""
    return typing.get_origin(tp) is dict


def _merges(tp: Any, old: Any, new: Any) -> bool:
    """Whether ``new`` merges into ``old`` key by key (a section, unless it names another kind)."""
    if not (dataclasses.is_dataclass(tp) and isinstance(old, dict) and isinstance(new, dict)):
        return False
    kinds_old, kinds_new = _KIND_KEYS & old.keys(), _KIND_KEYS & new.keys()
    return not (kinds_old and kinds_new and not kinds_old & kinds_new)


def _set(node: Any, tp: Any, parts: list[str], value: Any, key: str) -> None:
    """Set ``value`` at the dotted path ``parts`` below ``node`` (whose schema type is ``tp``)."""
    head, rest = parts[0], parts[1:]
    if isinstance(node, list):
        try:
            index = int(head)
            node[index]
        except (ValueError, IndexError):
            raise RecipeError(f"override '{key}': '{head}' is not an index of the list") from None
        if rest:
            _set(node[index], _child_type(tp, head), rest, value, key)
        else:
            node[index] = copy.deepcopy(value)
        return
    child = _child_type(tp, head)
    if rest:
        if not isinstance(node.get(head), (dict, list)):
            node[head] = {}
        _set(node[head], child, rest, value, key)
    elif value is None and _is_free_mapping(tp):
        if head not in node:
            raise RecipeError(f"override '{key}: null': there is no entry '{head}' to remove"
                              + (did_you_mean(head, node) or f" (there are: {', '.join(map(str, node)) or 'none'})"))
        del node[head]
    elif _merges(child, node.get(head), value):
        for k, v in value.items():
            _set(node[head], child, str(k).split("."), v, f"{key}.{k}")
    else:
        node[head] = copy.deepcopy(value)


def merge(raw: dict, over: dict, schema: Any = None) -> dict:
    """``over`` applied to a copy of ``raw``: the one override language of recipes.

    ``over`` is a mapping whose keys may be dotted paths (``train.lr``, ``data.train.0.weight``,
    ``tasks.itm.objectives.wra``); ``extends:`` applies the extending file to its parents with it,
    ``key=value`` on the command line is ``{key: value}``, a sweep variant is its mapping. Rules:

    * a mapping merges into a recipe **section** key by key (``train: {steps: 5}`` sets one key),
      unless it names another kind of data source (``shards`` over ``shapes``), which replaces it;
    * a mapping given for a **free-form mapping** (``tasks``, a task's ``objectives``) replaces it:
      ``tasks: {...}`` states the whole task list;
    * ``null`` on an entry of a free-form mapping (``tasks.mrfr``, ``tasks.itm.objectives.wra``)
      **removes** it; on any other key ``null`` is the value null (``train.clip: null``: no clip);
    * lists and plain values replace; later keys win.
    """
    out = copy.deepcopy(raw)
    for key, value in over.items():
        parts = str(key).split(".")
        if not all(parts):
            raise RecipeError(f"override key '{key}' is not a dotted recipe path")
        _set(out, schema or Recipe, parts, value, str(key))
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` (the value read as YAML; empty is null) as ``(key, value)``."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise RecipeError(f"override '{text}' must look like key.path=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def parse_overrides(items: list[str] | tuple = ()) -> dict[str, Any]:
    return dict(parse_override(item) for item in items)


def load_raw(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a recipe file with its ``extends:`` chain applied (parents relative to the file)."""
    path = Path(path)
    if path.resolve() in _seen:
        raise RecipeError(f"recipe '{path}' extends itself (cycle: {' -> '.join(str(p) for p in _seen)})")
    data = _read_yaml(path)
    parents = data.pop("extends", None)
    if isinstance(parents, str):
        parents = [parents]
    merged: dict = {}
    for parent in parents or ():
        parent_path = (path.parent / parent) if not Path(parent).is_absolute() else Path(parent)
        if not parent_path.is_file():
            raise RecipeError(f"recipe key 'extends': file '{parent}' not found (looked in {path.parent})")
        merged = merge(merged, load_raw(parent_path, _seen + (path.resolve(),)))
    try:
        return merge(merged, data)
    except RecipeError as e:
        raise RecipeError(f"recipe file '{path}': {e}") from None


def apply_override(raw: dict, override: str) -> dict:
    """One command-line ``key.path=value`` applied to ``raw``; returns the new mapping."""
    return merge(raw, dict([parse_override(override)]))


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """Load, merge, override and type-check a recipe (files and objectives are checked by :func:`validate`)."""
    raw = merge(load_raw(path), parse_overrides(overrides))
    recipe = from_dict(Recipe, raw)
    recipe.source = str(path)
    recipe.overrides = list(overrides)
    return recipe
