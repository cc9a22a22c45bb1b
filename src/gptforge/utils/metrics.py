"""Throughput and model-FLOPs utilisation (MFU), with the peak FLOP/s measured on the machine itself."""

from __future__ import annotations

import time

import torch


def measure_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, *, size: int | None = None,
                       seconds: float = 0.5) -> float:
    """Achieved FLOP/s of a large square matmul on `device` in `dtype`: a measured stand-in for the peak.

    The fallback of `utils.gpus.peak_flops_for`, which uses datasheet figures for known GPUs; `train.peak_flops`
    overrides both.
    Units: FLOP/s. A matmul of n x n by n x n costs 2 n^3 FLOPs.
    """
    n = size or (8192 if device.type == "cuda" else 1024)
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: training's RNG streams stay untouched
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(2):
        a @ b
    sync()
    best = 0.0
    for _ in range(5):  # best of five short trials, so a busy moment on a shared machine does not skew MFU
        reps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 5:
            a @ b
            reps += 1
            if device.type == "cuda" and reps % 10 == 0:
                sync()
        sync()
        best = max(best, 2.0 * n**3 * reps / (time.perf_counter() - start))
    return best


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: flops_per_token * tokens_per_s / peak_flops (Chowdhery et al. 2022)."""
    return flops_per_token * tokens_per_s / peak_flops if peak_flops > 0 else 0.0
