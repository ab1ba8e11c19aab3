"""``vlpt sweep SWEEP.yaml [key=value ...]``: list the variants, then run them here or write the SLURM script."""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import yaml

from .local import run_local
from .slurm import write_slurm
from .spec import Sweep, Variant, load_sweep, select
from .state import variant_state


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


def describe(ov: dict[str, Any]) -> str:
    """What a variant changes, in one line."""
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
    """``SWEEP_DIR/sweep.yaml``: the sweep file as given, the variants in order and their stages
    (what ``vlpt report`` reads)."""
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "sweep_file": str(sweep.path),
        "variants": [v.name for v in sweep.variants],
        "finetune": any(v.finetune for v in sweep.variants),
        "downstream": sweep.downstream,
        "report": {"metrics": sweep.report_metrics} if sweep.report_metrics else {},
        "sweep": sweep.raw,
        "cli_overrides": sweep.cli_overrides,
    }
    (sweep.output_dir / "sweep.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def _list(sweep: Sweep, variants: list[Variant]) -> None:
    print(f"sweep {sweep.path}: {len(sweep.variants)} variant(s), all valid; output in {sweep.output_dir}/")
    later = [s.label for s in sweep.variants[0].stages[1:]]
    stages = f" + {' + '.join(later)}" if later else ""
    width = max(len(v.name) for v in variants)
    for v in variants:
        print(f"  {v.name:{width}s}  {variant_state(v):28s} {v.pretrain.recipe.train.steps} steps{stages}: "
              f"{describe(v.overrides)}")


def sweep_main(args) -> int:
    slurm = args.launcher == "slurm"
    # data files are checked where the data lives: here for local runs, on the cluster for slurm
    sweep = load_sweep(args.sweep, check_data=not slurm, cli_overrides=getattr(args, "overrides", None) or ())
    variants = select(sweep, args.only)
    _list(sweep, variants)
    if slurm:
        script = write_slurm(sweep, variants)
        write_manifest(sweep)
        print(f"wrote {script} ({len(variants)} array task(s), --array=0-{len(variants) - 1})")
        print(f"submit with:  sbatch {script}")
        print(f"then compare: vlpt report {sweep.output_dir}")
        return 0
    if args.dry_run:
        todo = [v for v in variants if variant_state(v) != "finished"]
        print(f"dry run: would train {len(todo)} variant(s) in turn with "
              f"`{Path(sys.executable).name} -m vlpt.cli train SWEEP_DIR/<variant>/.../recipe.yaml`; nothing written")
        return 0
    write_manifest(sweep)

    def on_term(signum, frame):  # `kill SWEEP_PID`: stop the current run cleanly (it checkpoints), as Ctrl-C does
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return run_local(sweep, variants)
    finally:
        signal.signal(signal.SIGTERM, previous)
