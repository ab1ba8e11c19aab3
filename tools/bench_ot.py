"""Benchmark batched IPOT (vlpt.ot) against a Python loop of POT's exact EMD.

For each configuration (number of problems x text tokens x image regions) it
draws random Gaussian features, builds cosine costs, and times:

* ``ipot batched``  -- one call of vlpt.ot.ipot_plan + ot_distance on the batch,
* ``ipot loop``     -- the same IPOT called once per problem (context: what a
  per-pair implementation would cost),
* ``emd2 loop``     -- POT's exact ``ot.emd2`` called once per problem (the
  reference values for the relative error).

Times are medians over ``--repeats`` back-to-back runs of each method (after
one warm-up run); see ``_median_times`` for why they do not take turns.

    python tools/bench_ot.py
    python tools/bench_ot.py --configs 64x40x36 512x60x100 --hidden 64 --repeats 7
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vlpt.errors import tool_parser  # noqa: E402
from vlpt.ot import cosine_cost, ipot_plan, ot_distance  # noqa: E402


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _median_times(fns: dict, repeats: int) -> dict:
    """Median wall time of each function, each timed in its own run of repeats.

    Each method runs its repeats back to back (after one warm-up call), as in
    a training step, where IPOT runs right after the forward pass.  Timing
    the methods in turn instead puts every IPOT call after ~12 ms of
    single-threaded POT, by which time torch's worker threads have gone to
    sleep; waking them costs ~0.5 ms per call, a cost WRA never pays inside a
    training step.  Load is reported above the table instead.
    """
    out = {}
    for name, fn in fns.items():
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def _parse_config(s: str):
    try:
        b, n, m = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"config must look like 64x40x36 (problems x N x M), got {s!r}")
    return b, n, m


def main(argv=None) -> int:
    ap = tool_parser("bench_ot", __doc__)
    ap.add_argument("--configs", nargs="+", type=_parse_config, default=[(64, 40, 36), (512, 60, 100)],
                    metavar="BxNxM",
                    help="problems x text tokens x image regions (default: 64x40x36 512x60x100)")
    ap.add_argument("--hidden", type=int, default=64, help="feature dimension (default: 64)")
    ap.add_argument("--beta", type=float, default=0.5, help="IPOT beta (default: 0.5, UNITER)")
    ap.add_argument("--iterations", type=int, default=50, help="IPOT iterations (default: 50, UNITER)")
    ap.add_argument("--inner-steps", type=int, default=1, help="IPOT inner steps k (default: 1, UNITER)")
    ap.add_argument("--repeats", type=int, default=15,
                    help="timed repeats per method; the median is reported (small timings are noisy: keep it >= 15)")
    ap.add_argument("--threads", type=int, default=_cores(), help="torch threads (default: cores available)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import ot  # POT, for the exact reference

    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, POT {ot.__version__}, threads {torch.get_num_threads()} "
          f"(cores {_cores()}, load avg {load:.1f}), hidden {args.hidden}, "
          f"IPOT beta={args.beta} iterations={args.iterations} k={args.inner_steps}")
    if load > _cores():
        print("note: the machine is busy (load > cores); timings, with several torch threads especially, "
              "are inflated -- compare with --threads 1")
    header = (f"{'problems':>8} {'N x M':>8} | {'ipot batched':>12} {'ipot loop':>10} {'emd2 loop':>10} | "
              f"{'speedup vs emd2':>15} | {'rel err max':>11} {'rel err mean':>12}")
    print(header)
    print("-" * len(header))

    g = torch.Generator().manual_seed(args.seed)
    for B, N, M in args.configs:
        x = torch.randn(B, N, args.hidden, generator=g)  # (B, N, H)
        y = torch.randn(B, M, args.hidden, generator=g)  # (B, M, H)
        x_mask = torch.ones(B, N, dtype=torch.bool)
        y_mask = torch.ones(B, M, dtype=torch.bool)
        cost = cosine_cost(x, y)  # (B, N, M) float32
        cost_np = cost.double().numpy()
        a, b = np.full(N, 1.0 / N), np.full(M, 1.0 / M)
        kw = dict(beta=args.beta, iterations=args.iterations, inner_steps=args.inner_steps)

        def batched():
            return ot_distance(cost, ipot_plan(cost, x_mask, y_mask, **kw))

        def ipot_loop():
            out = []
            for i in range(B):
                c = cost[i:i + 1]  # (1, N, M)
                out.append(ot_distance(c, ipot_plan(c, x_mask[i:i + 1], y_mask[i:i + 1], **kw)))
            return out

        def emd_loop():
            return [ot.emd2(a, b, cost_np[i]) for i in range(B)]

        t = _median_times({"batched": batched, "loop": ipot_loop, "emd": emd_loop}, args.repeats)
        t_batch, t_loop, t_emd = t["batched"], t["loop"], t["emd"]

        d = batched().double().numpy()
        ref = np.asarray(emd_loop())
        rel = np.abs(d - ref) / ref
        size = f"{N}x{M}"
        print(f"{B:>8} {size:>8} | {t_batch * 1e3:>10.1f}ms {t_loop * 1e3:>8.1f}ms {t_emd * 1e3:>8.1f}ms | "
              f"{t_emd / t_batch:>14.1f}x | {rel.max():>11.2e} {rel.mean():>12.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
