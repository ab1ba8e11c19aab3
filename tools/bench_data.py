#!/usr/bin/env python
"""Does the data pipeline keep up? Samples/s it delivers beside what the training step consumes.

What is measured
----------------
* **data pipeline**: the recipe's task data loaders built exactly as ``vlpt train``
  builds them (``vlpt.train.data_feed.DataFeed``: shard reading, safe decoding,
  tokenization, shuffle buffer, batching, each task's ``prepare``, collation; under
  ``mixing: sum`` one stream shared by the tasks that read the same samples), read in
  the trainer's order (``TaskMixer``: one task per update for ``mixing: sample``,
  every task for ``sum``), with 0, 1 and 2 workers per task
  (``--workers``; the trainer runs ``data.num_workers`` per task, so ``2`` with two
  tasks is four processes). Nothing else runs meanwhile. Worker start-up, the shuffle
  buffer's first fill and the prefetch queue are excluded: each task first delivers
  ``prefetch x workers + 2`` batches untimed, then batches are timed for at least
  ``--seconds`` (and ``--min-batches``).
* **training step**: forward, backward, gradient clipping (``train.clip``), AdamW
  step and ``zero_grad`` of the recipe's model on batches taken from the same
  loaders before timing (as ``tools/bench_gpu.sh`` does), task per update from the
  same mixer, under the recipe's precision, on the GPU if one is available, with
  ``train.threads`` (else torch's default) threads. Samples per step over the
  median step time (as ``tools/bench.py``): robust to other processes' bursts, and
  the faster figure, so the ratio errs low; ``--json`` adds the mean.

The ratio pipeline / step says how much headroom the data side has: below 1 the
step waits for data. On a shared machine other processes take CPU time too; the
tool reports the load average and the share of the machine's CPU time that other
processes took during each measurement (``/proc``, Linux).

    python tools/bench_data.py recipes/quickstart.yaml
    python tools/bench_data.py recipes/quickstart.yaml data.batch_size=128 --workers 0 2 --seconds 20
    python tools/bench_data.py recipes/quickstart.yaml --profile     # where worker-0 time goes

Exit code 2 with one line on stderr for a user mistake (missing recipe, bad option).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from vlpt.build import stop_workers  # noqa: E402
from vlpt.errors import RecipeError, run_command, tool_parser  # noqa: E402

PROG = "bench_data"
TARGET = 3.0  # pipeline samples/s with 2 workers >= TARGET x step samples/s


# --------------------------------------------------------------------------------------
# CPU accounting (Linux /proc; None elsewhere)
# --------------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of one process, 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


class CpuMeter:
    """Share of the machine's CPU time used by other processes (not this one or its workers)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(v[:8]) - v[3] - (v[4] if len(v) > 4 else 0)) / os.sysconf("SC_CLK_TCK")
        me = os.getpid()
        own = {p: _proc_cpu(p) for p in [me, *_descendants(me)]}
        return time.perf_counter(), busy, own

    def other_share(self) -> float | None:
        end = self._read()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        own = sum(end[2].get(p, 0.0) - self.start[2].get(p, 0.0) for p in end[2])
        # workers that ended before the second reading: their time is gone from /proc, so the
        # estimate errs toward "others were busy"; measurements read before the loaders shut down
        other = (end[1] - self.start[1]) - own
        return max(0.0, min(1.0, other / (wall * (os.cpu_count() or 1)))) if wall > 0 else None


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------


def _size(batch: dict) -> int:
    for k in ("input_ids", "features", "image"):
        if torch.is_tensor(batch.get(k)):
            return int(batch[k].shape[0])
    return 0


def _feed(built, sources, feeding, workers: int):
    """The trainer's data side for one rank (pinned memory when a GPU would train)."""
    from vlpt.train.data_feed import DataFeed

    r = built.recipe
    return DataFeed(built, sources, feeding, 0, 1, workers, r.seed, share=r.mixing == "sum",
                    pin_memory=torch.cuda.is_available())


def measure_pipeline(built, sources, feeding, mixer, workers: int, seconds: float, min_batches: int) -> dict:
    feed = _feed(built, sources, feeding, workers)
    t_start = time.perf_counter()
    prefetch = 4 * workers if workers else 0  # data_loader's prefetch_factor
    trained = [t for t in mixer.names if mixer.weights[t] > 0]
    warm = {name: 0 for name in trained}
    step = 0
    while min(warm.values()) < prefetch + 2:  # untimed: worker start, buffer fill, prefetch queue
        for task in mixer.tasks_for(step):
            feed.next(task)
            warm[task] += 1
        step += 1
        if step > 10_000:
            break
    startup = time.perf_counter() - t_start
    meter = CpuMeter()
    t0 = time.perf_counter()
    samples = batches = 0
    times = []
    while True:
        for task in mixer.tasks_for(step):
            tb = time.perf_counter()
            batch, _, _ = feed.next(task)
            times.append(time.perf_counter() - tb)
            samples += _size(batch)
            batches += 1
        step += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and batches >= min_batches:
            break
    other = meter.other_share()
    for it in feed.iters.values():  # stop the workers now, not at interpreter exit
        stop_workers(it)
    return {"workers_per_task": workers, "processes": workers * len(feed.iters), "samples_per_s": samples / dt,
            "ms_per_batch": 1e3 * dt / batches, "batches": batches, "samples": samples, "seconds": dt,
            "startup_s": startup, "other_cpu_share": other, "max_wait_ms": 1e3 * max(times)}


def measure_step(built, sources, feeding, mixer, steps: int, warmup: int) -> dict:
    from vlpt.data.collate import move_to
    from vlpt.train.optim import build_optimizer

    r = built.recipe
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_distinct = 6
    feed = _feed(built, sources, feeding, 0)
    batches = {}
    for name in (t for t in mixer.names if mixer.weights[t] > 0):  # the real pipeline's batches, built before timing
        batches[name] = [move_to(feed.next(name)[0], device) for _ in range(n_distinct)]
        feed.iters.pop(feed.loader_of[name], None)  # its stream's buffers go now: one task's at a time
    del feed
    model = built.model.to(device).train()
    opt = build_optimizer(model, r.train)
    if r.train.precision in ("bf16", "fp16") and (device.type == "cuda" or r.train.precision == "bf16"):
        dtype = torch.bfloat16 if r.train.precision == "bf16" else torch.float16

        def autocast():
            return torch.autocast(device.type, dtype=dtype)
    else:
        autocast = contextlib.nullcontext
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counter = {name: 0 for name in batches}

    def one(step: int) -> int:
        n = 0
        for task in mixer.tasks_for(step):
            b = batches[task][counter[task] % n_distinct]
            counter[task] += 1
            with autocast():
                loss, _ = model(task, b)
            (loss * mixer.loss_scale(task)).backward()
            n += _size(b)
        if r.train.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), r.train.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return n

    for i in range(warmup):
        one(i)
    sync()
    meter = CpuMeter()
    times, samples = [], 0
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        samples += one(i)
        sync()
        times.append(time.perf_counter() - t)
    total, median = sum(times), statistics.median(times)
    # over the median step time, as tools/bench.py: robust to other processes' bursts, and the
    # faster (stricter) figure to hold the pipeline against
    return {"samples_per_s": samples / steps / median, "ms_per_step": 1e3 * median,
            "samples_per_s_total_time": samples / total, "ms_per_step_mean": 1e3 * total / steps,
            "steps": steps, "samples": samples,
            "device": str(device), "threads": torch.get_num_threads(), "other_cpu_share": meter.other_share()}


def profile_worker(built, sources, feeding, mixer, batches: int) -> str:
    """cProfile of producing ``batches`` batches in this process (what one worker does)."""
    import cProfile
    import io
    import pstats

    feed = _feed(built, sources, feeding, 0)
    for name in (t for t in mixer.names if mixer.weights[t] > 0):  # fill the shuffle buffers outside the profile
        feed.next(name)
    prof = cProfile.Profile()
    prof.enable()
    for step in range(batches):
        for task in mixer.tasks_for(step):
            feed.next(task)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
    return out.getvalue()


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def run(args) -> int:
    from vlpt.build import build_model, decode_settings, validate
    from vlpt.data.sources import probe_sources
    from vlpt.data.sources import resolve_sources
    from vlpt.recipe import load_recipe
    from vlpt.train.mixing import TaskMixer

    if not Path(args.recipe).is_file():
        raise RecipeError(f"recipe file '{args.recipe}' not found")
    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    tasks = validate(recipe)
    load_before = _load()
    sources, _ = resolve_sources(recipe, progress=True)
    torch.manual_seed(recipe.seed)
    built = build_model(recipe, tasks)
    mixer = TaskMixer([t.name for t in tasks], [t.weight for t in tasks], recipe.mixing, recipe.seed)
    # which sources feed which task, as the trainer decides it
    feeding = probe_sources(tasks, sources, decode_settings(recipe, built.model), built.tokenizer)

    if args.profile:
        print(profile_worker(built, sources, feeding, mixer, args.profile_batches))
        return 0

    d = recipe.data
    print(f"tools/bench_data.py {args.recipe}: torch {torch.__version__}, {_cores()} CPU core(s), "
          f"load average {load_before} (1, 5, 15 min) before", flush=True)
    print(f"tasks: {', '.join(f'{t.name} (weight {t.weight})' for t in tasks)}, mixing {recipe.mixing}; "
          + (f"batch_size {d.batch_size}" if d.batch_size else f"batch_tokens {d.batch_tokens}")
          + f", shuffle_buffer {d.shuffle_buffer}, {sum(len(s.urls) for s in sources)} shard(s); "
          f"recipe's data.num_workers = {d.num_workers} per task", flush=True)

    step = measure_step(built, sources, feeding, mixer, args.steps, args.warmup)
    print(f"  training step: {step['samples_per_s']:.0f} samples/s", file=sys.stderr, flush=True)
    pipes = []
    for w in args.workers:
        res = measure_pipeline(built, sources, feeding, mixer, w, args.seconds, args.min_batches)
        pipes.append(res)
        print(f"  pipeline, {w} worker(s) per task: {res['samples_per_s']:.0f} samples/s", file=sys.stderr,
              flush=True)

    def share(v):
        return "n/a" if v is None else f"{100 * v:.0f}%"

    rows = [(f"data pipeline, {p['workers_per_task']} worker(s)/task ({p['processes']} proc)",
             f"{p['samples_per_s']:.0f}", f"{p['ms_per_batch']:.1f}", f"{p['samples_per_s'] / step['samples_per_s']:.2f}x",
             share(p["other_cpu_share"]), f"{p['startup_s']:.1f}") for p in pipes]
    rows.append((f"training step ({step['device']}, {step['threads']} threads, median)",
                 f"{step['samples_per_s']:.0f}", f"{step['ms_per_step']:.1f}", "1.00x", share(step["other_cpu_share"]), "-"))
    head = ("", "samples/s", "ms/batch", "vs step", "others' CPU", "start-up s")
    w = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    print()
    print("  ".join(f"{h:<{w[i]}}" if i == 0 else f"{h:>{w[i]}}" for i, h in enumerate(head)))
    for r in rows:
        print("  ".join(f"{c:<{w[i]}}" if i == 0 else f"{c:>{w[i]}}" for i, c in enumerate(r)))
    print(f"\nload average after: {_load()}; 'others' CPU' = share of the machine's CPU time that other "
          "processes used during the measurement")
    two = next((p for p in pipes if p["workers_per_task"] == 2), None)
    verdict = None
    if two is not None:
        ratio = two["samples_per_s"] / step["samples_per_s"]
        verdict = ratio >= TARGET
        print(f"with 2 workers per task the pipeline delivers {ratio:.2f}x what the training step consumes "
              f"(target >= {TARGET:g}x): {'met' if verdict else 'NOT met'}")
    if args.json:
        print(json.dumps({"recipe": args.recipe, "torch": torch.__version__, "cores": _cores(),
                          "load_before": load_before, "load_after": _load(), "step": step, "pipeline": pipes,
                          "target_met": verdict}))
    return 0


def main(argv=None) -> int:
    ap = tool_parser("bench_data", __doc__)
    ap.add_argument("recipe", help="recipe YAML")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. data.batch_size=128")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2],
                    help="data-loader workers per task to measure (default: 0 1 2)")
    ap.add_argument("--seconds", type=float, default=10.0, help="timed seconds per pipeline setting (default: 10)")
    ap.add_argument("--min-batches", type=int, default=50, help="timed batches at least (default: 50)")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps (default: 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed training steps first (default: 3)")
    ap.add_argument("--profile", action="store_true",
                    help="instead: cProfile one worker's work (decode, prepare, batch) in this process")
    ap.add_argument("--profile-batches", type=int, default=100, help="batches to profile (default: 100)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line with the figures")
    args = ap.parse_intermixed_args(argv)
    if any(w < 0 for w in args.workers) or args.seconds <= 0 or args.steps < 1 or args.warmup < 0:
        ap.error("--workers must be >= 0, --seconds > 0, --steps >= 1, --warmup >= 0")
    return run_command(PROG, run, args, resumable=False)


if __name__ == "__main__":
    raise SystemExit(main())
