"""``vlpt report SWEEP_DIR``: the variants of a sweep compared, from their run folders alone.

One row per variant, one column per final ``eval.json`` metric: a ``finetune:`` stage's metrics
as the plain columns, each ``downstream:`` task's as ``<task>/<metric>``, and the pretrained
model's own as ``pretrain/<metric>`` when later stages exist. ``meta_sum`` adds every downstream
task's listed metrics (in percent, as UNITER's Meta-Sum) for variants whose downstream tasks are
all finished. Printed as markdown and written as ``report.md``, ``report.csv`` (every metric) and,
with matplotlib, ``report.png`` (:func:`vlpt.plot.plot_comparison`).
"""
from __future__ import annotations

import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ..errors import UserError, did_you_mean
from ..recipe import TrainConfig
from ..run_dir import RunDir
from .local import hms
from .spec import PRETRAIN

META_SUM = "meta_sum"


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


@dataclass
class StageResult:
    label: str
    finished: bool
    state: str
    done: dict
    metrics: dict[str, float]


def read_stage(label: str, run: RunDir) -> StageResult:
    """A stage's state (from its recipe's ``train.steps`` and its ``done.json``) and, once finished,
    its final evaluation."""
    try:
        raw = yaml.safe_load(run.recipe.read_text()) or {}
        steps = int((raw.get("train") or {}).get("steps", TrainConfig.steps))
    except OSError:
        return StageResult(label, False, "not started", {}, {})
    except (yaml.YAMLError, AttributeError, TypeError, ValueError) as e:
        return StageResult(label, False, f"unreadable recipe.yaml ({str(e).splitlines()[0][:80]})", {}, {})
    state = run.state(steps)
    if state != "finished":
        return StageResult(label, False, state, {}, {})
    metrics = {k: float(v) for k, v in (run.read_eval() or {}).items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return StageResult(label, True, state, run.read_done() or {}, metrics)


def stage_prefixes(manifest: dict) -> list[tuple[str, str, str]]:
    """(label, folder below the variant's, column prefix) of every stage the manifest names."""
    downstream = manifest.get("downstream") or {}
    later = bool(manifest.get("finetune") or downstream)
    out = [(PRETRAIN, ".", "pretrain/" if later else "")]
    if manifest.get("finetune"):
        out.append(("finetune", "finetune", ""))
    out += [(f"downstream/{t}", f"downstream/{t}", f"{t}/") for t in downstream]
    return out


def meta_sum(metrics: dict[str, float], downstream: dict[str, list[str]], name: str) -> Optional[float]:
    """100 × the sum of every downstream task's listed metrics; None (with a note) where one is missing."""
    total = 0.0
    for task, listed in downstream.items():
        for m in listed:
            if f"{task}/{m}" not in metrics:
                have = sorted(k.split("/", 1)[1] for k in metrics if k.startswith(f"{task}/"))
                print(f"vlpt report: note: {name}: downstream task '{task}' has no metric '{m}' in its eval.json"
                      + (did_you_mean(m, have) or f" (it has: {', '.join(have) or 'none'})") + f"; no {META_SUM}",
                      file=sys.stderr)
                return None
            total += metrics[f"{task}/{m}"]
    return 100.0 * total


def collect_row(name: str, run_dir: Path, manifest: dict) -> Row:
    results = [(prefix, read_stage(label, RunDir(run_dir / folder))) for label, folder, prefix in
               stage_prefixes(manifest)]
    metrics = {prefix + k: v for prefix, r in results for k, v in r.metrics.items()}
    unfinished = [r for _, r in results if not r.finished]
    if not unfinished:
        status = "finished"
    else:
        first = unfinished[0]
        status = first.state if first.label == PRETRAIN else f"pretrained; {first.label} {first.state}"
    downstream = manifest.get("downstream") or {}
    if downstream and all(r.finished for _, r in results if r.label.startswith("downstream/")):
        total = meta_sum(metrics, downstream, name)
        if total is not None:
            metrics[META_SUM] = total
    walls = [r.done.get("wall_s") for _, r in results]
    wall = sum(walls) if status == "finished" and all(isinstance(w, (int, float)) for w in walls) else None
    done = results[0][1].done
    return Row(name, status, wall, metrics, done.get("loadavg") or done.get("loadavg_end"))


def collect(sweep_dir: Path) -> tuple[list[Row], dict]:
    manifest = {}
    if (sweep_dir / "sweep.yaml").is_file():
        manifest = yaml.safe_load((sweep_dir / "sweep.yaml").read_text()) or {}
    names = manifest.get("variants") or sorted(p.name for p in sweep_dir.iterdir()
                                               if p.is_dir() and RunDir(p).recipe.is_file())
    if not names:
        raise UserError(f"'{sweep_dir}' holds no sweep (no sweep.yaml and no variant folders with recipe.yaml)")
    return [collect_row(name, sweep_dir / name, manifest) for name in names], manifest


def _fmt(v: Optional[float], metric: str = "") -> str:
    if v is None:
        return "—"
    if metric == META_SUM:  # as UNITER's Table 2 prints it
        return f"{v:.2f}"
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
            text = _fmt(r.metrics.get(m), m)
            cells.append(f"**{text}**" if r.name in best.get(m, ()) else text)
        cells.append(hms(r.wall_s) if r.wall_s is not None else "—")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def metric_order(rows: list[Row], downstream: dict[str, list[str]]) -> list[str]:
    """Every metric of any row: the finetune's, the downstream tasks', ``meta_sum``, the pretraining's."""
    seen: list[str] = []
    for r in rows:
        seen += [k for k in r.metrics if k not in seen]

    def group(k: str) -> int:
        head = k.split("/", 1)[0] if "/" in k else ""
        return 2 if k == META_SUM else 3 if head == "pretrain" else 1 if head in downstream else 0
    return sorted(seen, key=lambda k: (group(k), seen.index(k)))


def default_columns(available: list[str], downstream: dict[str, list[str]]) -> list[str]:
    """Without ``--metrics`` or ``report.metrics``: the listed downstream metrics and ``meta_sum``
    first, then every metric but the downstream tasks' other ones (those are in the CSV)."""
    listed = [f"{t}/{m}" for t, ms in downstream.items() for m in ms]
    rest = [k for k in available if k not in listed and k != META_SUM
            and not ("/" in k and k.split("/", 1)[0] in downstream)]
    return listed + ([META_SUM] if downstream else []) + rest


def legend(rows: list[Row], manifest: dict) -> str:
    downstream = manifest.get("downstream") or {}
    parts = ["Best finished value per column in bold (lowest for *mse/*loss/*distance; *_blind not ranked)."]
    if manifest.get("finetune"):
        parts.append("Plain columns: after the common finetune.")
    if downstream:
        parts.append("<task>/...: after finetuning on that downstream task; "
                     f"{META_SUM}: 100 × the sum of {', '.join(f'{t}/{m}' for t, ms in downstream.items() for m in ms)}.")
    if manifest.get("finetune") or downstream:
        parts.append("pretrain/...: the pretrained model's own evaluation.")
    parts.append(f"{sum(r.status == 'finished' for r in rows)} of {len(rows)} variant(s) finished.")
    return " ".join(parts)


def write_csv(rows: list[Row], available: list[str], path: Path) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "status", "wall_s", "loadavg_end", *available])
    for r in rows:
        w.writerow([r.name, r.status, "" if r.wall_s is None else r.wall_s, "" if not r.loadavg else r.loadavg[0],
                    *["" if m not in r.metrics else r.metrics[m] for m in available]])
    path.write_text(buf.getvalue())


def report_main(args) -> int:
    from ..plot import plot_comparison

    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.is_dir():
        raise UserError(f"sweep folder '{sweep_dir}' not found")
    rows, manifest = collect(sweep_dir)
    downstream = manifest.get("downstream") or {}
    available = metric_order(rows, downstream)
    if args.metrics:
        unknown = [m for m in args.metrics if m not in available]
        if unknown and available:
            raise UserError(f"--metrics: no finished variant has '{unknown[0]}'"
                            + (did_you_mean(unknown[0], available) or f"; metrics: {', '.join(available)}"))
    listed = (manifest.get("report") or {}).get("metrics") or []
    if available and not args.metrics:  # the sweep file's own list: a note, as it is not the user's command
        for m in (m for m in listed if m not in available):
            print(f"vlpt report: note: the sweep's report.metrics names '{m}', which no finished variant has"
                  + (did_you_mean(m, available) or ""), file=sys.stderr)
    wanted = args.metrics or listed or default_columns(available, downstream)
    table, text = report_table(rows, wanted), legend(rows, manifest)
    print(table)
    print()
    print(text)
    (sweep_dir / "report.md").write_text(f"# Sweep report: {sweep_dir.name}\n\n{table}\n\n{text}\n")
    write_csv(rows, available, sweep_dir / "report.csv")
    wrote = ["report.md", "report.csv"]
    finished = [(r.name, r.metrics) for r in rows if r.status == "finished"]
    if plot_comparison(finished, wanted, sweep_dir / "report.png", {m for m in wanted if direction(m) == "min"}):
        wrote.append("report.png")
    print(f"vlpt report: wrote {', '.join(wrote)} in {sweep_dir}", file=sys.stderr)
    return 0
