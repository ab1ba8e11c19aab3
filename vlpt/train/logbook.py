"""What a run reports while it trains: ``metrics.jsonl`` lines, trackers and the progress bar.

The training step keeps losses and metrics as tensors on the device (no sync per step); they
become floats only on the steps that are logged.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

#: the contract's keys lead each metrics.jsonl line
FIRST_KEYS = ("step", "task", "loss", "lr", "samples_per_s")


def batch_stats(batch: dict) -> tuple[int, int, int]:
    """(samples, real tokens, padded tokens) of a batch, read while it is still on the CPU
    (on a GPU, summing the masks there would make every micro-batch wait for the device)."""
    size = next((int(batch[k].shape[0]) for k in ("input_ids", "features", "image") if torch.is_tensor(batch.get(k))), 0)
    real = padded = 0
    for m in ("text_mask", "region_mask"):
        if torch.is_tensor(batch.get(m)):
            real += int(batch[m].sum())
            padded += batch[m].numel()
    return size, real, padded


def as_floats(record: dict[str, Any]) -> dict[str, Any]:
    """Tensors (losses, metrics kept on the device during the step) as Python floats, for logging."""
    return {k: float(v) if torch.is_tensor(v) else v for k, v in record.items()}


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested mapping as ``{"a.b.c": value}`` (tracker configs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step (main process only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Logbook:
    """Rates since the last logged step, per-task loss averages for the bar, and the log line."""

    def __init__(self, metrics: MetricsLog, accelerator, peak_flops: float, bar=None):
        self.metrics, self.acc, self.peak_flops, self.bar = metrics, accelerator, peak_flops, bar
        self.ema: dict[str, float] = {}
        self.t_start = self.t_last = time.time()
        self.samples_total = 0
        self.samples = self.tokens = 0
        self.flops = 0.0

    def step(self, rec: dict[str, Any]) -> None:
        """Count one update (every step, logged or not)."""
        world = self.acc.num_processes
        self.samples += rec["samples"] * world
        self.samples_total += rec["samples"] * world
        self.tokens += rec["tokens"] * world
        self.flops += rec["flops"]
        for k, v in rec.items():
            if k.startswith("loss/"):
                self.ema[k[5:]] = v if k[5:] not in self.ema else 0.95 * self.ema[k[5:]] + 0.05 * v
        if self.bar is not None:
            self.bar.update(1)

    def write(self, rec: dict[str, Any], done: int, lr: float, extra: dict[str, Any]) -> None:
        """The line of a logged step: rates since the previous one, ``extra`` counters last."""
        rec = as_floats(rec)
        now = time.time()
        dt = max(now - self.t_last, 1e-9)
        rec.update(step=done, lr=lr, samples_per_s=self.samples / dt, tokens_per_s=self.tokens / dt, time=now,
                   mfu=self.flops / dt / self.peak_flops, padding=1 - rec["tokens"] / max(rec["padded_tokens"], 1))
        rec.update(extra)
        if self.acc.device.type == "cuda":
            rec["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
        self.metrics.write({**{k: rec[k] for k in FIRST_KEYS}, **rec})
        if self.acc.log_with:
            self.acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}, step=done)
        self.t_last, self.samples, self.tokens, self.flops = now, 0, 0, 0.0
        if self.bar is not None:
            rate = self.samples_total / max(now - self.t_start, 1e-9)
            self.bar.set_postfix_str(" ".join(f"{t}={float(v):.3f}" for t, v in self.ema.items())
                                     + f" {rate:.0f} samples/s {rec['tokens_per_s']:.0f} tok/s"
                                     f" pad={rec['padding']:.0%} mfu={rec['mfu']:.1%}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
