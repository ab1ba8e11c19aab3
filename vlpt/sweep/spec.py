"""A sweep file read into variants and their stages, every stage's recipe validated before anything runs.

The format is described in ``docs/sweeps.md``. Overrides speak the recipe's one override language
(:func:`vlpt.recipe.merge`); names of grid points are made here; the stages after pretraining
(``finetune:``, ``downstream:``) are built by :mod:`vlpt.sweep.stages`.
"""
from __future__ import annotations

import fnmatch
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..checks import check_files
from ..errors import RecipeError, UserError, did_you_mean
from ..recipe import Recipe, from_dict, load_raw, merge, parse_overrides
from ..run_dir import RunDir

SWEEP_KEYS = ("base", "output_dir", "overrides", "variants", "grid", "finetune", "downstream", "slurm", "report",
              "anchors")
NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")
PRETRAIN = "pretrain"  # the label of a variant's first stage (its folder is the variant's own)


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
    launch_args: str = ""  # more accelerate launch options, e.g. "--config_file recipes/launch/fsdp-1x8.yaml"


@dataclass
class Stage:
    """One training run of a variant: its pretraining, its finetune, or one downstream task."""

    label: str  # "pretrain", "finetune" or "downstream/<task>"
    recipe: Recipe
    run_dir: Path
    metrics: list[str] = field(default_factory=list)  # downstream: the metrics its Meta-Sum adds

    @property
    def run(self) -> RunDir:
        return RunDir(self.run_dir)

    @property
    def recipe_path(self) -> Path:
        return self.run.recipe

    @property
    def folder(self) -> str:
        """The stage's folder below the variant's (``.`` for the pretraining)."""
        return "." if self.label == PRETRAIN else self.label

    def finished(self) -> bool:
        return self.run.finished(self.recipe.train.steps)


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any]  # what the variant and grid point change (for listings)
    stages: list[Stage]  # the pretraining first, then the finetune, then each downstream task

    @property
    def pretrain(self) -> Stage:
        return self.stages[0]

    @property
    def run_dir(self) -> Path:
        return self.pretrain.run_dir

    @property
    def finetune(self) -> Optional[Stage]:
        return next((s for s in self.stages if s.label == "finetune"), None)


@dataclass
class Sweep:
    path: Path
    name: str
    output_dir: Path
    variants: list[Variant]
    slurm: SlurmConfig
    report_metrics: Optional[list[str]]
    raw: dict
    cli_overrides: dict = field(default_factory=dict)

    @property
    def stage_folders(self) -> list[str]:
        """Every variant's stages, as folders below its own (the same for all variants)."""
        return [s.folder for s in self.variants[0].stages]

    @property
    def downstream(self) -> dict[str, list[str]]:
        """Downstream task -> the metrics its Meta-Sum adds."""
        return {s.label.split("/", 1)[1]: s.metrics for s in self.variants[0].stages if s.label.startswith("downstream/")}


# --------------------------------------------------------------------------------------
# small readers
# --------------------------------------------------------------------------------------


def mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"sweep key '{where}' must be a mapping, got {value!r}")
    return value


def check_keys(data: dict, allowed: tuple, where: str) -> None:
    for k in data:
        if k not in allowed:
            prefix = f"{where}." if where else ""
            hint = did_you_mean(k, allowed) or f"; valid keys: {', '.join(allowed)}"
            raise UserError(f"unknown sweep key '{prefix}{k}'{hint}")


def resolve_path(p: str | os.PathLike, base: Path) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else base / p


def load_recipe_raw(path: Path, where: str) -> dict:
    """A recipe file's raw mapping (``extends:`` applied) whose plugin files still load from elsewhere."""
    if not path.is_file():
        raise UserError(f"sweep key '{where}': recipe '{path}' not found")
    raw = load_raw(path)
    plugins = raw.get("plugins")
    if isinstance(plugins, list):
        raw["plugins"] = [str((path.parent / p).resolve()) if isinstance(p, str) and p.endswith(".py")
                          and not Path(p).is_absolute() else p for p in plugins]
    return raw


def build_recipe(raw: dict, where: str, run_dir: Path, check_data: bool) -> Recipe:
    """Type-check and validate a raw recipe whose ``output_dir`` is ``run_dir``; errors name ``where``."""
    raw = {**raw, "output_dir": str(run_dir)}
    try:
        recipe = from_dict(Recipe, raw)
        recipe.source = str(RunDir(run_dir).recipe)
        check_files(recipe, data=check_data)
        from ..tasks import resolve_tasks  # torch: not for `vlpt report`, which reads this module too

        resolve_tasks(recipe)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return recipe


def apply(raw: dict, overrides: dict, where: str) -> dict:
    try:
        return merge(raw, overrides)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None


# --------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------


def _value_name(value: Any, index: int) -> str:
    if isinstance(value, (dict, list)):
        return str(index)
    if isinstance(value, float):
        return format(value, "g")
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def clean_name(name: str) -> str:
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
        out.append((clean_name(name), {k: v for k, (_, v) in zip(keys, combo)}))
    return out


def _named_variants(data: dict) -> list[tuple[str, dict]]:
    variants = data.get("variants")
    if isinstance(variants, list):
        raise UserError("sweep key 'variants' must be a mapping of name: {overrides}")
    variants = mapping(variants, "variants")
    for name, ov in variants.items():
        if not isinstance(name, str) or not NAME_OK.match(name):
            raise UserError(f"sweep key 'variants.{name}': a variant name uses letters, digits and ._=+- only")
        mapping(ov, f"variants.{name}")
    return [(name, ov or {}) for name, ov in variants.items()] or [("", {})]


# --------------------------------------------------------------------------------------
# the sweep file
# --------------------------------------------------------------------------------------


def _read_sweep_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"sweep file '{path}' not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"sweep file '{path}' is not valid YAML: {getattr(e, 'problem', e)}") from None
    data = {} if data is None else data  # an empty file: its missing keys are named below
    if not isinstance(data, dict):
        raise UserError(f"sweep file '{path}' must be a mapping of sweep keys (base, output_dir, variants, ...), "
                        f"got {type(data).__name__}")
    check_keys(data, SWEEP_KEYS, "")
    for key, what in (("base", "the recipe every variant starts from"), ("output_dir", "the sweep's folder")):
        if not data.get(key):
            raise UserError(f"sweep file '{path}': '{key}' ({what}) is missing")
    return data


def _slurm_and_report(data: dict) -> tuple[SlurmConfig, Optional[list[str]]]:
    section = mapping(data.get("slurm"), "slurm")
    if "python" in section:  # the interpreter of helpers the script no longer calls
        raise UserError("sweep key 'slurm.python' is no longer used (the script runs no vlpt helpers): remove it")
    try:
        slurm = from_dict(SlurmConfig, section, "slurm")
    except RecipeError as e:
        raise UserError(str(e).replace("recipe key", "sweep key")) from None
    report = mapping(data.get("report"), "report")
    check_keys(report, ("metrics",), "report")
    metrics = report.get("metrics")
    if metrics is not None and not (isinstance(metrics, list) and all(isinstance(m, str) for m in metrics)):
        raise UserError("sweep key 'report.metrics' must be a list of metric names")
    return slurm, metrics


def load_sweep(path: str | Path, check_data: bool = True, cli_overrides: list[str] | tuple = ()) -> Sweep:
    """Read a sweep file, expand it into variants and validate every stage's recipe.

    ``cli_overrides`` (``key.path=value``) apply to every variant's pretraining after the file's
    ``overrides``; ``output_dir=DIR`` moves the sweep's folder.
    """
    from .stages import later_stage_specs

    path = Path(path)
    data = _read_sweep_file(path)
    here = path.parent
    base_path = resolve_path(data["base"], here)
    if not base_path.is_file():
        raise UserError(f"sweep key 'base': recipe '{data['base']}' not found"
                        + ("" if Path(data["base"]).expanduser().is_absolute() else f" (looked in {here})"))
    given = parse_overrides(cli_overrides)
    extra = dict(given)
    out_dir = Path(os.path.expanduser(str(extra.pop("output_dir", data["output_dir"]))))
    base_raw = load_recipe_raw(base_path, "base")
    common = {**mapping(data.get("overrides"), "overrides"), **extra}
    named, points = _named_variants(data), grid_points(mapping(data.get("grid"), "grid"))
    if not data.get("variants") and not data.get("grid"):
        raise UserError(f"sweep file '{path}' has neither 'variants' nor 'grid': nothing to run")
    later = later_stage_specs(data, here, base_path)
    slurm, metrics = _slurm_and_report(data)

    variants: list[Variant] = []
    for vname, vov in named:
        for gname, gov in points:
            name = "_".join(n for n in (vname, gname) if n)
            if any(v.name == name for v in variants):
                raise UserError(f"sweep file '{path}': two variants are both named '{name}'")
            where = f"sweep '{path}' variant '{name}'"
            raw = apply(apply(apply(base_raw, common, where), vov, where), gov, where)
            pre = Stage(PRETRAIN, build_recipe(raw, where, out_dir / name, check_data), out_dir / name)
            stages = [pre] + [spec.stage(pre, f"{where} ({spec.label})", check_data) for spec in later]
            variants.append(Variant(name, {**vov, **gov}, stages))
    return Sweep(path, path.stem, out_dir, variants, slurm, metrics, data, given)


def select(sweep: Sweep, only: list[str] | None) -> list[Variant]:
    if not only:
        return sweep.variants
    names = [v.name for v in sweep.variants]
    for pattern in only:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserError(f"--only: no variant named '{pattern}'"
                            + (did_you_mean(pattern, names) or f"; variants: {', '.join(names)}"))
    return [v for v in sweep.variants if any(fnmatch.fnmatchcase(v.name, p) for p in only)]
