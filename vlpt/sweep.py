"""Ablation sweeps: many recipe variants, one command, one comparison table.

``vlpt sweep SWEEP.yaml`` expands a sweep file into variants, validates every
variant's recipe before anything runs, writes each one's resolved recipe into
``SWEEP_DIR/<variant>/recipe.yaml`` (that folder is the variant's ``output_dir``)
and runs them, here in turn (``--launcher local``) or as a Slurm job array
(``--launcher slurm``). ``vlpt report SWEEP_DIR`` compares their evaluations.

The sweep file
--------------

.. code-block:: yaml

    base: ../quickstart-uniter.yaml    # the recipe every variant starts from (relative to this file)
    output_dir: sweeps/my-ablation     # SWEEP_DIR (relative to where vlpt runs, like a recipe's output_dir)
    overrides:                         # applied to every variant
      train.steps: 600
      eval.samples: 500
    variants:                          # named variants, each a mapping of overrides
      mlm-itm: {tasks.mrfr: null, tasks.mrc_kl: null}
      no-wra: {tasks.itm.objectives.wra: null}
      lr-high: {train.lr: 5.0e-4}
    grid:                              # a cartesian product, crossed with every variant
      seed: [0, 1]
    finetune:                          # optional: the same downstream training after every variant
      recipe: ../quickstart.yaml       # default: the base recipe
      overrides: {train.steps: 300}
      carry: encoder                   # weights carried over: encoder (vl.*, heads fresh) or all
    slurm: {nodes: 1, gpus_per_node: 8, time: "48:00:00", partition: gpu}
    report: {metrics: [itm_acc, mlm_acc]}   # default columns of `vlpt report`
    anchors: {...}                     # free space for YAML anchors (&name / *name); ignored

Overrides. A key is a dotted recipe path (``train.lr``, ``tasks.itm.objectives.wra``,
``data.train.0.weight``). A mapping value merges into a recipe section (``train: {steps: 5}``
sets one key) and replaces a free-form mapping: ``tasks: {...}`` states a variant's whole task
list, ``tasks.itm.objectives: {...}`` a task's objectives; lists and other values replace.
``null`` on an entry of a free-form mapping (a task in ``tasks``, an objective in a task's
``objectives``) removes it, which switches a task or an objective off in either mixing mode
(weight 0 only does so for ``mixing: sample``); on any other key ``null`` is the value null.
Order: the base, then ``overrides``, then the variant's, then the grid point (later wins).
``output_dir`` is always ``SWEEP_DIR/<name>``.

Names. With only ``variants``, a variant's folder is its name; with only ``grid``,
``key=value`` pairs joined by ``_`` (the last part of each dotted key, e.g.
``lr=0.0001_seed=0``; the whole key where two would clash; list or mapping values
by index); with both, ``<variant>_<grid point>``. Names keep ``[A-Za-z0-9._=+-]``.

Finetune. UNITER compares pretraining objectives by fine-tuning every pretrained
model on the same downstream tasks. With ``finetune:`` each variant, once
pretrained, is fine-tuned in ``SWEEP_DIR/<variant>/finetune/``: the finetune recipe
(``finetune.recipe`` + ``finetune.overrides``) with the variant's ``model`` section
and ``seed``, starting from the variant's encoder (text and region embedders and
trunk; every head fresh; fresh optimizer and schedule). The start is written as a
step-0 checkpoint in the finetune folder, which ``vlpt train`` resumes from.

Finished and resumed. A run is finished when its latest checkpoint and its
``eval.json`` are at ``train.steps`` (or when the sweep wrote ``done.json`` there
after a successful run, with its wall time). Finished variants are skipped; an
interrupted one is run again and ``vlpt train`` resumes it from its latest
checkpoint. A variant whose recipe changed after it finished is still skipped,
with a note: delete its folder to run it again.

Launchers. ``local`` runs ``python -m vlpt.cli train SWEEP_DIR/<v>/recipe.yaml`` for each
variant in turn (output also in ``SWEEP_DIR/<v>/train.log``), goes on after a failed variant
and exits 1 if any failed. A run whose files are complete counts as done even if it then fails
or hangs while shutting down (it is stopped ``EXIT_GRACE_S`` later); Ctrl-C or SIGTERM stops
the current run with a checkpoint. ``slurm`` writes ``SWEEP_DIR/sweep.sbatch``, one array
index per variant (``#SBATCH --array=0-N``, ``--requeue``; near the time limit the task
checkpoints, requeues itself and resumes), running ``accelerate launch -m vlpt.cli train`` on
``slurm.nodes`` × ``slurm.gpus_per_node`` processes; it prints the ``sbatch`` command and
submits nothing. ``--dry-run`` lists the variants and their state (and still writes the script
for slurm); ``--only NAME ...`` (shell patterns allowed) picks variants.

``vlpt report SWEEP_DIR`` prints a markdown table (variants × final ``eval.json``
metrics; with a finetune, its metrics first and the pretraining ones as
``pretrain/<metric>``), the best finished value of each column in bold (the lowest
for names ending in ``mse``, ``loss`` or ``distance``; ``*_blind`` and ``step`` columns
are not ranked), and writes ``report.md``, ``report.csv`` and, with matplotlib,
``report.png`` into SWEEP_DIR.
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import fnmatch
import hashlib
import io
import itertools
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import RecipeError, UserError, did_you_mean
from .checks import check_files
from .recipe import Recipe, from_dict, load_raw, merge, to_dict
from .tasks import resolve_tasks

SWEEP_KEYS = ("base", "output_dir", "overrides", "variants", "grid", "finetune", "slurm", "report", "anchors")
FINETUNE_KEYS = ("recipe", "overrides", "carry")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
STEP_RE = re.compile(r"^step-(\d{7,})$")  # as vlpt.train.checkpoint (not imported: it pulls in torch)


@dataclass
class SlurmConfig:
    """The ``slurm:`` section of a sweep file (each key becomes an ``#SBATCH`` line or a launch setting)."""

    nodes: int = 1
    gpus_per_node: int = 8  # processes per node (accelerate launch --num_processes = nodes × this)
    cpus_per_task: Optional[int] = None  # CPU cores per node for the launcher and its data workers
    mem: Optional[str] = None  # e.g. "480G"
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    job_name: Optional[str] = None  # default: vlpt-<sweep file stem>
    max_parallel: Optional[int] = None  # at most this many array tasks at once (--array=0-N%K)
    requeue_before: int = 300  # seconds before the time limit at which a task requeues itself
    sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. ["--constraint=h100"]
    setup: list[str] = field(default_factory=list)  # shell lines before training, e.g. ["source venv/bin/activate"]
    launch_args: str = ""  # more accelerate launch options, e.g. "--config_file recipes/launch/fsdp.yaml"
    python: str = "python"  # the interpreter for vlpt's helpers (warm start, done marker)


@dataclass
class Stage:
    """One training run of a variant: its pretraining, or its finetune."""

    recipe: Recipe
    run_dir: Path

    @property
    def recipe_path(self) -> Path:
        return self.run_dir / "recipe.yaml"


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # what the variant and grid point change (for listings)
    pretrain: Stage
    finetune: Optional[Stage] = None

    @property
    def run_dir(self) -> Path:
        return self.pretrain.run_dir

    @property
    def stages(self) -> list[Stage]:
        return [self.pretrain] + ([self.finetune] if self.finetune else [])


@dataclass
class Sweep:
    path: Path
    name: str
    output_dir: Path
    variants: list[Variant]
    slurm: SlurmConfig
    report_metrics: Optional[list[str]]
    carry: str
    raw: dict
    cli_overrides: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# overrides on raw recipe mappings
# --------------------------------------------------------------------------------------


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


_UNKNOWN = object()  # a path outside the schema (from_dict reports it later)


def _type_at(parts: list[str], root: Any = Recipe) -> Any:
    """The schema type at a dotted path (Optional stripped), or ``_UNKNOWN``."""
    tp: Any = root
    for part in parts:
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return _UNKNOWN
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) is list:
            tp = typing.get_args(tp)[0]
        else:
            return _UNKNOWN
    return _strip_optional(tp)


def _is_mapping_entry(parts: list[str]) -> bool:
    """Whether ``parts`` names an entry of a free-form mapping of the recipe schema (``tasks.X``,
    ``tasks.X.objectives.Y``), where null means "remove", rather than a schema key."""
    return typing.get_origin(_type_at(parts[:-1])) is dict


def _merge_section(old: Any, new: Any, tp: Any) -> Any:
    """``new`` into ``old`` where the schema has a section (a dataclass): key by key; a free-form
    mapping, a list or a value replaces what was there."""
    if not (dataclasses.is_dataclass(tp) and isinstance(old, dict) and isinstance(new, dict)):
        return copy.deepcopy(new)
    out = dict(old)
    for k, v in new.items():
        sub = _type_at([k], tp)
        out[k] = _merge_section(old.get(k), v, sub) if sub is not _UNKNOWN else copy.deepcopy(v)
    return out


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"`` in place (list items by index).

    A mapping merges into a recipe section (``train: {steps: 5}`` sets one key) and replaces a
    free-form mapping (``tasks: {...}``, ``tasks.itm.objectives: {...}``); ``None`` on a free-form
    mapping's entry removes it.
    """
    parts = str(key).split(".")
    if not all(parts):
        raise UserError(f"override key '{key}' is not a dotted recipe path")
    delete = value is None and _is_mapping_entry(parts)
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            try:
                node = node[int(part)]
            except (ValueError, IndexError):
                raise UserError(f"override '{key}': '{'.'.join(parts[: i + 1])}' is not an index of the list") from None
            continue
        if not isinstance(node.get(part), (dict, list)):
            if delete:
                raise UserError(f"override '{key}: null': there is no '{'.'.join(parts[: i + 1])}' to remove it from")
            node[part] = {}
        node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        try:
            node[int(last)] = copy.deepcopy(value)
        except (ValueError, IndexError):
            raise UserError(f"override '{key}': '{last}' is not an index of the list") from None
    elif delete:
        if last not in node:
            where = ".".join(parts[:-1])
            raise UserError(f"override '{key}: null': '{where}' has no entry '{last}' to remove"
                            + (did_you_mean(last, node) or f" (it has: {', '.join(map(str, node)) or 'nothing'})"))
        del node[last]
    else:
        node[last] = _merge_section(node.get(last), value, _type_at(parts))


def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    return merge(raw, overrides)


# --------------------------------------------------------------------------------------
# expanding a sweep file
# --------------------------------------------------------------------------------------


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"sweep key '{where}' must be a mapping, got {value!r}")
    return value


def _check_keys(data: dict, allowed: tuple, where: str) -> None:
    for k in data:
        if k not in allowed:
            prefix = f"{where}." if where else ""
            hint = did_you_mean(k, allowed) or f"; valid keys: {', '.join(allowed)}"
            raise UserError(f"unknown sweep key '{prefix}{k}'{hint}")


def _value_name(value: Any, index: int) -> str:
    if isinstance(value, (dict, list)):
        return str(index)
    if isinstance(value, float):
        return format(value, "g")
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _clean_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "-", name).strip("-") or "variant"


def grid_points(grid: dict[str, list]) -> list[tuple[str, dict[str, Any]]]:
    """The cartesian product of ``grid`` as (name, overrides) pairs, in key order."""
    if not grid:
        return [("", {})]
    keys = list(grid)
    for k in keys:
        if not isinstance(grid[k], list) or not grid[k]:
            raise UserError(f"sweep key 'grid.{k}' must be a non-empty list of values, got {grid[k]!r}")
    short = [k.split(".")[-1] for k in keys]
    labels = [s if short.count(s) == 1 else k for s, k in zip(short, keys)]
    out = []
    for combo in itertools.product(*(list(enumerate(grid[k])) for k in keys)):
        name = "_".join(f"{label}={_value_name(v, i)}" for label, (i, v) in zip(labels, combo))
        out.append((_clean_name(name), {k: v for k, (_, v) in zip(keys, combo)}))
    return out


def _resolve_path(p: str | os.PathLike, base: Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else base / p


def _absolute_plugins(raw: dict, recipe_dir: Path) -> None:
    """Plugin files named relative to the base recipe still load from the variant's folder."""
    plugins = raw.get("plugins")
    if isinstance(plugins, list):
        raw["plugins"] = [str((recipe_dir / p).resolve()) if isinstance(p, str) and p.endswith(".py")
                          and not Path(p).is_absolute() else p for p in plugins]


def _build_recipe(raw: dict, where: str, recipe_path: Path, check_data: bool) -> Recipe:
    """Type-check and validate a raw recipe; errors name the variant."""
    try:
        recipe = from_dict(Recipe, raw)
        recipe.source = str(recipe_path)
        check_files(recipe, data=check_data)
        resolve_tasks(recipe)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return recipe


def parse_cli_overrides(items: list[str] | tuple = ()) -> dict[str, Any]:
    """``key.path=value`` strings (values read as YAML) as an overrides mapping."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"override '{item}' must look like key.path=value")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def load_sweep(path: str | Path, check_data: bool = True, cli_overrides: list[str] | tuple = ()) -> Sweep:
    """Read a sweep file, expand it into variants and validate every variant's recipe.

    ``cli_overrides`` (``key.path=value``) apply to every variant after the file's ``overrides``;
    ``output_dir=DIR`` moves the sweep's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sweep file '{path}' is not valid YAML: {getattr(e, 'problem', e)}") from None
    data = _mapping(data, str(path))
    _check_keys(data, SWEEP_KEYS, "")
    here = path.parent
    if not data.get("base"):
        raise UserError(f"sweep file '{path}': 'base' (the recipe every variant starts from) is missing")
    if not data.get("output_dir"):
        raise UserError(f"sweep file '{path}': 'output_dir' (the sweep's folder) is missing")
    base_path = _resolve_path(data["base"], here)
    if not base_path.is_file():
        raise UserError(f"sweep key 'base': recipe '{data['base']}' not found (looked in {here})")
    extra = parse_cli_overrides(cli_overrides)
    out_dir = Path(os.path.expanduser(str(extra.pop("output_dir", data["output_dir"]))))
    base_raw = load_raw(base_path)
    _absolute_plugins(base_raw, base_path.parent)
    common = {**_mapping(data.get("overrides"), "overrides"), **extra}
    variants_in = data.get("variants")
    if variants_in is None:
        variants_in = {}
    if isinstance(variants_in, list):
        raise UserError("sweep key 'variants' must be a mapping of name: {overrides}")
    variants_in = _mapping(variants_in, "variants")
    for name, ov in variants_in.items():
        if not isinstance(name, str) or not NAME_OK.match(name):
            raise UserError(f"sweep key 'variants.{name}': a variant name uses letters, digits and ._=+- only")
        _mapping(ov, f"variants.{name}")
    grid = _mapping(data.get("grid"), "grid")
    points = grid_points(grid)
    if not variants_in and not grid:
        raise UserError(f"sweep file '{path}' has neither 'variants' nor 'grid': nothing to run")

    ft = data.get("finetune")
    ft_raw_base = None
    carry = "encoder"
    ft_overrides: dict = {}
    if ft is not None:
        ft = _mapping(ft, "finetune")
        _check_keys(ft, FINETUNE_KEYS, "finetune")
        ft_path = _resolve_path(ft["recipe"], here) if ft.get("recipe") else base_path
        if not ft_path.is_file():
            raise UserError(f"sweep key 'finetune.recipe': recipe '{ft['recipe']}' not found (looked in {here})")
        ft_raw_base = load_raw(ft_path)
        _absolute_plugins(ft_raw_base, ft_path.parent)
        ft_overrides = _mapping(ft.get("overrides"), "finetune.overrides")
        carry = ft.get("carry", "encoder")
        if carry not in ("encoder", "all"):
            raise UserError(f"sweep key 'finetune.carry' must be 'encoder' or 'all', got {carry!r}")

    slurm_raw = _mapping(data.get("slurm"), "slurm")
    try:
        slurm = from_dict(SlurmConfig, slurm_raw, "slurm")
    except RecipeError as e:
        raise UserError(str(e).replace("recipe key", "sweep key")) from None
    report = _mapping(data.get("report"), "report")
    _check_keys(report, ("metrics",), "report")
    metrics = report.get("metrics")
    if metrics is not None and not (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
        raise UserError("sweep key 'report.metrics' must be a list of metric names")

    named = list(variants_in.items()) or [("", {})]
    variants: list[Variant] = []
    seen: set[str] = set()
    for vname, vov in named:
        vov = vov or {}
        for gname, gov in points:
            name = "_".join(n for n in (vname, gname) if n)
            if name in seen:
                raise UserError(f"sweep file '{path}': two variants are both named '{name}'")
            seen.add(name)
            where = f"sweep '{path}' variant '{name}'"
            run_dir = out_dir / name
            try:
                raw = apply_overrides(base_raw, common)
                raw = apply_overrides(raw, vov)
                raw = apply_overrides(raw, gov)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
            raw["output_dir"] = str(run_dir)
            pre = Stage(_build_recipe(raw, where, run_dir / "recipe.yaml", check_data), run_dir)
            fin = None
            if ft_raw_base is not None:
                try:
                    fraw = apply_overrides(ft_raw_base, ft_overrides)
                except UserError as e:
                    raise UserError(f"sweep '{path}' finetune: {e}") from None
                fraw["model"] = copy.deepcopy(to_dict(pre.recipe.model))  # same encoder shapes as the variant
                fraw["seed"] = pre.recipe.seed
                fraw["output_dir"] = str(run_dir / "finetune")
                fin = Stage(_build_recipe(fraw, f"{where} (finetune)", run_dir / "finetune" / "recipe.yaml",
                                          check_data), run_dir / "finetune")
            variants.append(Variant(name, {**vov, **gov}, pre, fin))
    return Sweep(path, path.stem, out_dir, variants, slurm, metrics, carry, data, parse_cli_overrides(cli_overrides))


def select(sweep: Sweep, only: list[str] | None) -> list[Variant]:
    if not only:
        return sweep.variants
    names = [v.name for v in sweep.variants]
    for pattern in only:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserError(f"--only: no variant named '{pattern}'"
                            + (did_you_mean(pattern, names) or f"; variants: {', '.join(names)}"))
    return [v for v in sweep.variants if any(fnmatch.fnmatchcase(v.name, p) for p in only)]


# --------------------------------------------------------------------------------------
# run state
# --------------------------------------------------------------------------------------


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latest_checkpoint_step(run_dir: Path) -> Optional[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return max(steps) if steps else None


def recipe_digest(recipe: Recipe) -> str:
    text = yaml.safe_dump(to_dict(recipe), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_finished(stage: Stage) -> bool:
    """The run reached ``train.steps``: its ``done.json`` says so, or its files do (:func:`reached_end`)."""
    done = _read_json(stage.run_dir / "done.json")
    if done and done.get("steps", -1) >= stage.recipe.train.steps:
        return True
    return reached_end(stage)


def reached_end(stage: Stage) -> bool:
    """The run's files are at ``train.steps``: its latest checkpoint (when the recipe checkpoints at
    the end) and its ``eval.json`` (when it evaluates at the end); else its last ``metrics.jsonl`` line."""
    r, steps = stage.recipe, stage.recipe.train.steps
    checks = []
    if r.checkpoint.at_end:
        checks.append((latest_checkpoint_step(stage.run_dir) or -1) >= steps)
    if r.eval.at_end and r.data.val is not None:
        checks.append(((_read_json(stage.run_dir / "eval.json") or {}).get("step", -1)) >= steps)
    if not checks:
        checks.append(_last_logged_step(stage.run_dir) >= steps)
    return all(checks)


def _last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return max((json.loads(line).get("step", -1) for line in lines[-20:] if line.strip()), default=-1)
    except (OSError, ValueError):
        return -1


def stage_state(stage: Stage) -> str:
    if stage_finished(stage):
        return "finished"
    step = latest_checkpoint_step(stage.run_dir)
    if step is None and (stage.run_dir / "metrics.jsonl").is_file():
        return "started, no checkpoint yet"
    if step == 0:
        return "warm-started"
    if step is not None:
        return f"partial (step {step} of {stage.recipe.train.steps})"
    return "not started"


def variant_state(v: Variant) -> str:
    states = [stage_state(s) for s in v.stages]
    if all(s == "finished" for s in states):
        return "finished"
    if v.finetune and states[0] == "finished":
        return "pretrained; finetune " + states[1]
    return states[0]


def write_recipe(stage: Stage) -> None:
    """The resolved recipe into the run folder; a note when it differs from the one a run used."""
    stage.run_dir.mkdir(parents=True, exist_ok=True)
    new = yaml.safe_dump(to_dict(stage.recipe), sort_keys=False)
    path = stage.recipe_path
    if path.is_file() and latest_checkpoint_step(stage.run_dir) is not None:
        try:
            old = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        changed = _changed_keys(old, to_dict(stage.recipe))
        if changed:
            what = ", ".join(changed[:5]) + (" …" if len(changed) > 5 else "")
            print(f"vlpt sweep: note: {stage.run_dir} was started with another recipe (changed: {what}); "
                  "it resumes from its checkpoint" + (" — but it is finished: delete the folder to run it again"
                                                      if stage_finished(stage) else ""), file=sys.stderr)
            if stage_finished(stage):
                return  # keep the recipe the finished run really used
    path.write_text(new)


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in list(old) + [k for k in new if k not in old]:
            out += _changed_keys(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


# --------------------------------------------------------------------------------------
# warm start of a finetune from a pretrained variant
# --------------------------------------------------------------------------------------


def warm_start(finetune_recipe: str | Path, pretrained_run: str | Path, carry: str = "encoder") -> Path:
    """Write ``checkpoints/step-0000000`` into the finetune run: the finetune model (heads freshly
    initialized with its seed) with the pretrained run's latest weights carried over (the encoder
    ``vl.*``, or every weight whose name and shape match with ``carry="all"``)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from .build import build_model
    from .recipe import load_recipe
    from .train.checkpoint import checkpoint_dirs, save_checkpoint

    recipe = load_recipe(finetune_recipe)
    ckpts = checkpoint_dirs(pretrained_run)
    if not ckpts:
        raise UserError(f"warm start: pretrained run '{pretrained_run}' has no checkpoint")
    torch.manual_seed(recipe.seed)
    np.random.seed(recipe.seed % 2**32)
    built = build_model(recipe)
    model = built.model
    state = model.state_dict()
    pre = load_file(str(ckpts[-1] / "model.safetensors"))
    carried = skipped = 0
    for k, v in pre.items():
        if carry == "encoder" and not k.startswith("vl."):
            continue
        if k in state and state[k].shape == v.shape:
            state[k] = v
            carried += 1
        elif k.startswith("vl."):
            skipped += 1
    if skipped:
        raise UserError(f"warm start: {skipped} encoder weights of '{ckpts[-1]}' do not fit the finetune model "
                        "(different model sizes?)")
    model.load_state_dict(state)
    out = save_checkpoint(recipe.output_dir, 0, model)
    print(f"vlpt sweep: warm start {out}: {carried} tensors from {ckpts[-1]} ({carry}), heads fresh", file=sys.stderr)
    return out


# --------------------------------------------------------------------------------------
# the local launcher
# --------------------------------------------------------------------------------------


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


EXIT_GRACE_S = 45  # how long a run that has written its last checkpoint and eval.json may take to exit
POLL_S = 5.0  # how often the local launcher looks at a running run's files


def _stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM (vlpt checkpoints at the next step boundary and exits) and up to ``grace`` seconds to
    exit, then SIGKILL to its whole process group (data-loader workers too)."""
    if proc.poll() is None and grace > 0:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, 9)  # data-loader workers too
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _run_logged(cmd: list[str], log_path: Path, finished=None) -> tuple[int, Optional[float]]:
    """Run ``cmd`` in its own process group, its output to the console and appended to ``log_path``.

    Returns (exit code, seconds until ``finished()`` first held). A run whose files are complete
    but which has not exited ``EXIT_GRACE_S`` later (stuck shutting down) is stopped.
    """
    import threading

    t0 = time.time()
    with open(log_path, "a") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} $ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)
                log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        done_at = None
        try:
            while True:
                try:
                    rc = proc.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if done_at is None and finished is not None and finished():
                    done_at = time.time()
                if done_at is not None and time.time() - done_at > EXIT_GRACE_S:
                    msg = (f"vlpt sweep: the run wrote its last checkpoint and evaluation {EXIT_GRACE_S} s ago "
                           "but has not exited: stopping it\n")
                    sys.stderr.write(msg)
                    log.write(msg)
                    _stop(proc, grace=0)  # its results are written: nothing to save
                    rc = proc.returncode
                    break
        except KeyboardInterrupt:
            _stop(proc, grace=60)
            raise
        finally:
            reader.join(timeout=10)
    if done_at is None and finished is not None and finished():
        done_at = time.time()
    return rc, None if done_at is None else done_at - t0


def _write_done(stage: Stage, wall_s: float, launcher: str, load_start, extra: dict | None = None) -> None:
    rec = {"steps": stage.recipe.train.steps, "wall_s": round(wall_s, 1), "launcher": launcher,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
           "cpus": os.cpu_count(), "loadavg_start": load_start, "loadavg_end": _loadavg(),
           "recipe_digest": recipe_digest(stage.recipe), **(extra or {})}
    (stage.run_dir / "done.json").write_text(json.dumps(rec, indent=2) + "\n")


def run_stage(stage: Stage, python: str = sys.executable) -> bool:
    """Train one stage to its end here (resuming from its checkpoints); True when its files say it
    reached ``train.steps`` (a failure while shutting down after that is reported, not fatal)."""
    cmd = [python, "-m", "vlpt.cli", "train", str(stage.recipe_path)]
    load_start = _loadavg()
    t0 = time.time()
    rc, until_done = _run_logged(cmd, stage.run_dir / "train.log", finished=lambda: reached_end(stage))
    wall = time.time() - t0
    if not reached_end(stage):
        why = f"failed (exit {rc})" if rc != 0 else f"exited without reaching step {stage.recipe.train.steps}"
        print(f"vlpt sweep: {stage.run_dir}: training {why}; see {stage.run_dir / 'train.log'}", file=sys.stderr)
        return False
    if rc != 0:
        print(f"vlpt sweep: note: {stage.run_dir} exited with code {rc} after writing its last checkpoint and "
              "evaluation; its results are complete", file=sys.stderr)
    prev = _read_json(stage.run_dir / "done.json") or {}
    _write_done(stage, until_done if until_done is not None else wall, "local", load_start,
                {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)), "process_s": round(wall, 1),
                 "exit_code": rc, "attempts": prev.get("attempts", 0) + 1})
    return True


def run_local(sweep: Sweep, variants: list[Variant]) -> int:
    failed = []
    t_sweep = time.time()
    for i, v in enumerate(variants):
        head = f"vlpt sweep: [{i + 1}/{len(variants)}] {v.name}"
        if variant_state(v) == "finished":
            print(f"{head}: finished, skipped", file=sys.stderr)
            continue
        ok = True
        for stage in v.stages:
            if stage_finished(stage):
                continue
            write_recipe(stage)
            if stage is v.finetune and latest_checkpoint_step(stage.run_dir) is None:
                warm_start(stage.recipe_path, v.run_dir, sweep.carry)
            state = stage_state(stage)
            kind = "finetune" if stage is v.finetune else "pretrain"
            print(f"{head}: {kind} ({state}) -> {stage.run_dir}", file=sys.stderr)
            t0 = time.time()
            ok = run_stage(stage)
            print(f"{head}: {kind} {'done' if ok else 'FAILED'} in {_hms(time.time() - t0)}", file=sys.stderr)
            if not ok:
                break
        if not ok:
            failed.append(v.name)
    print(f"vlpt sweep: {len(variants) - len(failed)} of {len(variants)} variant(s) finished "
          f"({_hms(time.time() - t_sweep)} this time); compare them: vlpt report {sweep.output_dir}", file=sys.stderr)
    if failed:
        print(f"vlpt sweep: failed: {', '.join(failed)} (run the sweep again to retry; finished ones are skipped)",
              file=sys.stderr)
        return 1
    return 0


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --------------------------------------------------------------------------------------
# the slurm launcher
# --------------------------------------------------------------------------------------


def _q(s: Any) -> str:
    return shlex.quote(str(s))


def sbatch_script(sweep: Sweep, variants: list[Variant], workdir: Path) -> str:
    """A bash script for ``sbatch``: one array task per variant, requeued near the time limit."""
    s = sweep.slurm
    out = sweep.output_dir.resolve() if not sweep.output_dir.is_absolute() else sweep.output_dir
    n = len(variants)
    array = f"0-{n - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    lines = [
        "#!/bin/bash",
        f"# vlpt sweep {sweep.path} — {n} variant(s), one per array index.",
        f"# Submit: sbatch {out / 'sweep.sbatch'}",
        f"#SBATCH --job-name={s.job_name or 'vlpt-' + _clean_name(sweep.name)}",
        f"#SBATCH --array={array}",
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
    ]
    if s.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={s.gpus_per_node}")
    for key, value in (("cpus-per-task", s.cpus_per_task), ("mem", s.mem), ("time", s.time),
                       ("partition", s.partition), ("account", s.account), ("qos", s.qos)):
        if value is not None:
            lines.append(f"#SBATCH --{key}={value}")
    lines += [
        f"#SBATCH --output={out}/slurm/%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{s.requeue_before}",
    ]
    lines += [f"#SBATCH {opt}" for opt in s.sbatch]
    names = " ".join(_q(v.name) for v in variants)
    lines += [
        "",
        "set -uo pipefail",
        f"cd {_q(workdir)}",
        *s.setup,
        "",
        f"SWEEP_DIR={_q(out)}",
        f"PY={_q(s.python)}",
        f"VARIANTS=({names})",
        f"FINETUNE={'1' if any(v.finetune for v in variants) else '0'}",
        f"CARRY={_q(sweep.carry)}",
        'if [ "${SLURM_ARRAY_TASK_ID:-x}" = x ]; then',
        '  echo "submit with sbatch (needs SLURM_ARRAY_TASK_ID)" >&2; exit 2',
        "fi",
        'NAME="${VARIANTS[$SLURM_ARRAY_TASK_ID]}"',
        'RUN="$SWEEP_DIR/$NAME"',
        f"NPROC=$(( {s.nodes} * {max(s.gpus_per_node, 1)} ))",
        'MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))",
        f"LAUNCH_ARGS={_q(s.launch_args)}",
        'export NPROC MAIN_ADDR PORT LAUNCH_ARGS',
        'export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"',
        "# how long torchrun lets the training processes write their checkpoint after SIGTERM",
        'export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}"',
        "",
        "# Near the time limit Slurm sends USR1 to this script alone: pass it on as SIGTERM to every process",
        "# of the job's steps (vlpt checkpoints at the next step boundary and exits), then requeue this array",
        "# task, which resumes from that checkpoint. A preempted task gets SIGTERM and is requeued by Slurm.",
        "STOPPING=0",
        'on_usr1() { echo "vlpt sweep: $NAME: time limit near: checkpoint and requeue" >&2; STOPPING=1; '
        'scancel --signal=TERM "$SLURM_JOB_ID" || true; }',
        "trap on_usr1 USR1",
        "trap 'STOPPING=1' TERM",
        "",
        "# train one stage to its end: one accelerate launcher per node, each starting its node's processes",
        "train_stage() {",
        '  local recipe="$1" start=$SECONDS rc pid',
        '  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \'accelerate launch --num_machines "$SLURM_NNODES" '
        '--machine_rank "$SLURM_NODEID" --num_processes "$NPROC" $( [ "$NPROC" -gt 1 ] && echo --multi_gpu ) '
        '--main_process_ip "$MAIN_ADDR" --main_process_port "$PORT" $LAUNCH_ARGS -m vlpt.cli train "$0"\' "$recipe" &',
        "  pid=$!",
        '  wait "$pid"; rc=$?',
        "  # a trapped signal interrupts wait: wait again until the training has really exited",
        '  while kill -0 "$pid" 2>/dev/null; do wait "$pid"; rc=$?; done',
        '  if [ "$STOPPING" = 1 ]; then',
        '    scontrol requeue "$SLURM_JOB_ID" || true',
        "    exit 0",
        "  fi",
        '  [ "$rc" -eq 0 ] || return "$rc"',
        '  # done.json only when the run really reached its last step',
        '  "$PY" -m vlpt.sweep mark-done "$(dirname "$recipe")" --wall-s $(( SECONDS - start )) --launcher slurm',
        "}",
        "",
        'echo "vlpt sweep: array task $SLURM_ARRAY_TASK_ID: $NAME on $SLURM_JOB_NODELIST ($NPROC processes)" >&2',
        '[ -f "$RUN/done.json" ] || train_stage "$RUN/recipe.yaml" || exit $?',
        'if [ "$FINETUNE" = 1 ]; then',
        '  if [ ! -d "$RUN/finetune/checkpoints" ]; then',
        '    "$PY" -m vlpt.sweep warm-start "$RUN/finetune/recipe.yaml" "$RUN" --carry "$CARRY" || exit $?',
        "  fi",
        '  [ -f "$RUN/finetune/done.json" ] || train_stage "$RUN/finetune/recipe.yaml" || exit $?',
        "fi",
        'echo "vlpt sweep: $NAME finished" >&2',
        "",
    ]
    return "\n".join(lines)


def write_slurm(sweep: Sweep, variants: list[Variant]) -> Path:
    for v in variants:
        for stage in v.stages:
            write_recipe(stage)
    (sweep.output_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path = sweep.output_dir / "sweep.sbatch"
    path.write_text(sbatch_script(sweep, variants, Path.cwd()))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------------------
# vlpt sweep
# --------------------------------------------------------------------------------------


def _task_summary(tasks: Any) -> str:
    """``mlm:2 itm:2(itm+wra)``: each task's weight, and its objectives where they differ from its name."""
    if not isinstance(tasks, dict):
        return json.dumps(tasks)
    parts = []
    for name, t in tasks.items():
        t = t or {}
        objs = list((t.get("objectives") or {}))
        extra = "" if objs == [name] else "(" + "+".join(objs) + ")"
        parts.append(f"{name}:{t.get('weight', 1)}{extra}")
    return " ".join(parts) or "none"


def _describe(ov: dict[str, Any]) -> str:
    if not ov:
        return "(the base recipe)"
    parts = []
    for k, v in ov.items():
        if k == "tasks":
            parts.append(f"tasks={{{_task_summary(v)}}}")
            continue
        text = json.dumps(v, separators=(",", ":")) if not isinstance(v, str) else v
        parts.append(f"{k}={text if len(text) <= 60 else text[:57] + '...'}")
    return " ".join(parts)


def write_manifest(sweep: Sweep) -> None:
    """``SWEEP_DIR/sweep.yaml``: the sweep file as given, plus the variants in order (for ``vlpt report``)."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep_file": str(sweep.path),
        "variants": [v.name for v in sweep.variants],
        "finetune": any(v.finetune for v in sweep.variants),
        "report": {"metrics": sweep.report_metrics} if sweep.report_metrics else {},
        "sweep": sweep.raw,
        "cli_overrides": sweep.cli_overrides,
    }
    (sweep.output_dir / "sweep.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def sweep_main(args) -> int:
    slurm = args.launcher == "slurm"
    # data files are checked where the data lives: here for local runs, on the cluster for slurm
    # key=value overrides after the sweep file (vlpt.cli passes them where its sweep parser takes them)
    sweep = load_sweep(args.sweep, check_data=not slurm, cli_overrides=getattr(args, "overrides", None) or ())
    variants = select(sweep, args.only)
    print(f"sweep {sweep.path}: {len(sweep.variants)} variant(s), all valid; output in {sweep.output_dir}/")
    width = max(len(v.name) for v in variants)
    for v in variants:
        stages = " + finetune" if v.finetune else ""
        print(f"  {v.name:{width}s}  {variant_state(v):28s} {v.pretrain.recipe.train.steps} steps{stages}: "
              f"{_describe(v.overrides)}")
    if slurm:
        args_ = shlex.split(sweep.slurm.launch_args)
        for i, a in enumerate(args_):
            config = args_[i + 1] if a == "--config_file" and i + 1 < len(args_) else a.partition("=")[2] \
                if a.startswith("--config_file=") else None
            if config and not Path(config).is_file():
                raise UserError(f"sweep key 'slurm.launch_args': accelerate config '{config}' not found "
                                f"(relative paths are read from {Path.cwd()}, where the script will run)")
        write_manifest(sweep)
        script = write_slurm(sweep, variants)
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"the sbatch script {script} is not valid bash: {check.stderr}")
        print(f"wrote {script} ({len(variants)} array task(s), --array=0-{len(variants) - 1})")
        print(f"submit with:  sbatch {script}")
        print(f"then compare: vlpt report {sweep.output_dir}")
        return 0
    if args.dry_run:
        todo = [v for v in variants if variant_state(v) != "finished"]
        print(f"dry run: would train {len(todo)} variant(s) in turn with "
              f"`{Path(sys.executable).name} -m vlpt.cli train SWEEP_DIR/<variant>/recipe.yaml`; nothing written")
        return 0
    write_manifest(sweep)
    import signal

    def on_term(signum, frame):  # `kill SWEEP_PID`: stop the current run cleanly (it checkpoints), as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return run_local(sweep, variants)
    finally:
        signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------
# vlpt report
# --------------------------------------------------------------------------------------


def direction(metric: str) -> Optional[str]:
    """'min' where lower is better, 'max' where higher is, None for columns not ranked."""
    name = metric.split("/")[-1]
    if name == "step" or name.endswith("_blind") or name in ("wall", "wall_s"):
        return None
    if name.endswith(("mse", "loss", "distance")):
        return "min"
    return "max"


@dataclass
class Row:
    name: str
    status: str
    wall_s: Optional[float]
    metrics: dict[str, float]
    loadavg: Optional[list] = None


def _stage_dirs(run_dir: Path, finetune: bool) -> list[tuple[str, Path]]:
    return [("", run_dir / "finetune"), ("pretrain/", run_dir)] if finetune else [("", run_dir)]


def _dir_status(run_dir: Path) -> tuple[bool, str, Optional[float], Optional[list]]:
    """(finished, status text, wall seconds, load average) of a run folder, read from its files alone."""
    try:
        stage = Stage(from_dict(Recipe, yaml.safe_load((run_dir / "recipe.yaml").read_text()) or {}), run_dir)
    except OSError:
        return False, "not started", None, None
    except (yaml.YAMLError, UserError) as e:
        return False, f"unreadable recipe.yaml ({str(e).splitlines()[0][:80]})", None, None
    if stage_finished(stage):
        done = _read_json(run_dir / "done.json") or {}
        return True, "finished", done.get("wall_s"), done.get("loadavg_end")
    step = latest_checkpoint_step(run_dir)
    if step is not None:
        return False, f"unfinished (step {step}/{stage.recipe.train.steps})", None, None
    return False, "started, no checkpoint yet" if (run_dir / "metrics.jsonl").is_file() else "not started", None, None


def collect(sweep_dir: Path) -> tuple[list[Row], dict]:
    manifest = {}
    if (sweep_dir / "sweep.yaml").is_file():
        manifest = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}
    names = manifest.get("variants") or sorted(p.name for p in sweep_dir.iterdir()
                                               if p.is_dir() and (p / "recipe.yaml").is_file())
    if not names:
        raise UserError(f"'{sweep_dir}' holds no sweep (no sweep.yaml and no variant folders with recipe.yaml)")
    finetune = bool(manifest.get("finetune"))
    rows = []
    for name in names:
        run_dir = sweep_dir / name
        metrics: dict[str, float] = {}
        walls = []
        status = {}
        for prefix, d in _stage_dirs(run_dir, finetune):
            fin, status[prefix], wall, _ = _dir_status(d)
            if wall is not None:
                walls.append(wall)
            ev = _read_json(d / "eval.json") if fin else None
            for k, v in (ev or {}).items():
                if k != "step" and isinstance(v, (int, float)):
                    metrics[prefix + k] = float(v)
        if all(s == "finished" for s in status.values()):
            text = "finished"
        elif finetune and status["pretrain/"] == "finished":
            text = f"pretrained; finetune {status['']}"
        else:
            text = status["pretrain/" if finetune else ""]
        done = _read_json(run_dir / "done.json") or {}
        rows.append(Row(name, text, sum(walls) if walls and text == "finished" else None, metrics,
                        done.get("loadavg_end")))
    return rows, manifest


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "—"
    if v != 0 and abs(v) < 0.01:
        return f"{v:.3g}"
    return f"{v:.3f}"


def report_table(rows: list[Row], metrics: list[str]) -> str:
    best: dict[str, set[str]] = {}
    for m in metrics:
        d = direction(m)
        vals = [(r.metrics[m], r.name) for r in rows if r.status == "finished" and m in r.metrics]
        if d is None or len(vals) < 2:
            continue
        target = (min if d == "min" else max)(round(v, 6) for v, _ in vals)
        best[m] = {n for v, n in vals if round(v, 6) == target}
    head = ["variant", *metrics, "wall"]
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in rows:
        cells = [r.name if r.status == "finished" else f"{r.name} ({r.status})"]
        for m in metrics:
            text = _fmt(r.metrics.get(m))
            cells.append(f"**{text}**" if r.name in best.get(m, ()) else text)
        cells.append(_hms(r.wall_s) if r.wall_s is not None else "—")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _metric_order(rows: list[Row]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        for k in r.metrics:
            if k not in seen:
                seen.append(k)
    return sorted(seen, key=lambda k: (k.startswith("pretrain/"), seen.index(k)))


def _plot(rows: list[Row], metrics: list[str], path: Path) -> bool:
    """Grouped bars: one group per metric, one bar per finished variant. Metrics within [0, 1] where
    higher is better (accuracies, recalls) share one panel; each other metric gets its own."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    done = [r for r in rows if r.status == "finished"]
    shown = [m for m in metrics if any(m in r.metrics for r in done)]
    if not done or not shown:
        return False
    unit = [m for m in shown if direction(m) != "min" and all(0 <= r.metrics.get(m, 0) <= 1 for r in done)]
    other = [m for m in shown if m not in unit]
    panels = ([unit] if unit else []) + [[m] for m in other]
    widths = [max(2.0, 0.9 * len(p) * max(1.0, len(done) / 6)) for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1, 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    colors = plt.get_cmap("tab10" if len(done) <= 10 else "tab20")(range(len(done)))
    bar = 0.8 / len(done)
    for ax, group in zip(axes[0], panels):
        for i, r in enumerate(done):
            xs = [g + (i - (len(done) - 1) / 2) * bar for g in range(len(group))]
            ax.bar(xs, [r.metrics.get(m, float("nan")) for m in group], width=bar, color=colors[i], label=r.name)
        ax.set_xticks(range(len(group)))
        ax.set_xticklabels([m + (" (lower better)" if direction(m) == "min" else "") for m in group],
                           rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend_rows = (len(done) + 4) // 5
    fig.legend(handles, labels, loc="upper center", ncol=min(5, len(done)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 * legend_rows))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def report_main(args) -> int:
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder '{sweep_dir}' not found")
    rows, manifest = collect(sweep_dir)
    available = _metric_order(rows)
    wanted = args.metrics or (manifest.get("report") or {}).get("metrics") or available
    if args.metrics:
        unknown = [m for m in args.metrics if m not in available]
        if unknown and available:
            raise UserError(f"--metrics: no finished variant has '{unknown[0]}'"
                            + (did_you_mean(unknown[0], available) or f"; metrics: {', '.join(available)}"))
    table = report_table(rows, wanted)
    n_done = sum(r.status == "finished" for r in rows)
    legend = ("Best finished value per column in bold (lowest for *mse/*loss/*distance; *_blind not ranked). "
              + ("Plain columns: after the common finetune; pretrain/...: the pretrained model's own evaluation. "
                 if manifest.get("finetune") else "")
              + f"{n_done} of {len(rows)} variant(s) finished.")
    print(table)
    print()
    print(legend)
    (sweep_dir / "report.md").write_text(f"# Sweep report: {sweep_dir.name}\n\n{table}\n\n{legend}\n")
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "status", "wall_s", "loadavg_end", *available])
    for r in rows:
        w.writerow([r.name, r.status, "" if r.wall_s is None else r.wall_s, "" if not r.loadavg else r.loadavg[0],
                    *["" if m not in r.metrics else r.metrics[m] for m in available]])
    (sweep_dir / "report.csv").write_text(buf.getvalue())
    wrote = ["report.md", "report.csv"]
    if _plot(rows, wanted, sweep_dir / "report.png"):
        wrote.append("report.png")
    print(f"vlpt report: wrote {', '.join(wrote)} in {sweep_dir}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------
# helpers the slurm script calls: python -m vlpt.sweep warm-start | mark-done
# --------------------------------------------------------------------------------------


def _helper_main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vlpt.sweep", description="helpers of vlpt sweep's slurm script")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("warm-start", help="write step 0 of a finetune run from a pretrained run's weights")
    w.add_argument("finetune_recipe")
    w.add_argument("pretrained_run")
    w.add_argument("--carry", choices=["encoder", "all"], default="encoder")
    d = sub.add_parser("mark-done", help="write done.json into a finished run folder")
    d.add_argument("run_dir")
    d.add_argument("--wall-s", type=float, default=0.0)
    d.add_argument("--launcher", default="slurm")
    args = p.parse_args(argv)
    try:
        if args.cmd == "warm-start":
            warm_start(args.finetune_recipe, args.pretrained_run, args.carry)
        else:
            from .recipe import load_recipe

            run_dir = Path(args.run_dir)
            stage = Stage(load_recipe(run_dir / "recipe.yaml"), run_dir)
            if not reached_end(stage):
                raise UserError(f"'{run_dir}' has not reached step {stage.recipe.train.steps}")
            _write_done(stage, args.wall_s, args.launcher, None, {"job": os.environ.get("SLURM_JOB_ID")})
    except UserError as e:
        print(f"vlpt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_helper_main())
