"""The SLURM launcher: the project's one SLURM script (``vlpt/sweep/train.sbatch``), filled in for a sweep.

The script is what a user submits for a single run (``sbatch vlpt/sweep/train.sbatch RECIPE
[key=value ...]``). For a sweep, its header block is replaced by ``#SBATCH`` lines from the sweep
file's ``slurm:`` section (a job array, one index per variant) and its sweep settings block names
the variants and their stage folders: array task *i* trains the stage recipes of variant *i* in
order, skipping a stage whose ``done.json`` says it is finished. The recipes are written beside.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import UserError
from .spec import Sweep, Variant, clean_name
from .state import write_recipe

TEMPLATE = "train.sbatch"


def template_text() -> str:
    """The SLURM script as shipped in the package."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text()


def fill_block(script: str, block: str, lines: list[str]) -> str:
    """Replace what lies between ``# >>> block`` and ``# <<< block`` (the marker lines stay)."""
    pattern = re.compile(rf"(^# >>> {re.escape(block)}\b[^\n]*\n)(.*?)(^# <<< {re.escape(block)}\n)", re.M | re.S)
    if len(pattern.findall(script)) != 1:
        raise RuntimeError(f"the SLURM script {TEMPLATE} has no single '{block}' block")
    return pattern.sub(lambda m: m.group(1) + "".join(line + "\n" for line in lines) + m.group(3), script)


def _q(s: Any) -> str:
    return shlex.quote(str(s))


def sweep_dir(sweep: Sweep) -> Path:
    return sweep.output_dir if sweep.output_dir.is_absolute() else sweep.output_dir.resolve()


def header_lines(sweep: Sweep, variants: list[Variant]) -> list[str]:
    s, out, n = sweep.slurm, sweep_dir(sweep), len(variants)
    array = f"0-{n - 1}" + (f"%{s.max_parallel}" if s.max_parallel else "")
    lines = [
        f"# vlpt sweep {sweep.path}: {n} variant(s), one per array index; stages: {' '.join(sweep.stage_folders)}",
        f"# Submit: sbatch {out / 'sweep.sbatch'}",
        f"#SBATCH --job-name={s.job_name or 'vlpt-' + clean_name(sweep.name)}",
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
    lines += [f"#SBATCH --output={out}/slurm/%A_%a.out", "#SBATCH --open-mode=append", "#SBATCH --requeue",
              f"#SBATCH --signal=B:USR1@{s.requeue_before}"]
    return lines + [f"#SBATCH {opt}" for opt in s.sbatch]


def settings_lines(sweep: Sweep, variants: list[Variant], workdir: Path) -> list[str]:
    s = sweep.slurm
    return [
        f"cd {_q(workdir)}  # where `vlpt sweep` ran: relative paths in the recipes mean the same",
        *s.setup,
        f"SWEEP_DIR={_q(sweep_dir(sweep))}",
        f"VARIANTS=({' '.join(_q(v.name) for v in variants)})",
        f"STAGES=({' '.join(_q(f) for f in sweep.stage_folders)})",
        'LAUNCH_CONFIG=""  # the accelerate settings are in LAUNCH_ARGS',
        f"LAUNCH_ARGS={_q(s.launch_args)}",
        f"GPUS_PER_NODE={max(s.gpus_per_node, 1)}",
        'MAIN_PORT="${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"  # array tasks sharing a node differ',
    ]


def sbatch_script(sweep: Sweep, variants: list[Variant], workdir: Path) -> str:
    script = fill_block(template_text(), "header", header_lines(sweep, variants))
    return fill_block(script, "sweep settings", settings_lines(sweep, variants, workdir))


def check_launch_args(sweep: Sweep) -> None:
    """An accelerate config named in ``slurm.launch_args`` must exist where the script will run."""
    args = shlex.split(sweep.slurm.launch_args)
    for i, a in enumerate(args):
        config = args[i + 1] if a == "--config_file" and i + 1 < len(args) else \
            a.partition("=")[2] if a.startswith("--config_file=") else None
        if config and not Path(config).is_file():
            raise UserError(f"sweep key 'slurm.launch_args': accelerate config '{config}' not found "
                            f"(relative paths are read from {Path.cwd()}, where the script will run)")


def write_slurm(sweep: Sweep, variants: list[Variant]) -> Path:
    """Every stage's recipe, and ``SWEEP_DIR/sweep.sbatch`` (checked with ``bash -n``)."""
    check_launch_args(sweep)
    for v in variants:
        for stage in v.stages:
            write_recipe(stage)
    (sweep.output_dir / "slurm").mkdir(parents=True, exist_ok=True)
    path = sweep.output_dir / "sweep.sbatch"
    path.write_text(sbatch_script(sweep, variants, Path.cwd()))
    path.chmod(0o755)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"the sbatch script {path} is not valid bash: {check.stderr}")
    return path
