"""Model FLOPs and the device's peak, for MFU (model FLOPs utilization).

MFU counts the FLOPs the model *needs* (matrix products of the trunk on the
tokens its dense layers run on: the real ones when the trunk is unpadded, else
the padded batch; forward + backward = 3× forward), not what the hardware ran, and
divides by the device's dense peak: a table of vendor figures for common GPUs,
or a measured matrix product on CPU (its rate per CPU-second of its threads, see
``cpu_peak_from``).
"""
from __future__ import annotations

import time

import torch

#: dense (no sparsity) peak TFLOP/s by device-name fragment: (bf16/fp16, fp32 or tf32 where no tensor cores)
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "A6000": 155.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def trunk_forward_flops(hidden: int, layers: int, ffn: int, batch: int, seq: int, tokens: int | None = None) -> float:
    """Matrix-product FLOPs of one forward pass of the trunk on a (batch, seq) input whose dense
    layers run on ``tokens`` rows (default ``batch * seq``; the real tokens when unpadded)."""
    per_token_dense = 2 * layers * (4 * hidden * hidden + 2 * hidden * ffn)  # QKV + out, FFN in + out
    attention = 2 * 2 * layers * seq * seq * hidden  # QKᵀ and AV, per (padded) sequence
    return (batch * seq if tokens is None else tokens) * per_token_dense + batch * attention


def train_step_flops(config, batch: int, seq: int, tokens: int | None = None) -> float:
    """Forward + backward ≈ 3× forward."""
    return 3.0 * trunk_forward_flops(config.hidden_size, config.layers, config.ffn_size, batch, seq, tokens)


_cpu_peak: float | None = None


def cpu_peak_from(flops: float, wall_s: float, cpu_s: float, threads: int) -> float:
    """The CPU's peak FLOP/s from a timed matrix product: the rate per CPU-second of its threads
    times their number, or the wall-clock rate if higher. Why not the wall-clock rate alone: on a
    machine busy with another process when the run starts (data generation, a second run), the
    product gets a fraction of the cores, the peak comes out low and every later MFU high (above
    100% once the other process ends); CPU time counts only the time the threads really ran."""
    wall = flops / max(wall_s, 1e-12)
    return max(wall, flops / max(cpu_s, 1e-12) * max(threads, 1))


def measured_cpu_peak(dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a large matrix product on this CPU with torch's threads (measured once, ~0.5 s)."""
    global _cpu_peak
    if _cpu_peak is None:
        a = torch.randn(1024, 1024, dtype=dtype)
        a @ a
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < 0.5:
            a @ a
            n += 1
        _cpu_peak = cpu_peak_from(n * 2 * 1024**3, time.perf_counter() - t0, time.process_time() - c0,
                                  torch.get_num_threads())
    return _cpu_peak


def device_peak_flops(device: torch.device, precision: str = "no") -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                factor = 1.0 if precision in ("bf16", "fp16") else 0.5  # tf32 ≈ half the bf16 peak
                return tflops * 1e12 * factor, f"{name} table"
        return float("nan"), f"{name} (not in the table)"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measured_cpu_peak(dtype), "measured CPU matmul"
