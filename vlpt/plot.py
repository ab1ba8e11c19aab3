"""``vlpt plot RUN_DIR``: a run's ``metrics.jsonl`` as one PNG (and ``vlpt report``'s comparison bars).

Panels (each drawn only when the log has its keys):

- training loss per task (``loss/<task>``): a faint line of the logged values and an
  exponential moving average over it;
- per-objective training metrics other than losses (``mlm/acc``, ``itm/acc``, ...);
- evaluation metrics (``eval/<metric>``) over steps;
- throughput (``samples_per_s``) with model FLOP utilisation (``mfu``) on a second axis;
- learning rate, with the gradient norm (``grad_norm``) on a second axis.

A run resumed from a checkpoint appends to the same log, logging again from the
checkpoint's step: the later lines replace the earlier ones from that step on, so the
plot shows the run as it continued.

:func:`plot_comparison` draws ``vlpt report``'s grouped bars: one group per metric, one bar per
variant of a sweep.

matplotlib is an optional extra (``pip install 'vlpt[plot]'``); the figures are drawn on an
Agg canvas directly, never through pyplot, so they need no display and leave the backend of an
interactive session alone.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable

from .errors import UserError
from .run_dir import RunDir

Series = dict[str, tuple[list[float], list[float]]]  # key -> (steps, values)

# keys that are bookkeeping, not curves
_SKIP = {"step", "time", "samples", "tokens", "padded_tokens", "flops"}


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a ``metrics.jsonl`` and the number of unreadable lines
    (a run killed mid-write can leave a truncated last line)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no metrics log at {path} (is it a run folder? `vlpt train` writes output_dir/metrics.jsonl)")
    records, bad = [], 0
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
                records.append(rec)
            else:
                bad += 1
    if not records:
        raise UserError(f"{path} holds no logged steps yet")
    return records, bad


def latest_attempt(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines of the run as it continued. A resumed run logs again from its checkpoint's step:
    where a training line's step is at or before the last training step logged (or any line goes
    back in steps), the earlier lines from that step on are dropped."""
    kept: list[dict[str, Any]] = []
    last_train = -math.inf
    for rec in records:
        step = float(rec["step"])
        training = not _is_eval(rec)
        if kept and (step < float(kept[-1]["step"]) or (training and step <= last_train)):
            kept = [r for r in kept if float(r["step"]) < step]
            last_train = max((float(r["step"]) for r in kept if not _is_eval(r)), default=-math.inf)
        kept.append(rec)
        if training:
            last_train = step
    return kept


def _is_eval(rec: dict[str, Any]) -> bool:
    return all(k.startswith("eval/") for k in rec if k not in _SKIP)


def collect(records: Iterable[dict[str, Any]]) -> Series:
    """Every numeric key of the run's latest attempt (see ``latest_attempt``) as a (steps, values) series."""
    series: Series = {}
    for rec in latest_attempt(records):
        step = float(rec["step"])
        for k, v in rec.items():
            if k in _SKIP or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            steps, values = series.setdefault(k, ([], []))
            steps.append(step)
            values.append(float(v))
    return series


def ema(values: list[float], span: int | None = None) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing); by default the
    span is about a twentieth of the series, so short logs stay close to the raw values."""
    if span is None:
        span = max(1, len(values) // 20)
    alpha = 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def task_losses(records: list[dict[str, Any]], series: Series) -> Series:
    """``loss/<task>`` series; for logs without them, ``loss`` split by the ``task`` field."""
    found = {k[len("loss/"):]: v for k, v in series.items() if k.startswith("loss/")}
    if found or "loss" not in series:
        return found
    by_task: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if "loss" in rec:
            by_task.setdefault(str(rec.get("task", "loss")), []).append({"step": rec["step"], "loss": rec["loss"]})
    found = {t: collect(recs).get("loss") for t, recs in by_task.items()}
    return {t: v for t, v in found.items() if v}


def _raw_and_smoothed(ax, series: dict, faint: float, width: float) -> None:
    """Each named series twice in one color: raw and faint, then smoothed (a marker when too short to see)."""
    for i, (name, (steps, values)) in enumerate(sorted(series.items())):
        color = f"C{i % 10}"
        ax.plot(steps, values, color=color, alpha=faint, linewidth=0.8)
        ax.plot(steps, ema(values), color=color, linewidth=width, label=name, marker="o" if len(steps) < 3 else None)


def plot_run(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw ``run``'s metrics (a run folder or a ``metrics.jsonl`` file) to a PNG; return its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("vlpt plot needs matplotlib: pip install 'vlpt[plot]'") from None
    run = Path(run)
    path = run if run.is_file() else RunDir(run).metrics
    records, bad = read_metrics(path)
    if bad:
        print(f"vlpt: skipped {bad} unreadable line(s) in {path}", file=sys.stderr)
    series = collect(records)
    losses = task_losses(records, series)
    objective = {k: v for k, v in series.items()
                 if "/" in k and not k.startswith(("loss/", "eval/", "data/")) and not k.endswith("/loss")}
    evals = {k[len("eval/"):]: v for k, v in series.items() if k.startswith("eval/")}

    panels = []
    if losses:
        panels.append("loss")
    if objective:
        panels.append("objective")
    if evals:
        panels.append("eval")
    if "samples_per_s" in series or "mfu" in series:
        panels.append("speed")
    if "lr" in series:
        panels.append("lr")
    if not panels:
        raise UserError(f"{path} has no curves to draw (no loss, eval, throughput or lr keys)")

    cols = 1 if len(panels) == 1 else 2
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.4 * cols, 3.6 * rows), layout="constrained")
    FigureCanvasAgg(fig)  # Agg, without pyplot: no display, no global backend switched
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    title = run.name if run.is_dir() else run.parent.name
    last = max(steps[-1] for steps, _ in series.values())
    fig.suptitle(f"{title}: {len(records)} log lines, last step {int(last)}")

    for ax, panel in zip(axes, panels):
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
        ax.set_xlim(0, max(last, 1) * 1.02)  # one step axis for every panel
        if panel == "loss":
            _raw_and_smoothed(ax, losses, faint=0.25, width=1.6)
            ax.set_title("training loss per task (raw, faint; smoothed)")
            ax.legend(fontsize=8)
        elif panel == "objective":
            _raw_and_smoothed(ax, objective, faint=0.2, width=1.4)
            ax.set_title("training metrics per objective (smoothed)")
            ax.legend(fontsize=7, ncol=2)
        elif panel == "eval" and len({s for steps, _ in evals.values() for s in steps}) == 1:
            # a single evaluation (e.g. at the end only): its values as bars, read more easily than dots
            names = sorted(evals)
            values = [evals[n][1][-1] for n in names]
            ax.barh(range(len(names)), values, color=["C7" if n.endswith("_blind") else "C0" for n in names])
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.invert_yaxis()
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:.3g}", va="center", fontsize=7)
            ax.set_xlabel("value")
            ax.set_xlim(min(0.0, *values), max(1.0, *values) * 1.15)
            ax.set_title(f"evaluation at step {int(evals[names[0]][0][-1])}")
            continue
        elif panel == "eval":
            for i, (name, (steps, values)) in enumerate(sorted(evals.items())):
                style = "--" if name.endswith("_blind") else "-"
                ax.plot(steps, values, style, marker="o", markersize=3, color=f"C{i % 10}", label=name)
            ax.set_title("evaluation (dashed: image features zeroed)" if any(n.endswith("_blind") for n in evals)
                         else "evaluation")
            ax.legend(fontsize=6, ncol=2)
        elif panel == "speed":
            if "samples_per_s" in series:
                steps, values = series["samples_per_s"]
                ax.plot(steps, values, color="C0", label="samples/s")
                ax.set_ylabel("samples/s (all ranks)", color="C0")
                ax.set_ylim(bottom=0)
            if "mfu" in series:
                twin = ax.twinx()
                steps, values = series["mfu"]
                twin.plot(steps, [100 * v for v in values], "--", color="C3", alpha=0.7, linewidth=0.9)
                twin.set_ylabel("MFU (%)", color="C3")
                twin.set_ylim(bottom=0)
            ax.set_title("throughput")
        elif panel == "lr":
            steps, values = series["lr"]
            ax.plot(steps, values, color="C2")
            ax.set_ylabel("learning rate", color="C2")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            if "grad_norm" in series:
                twin = ax.twinx()
                steps, values = series["grad_norm"]
                twin.plot(steps, values, color="C4", alpha=0.25, linewidth=0.8)
                twin.plot(steps, ema(values), color="C4", linewidth=1.2)
                twin.set_ylabel("gradient norm (before clipping)", color="C4")
            ax.set_title("learning rate" + (" and gradient norm" if "grad_norm" in series else ""))

    out = Path(out) if out else (run.parent if run.is_file() else run) / "metrics.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def plot_comparison(variants: list[tuple[str, dict[str, float]]], metrics: list[str], out: str | Path,
                    lower_better: set[str] | frozenset = frozenset()) -> bool:
    """``vlpt report``'s grouped bars: one group per metric, one bar per variant (name, metrics).
    Metrics within [0, 1] where higher is better (accuracies, recalls) share one panel; each other
    metric (a loss, a Meta-Sum) gets its own. False, drawing nothing, without matplotlib or values."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    shown = [m for m in metrics if any(m in values for _, values in variants)]
    if not variants or not shown:
        return False
    unit = [m for m in shown if m not in lower_better and all(0 <= v.get(m, 0) <= 1 for _, v in variants)]
    panels = ([unit] if unit else []) + [[m] for m in shown if m not in unit]
    n = len(variants)
    widths = [max(2.0, 0.9 * len(p) * max(1.0, n / 6)) for p in panels]
    fig = Figure(figsize=(sum(widths) + 1, 4.6))
    FigureCanvasAgg(fig)  # Agg, without pyplot, as plot_run
    axes = fig.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": widths})[0]
    colors = colormaps["tab10" if n <= 10 else "tab20"]
    bar = 0.8 / n
    for ax, group in zip(axes, panels):
        for i, (name, values) in enumerate(variants):
            xs = [g + (i - (n - 1) / 2) * bar for g in range(len(group))]
            ax.bar(xs, [values.get(m, math.nan) for m in group], width=bar, color=colors(i), label=name)
        ax.set_xticks(range(len(group)), [m + (" (lower better)" if m in lower_better else "") for m in group],
                      rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(5, n), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.07 * ((n + 4) // 5)))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return True


def main(args) -> int:
    out = plot_run(args.run, getattr(args, "out", None))
    print(f"wrote {out}")
    return 0
