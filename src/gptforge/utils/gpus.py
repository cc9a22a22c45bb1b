"""Known GPUs: peak dense BF16 tensor-core FLOP/s and memory, and the peak that MFU is measured against.

The table holds datasheet figures *without* 2:4 structured sparsity (datasheets print the sparse figure with
an asterisk; the dense one is half of it). Memory is the datasheet's "GB", which for these boards is the
binary size nvidia-smi shows (an "80GB" H100 reports 81,559 MiB), so gptforge treats it as GiB.
`peak_flops_for` matches `torch.cuda.get_device_name()` against the table and falls back to measuring a
matmul (`utils.metrics.measure_peak_flops`, cached per machine) for unknown devices, MIG slices, the CPU and
non-16-bit dtypes.

Depends on `gptforge.errors`, `gptforge.utils.io` and `gptforge.utils.metrics` only.
"""

from __future__ import annotations

import json
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gptforge.errors import GptforgeError
from gptforge.utils.io import atomic_write_text, cache_dir
from gptforge.utils.metrics import measure_peak_flops

PEAK_CACHE_FILE = "peak_flops.json"


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model. Units: TFLOP/s (1e12 FLOP/s) dense BF16 with FP32 accumulation; memory in GiB."""

    key: str  # what `gptforge plan --gpu KEY` accepts
    label: str  # human-readable name
    pattern: str  # regex searched in torch.cuda.get_device_name(), e.g. "NVIDIA H100 80GB HBM3"
    bf16_tflops: float
    memory_gb: float


# Order matters: the first pattern that matches wins, so variants come before the family name
# ("H100 NVL" before "H100"; "A10G" before "A10"; \b keeps "A10" from matching "A100" and "H200" from "GH200").
GPUS: tuple[GpuSpec, ...] = (
    # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOPS (624 with sparsity); 40 GB or 80 GB.
    GpuSpec("a100-40gb", "A100 40GB", r"\bA100\b.*\b40\s?GB", 312.0, 40.0),
    GpuSpec("a100", "A100 80GB", r"\bA100\b", 312.0, 80.0),
    # NVIDIA H100 Tensor Core GPU datasheet (2023), BF16 with sparsity: SXM 1,979, PCIe 1,513, NVL 1,671 TFLOPS;
    # memory SXM/PCIe 80 GB, NVL 94 GB.
    GpuSpec("h100-nvl", "H100 NVL", r"\bH100 NVL\b", 835.0, 94.0),
    GpuSpec("h100-pcie", "H100 PCIe", r"\bH100\b.*PCIe", 756.0, 80.0),
    GpuSpec("h100", "H100 SXM", r"\bH100\b", 989.0, 80.0),
    # NVIDIA H200 Tensor Core GPU datasheet (2024), BF16 with sparsity: SXM 1,979, NVL 1,671 TFLOPS; 141 GB.
    GpuSpec("h200-nvl", "H200 NVL", r"\bH200 NVL\b", 835.0, 141.0),
    GpuSpec("h200", "H200 SXM", r"\bH200\b", 989.0, 141.0),
    # NVIDIA GH200 Grace Hopper Superchip datasheet: the Hopper GPU as H100 SXM (BF16 1,979 sparse); 96 GB HBM3.
    GpuSpec("gh200", "GH200", r"\bGH200\b", 989.0, 96.0),
    # NVIDIA HGX B200 datasheet (2024): FP16/BF16 4.5 PFLOPS with sparsity per GPU; 180 GB HBM3e.
    GpuSpec("b200", "B200", r"\bB200\b", 2250.0, 180.0),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS (733 with sparsity); 48 GB GDDR6.
    GpuSpec("l40s", "L40S", r"\bL40S\b", 362.0, 48.0),
    # NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity; 24 GB GDDR6.
    GpuSpec("l4", "L4", r"\bL4\b", 121.0, 24.0),
    # AWS's A10G (g5 instances) has no public NVIDIA datasheet; 70 TFLOPS is the commonly quoted dense
    # FP16/BF16 tensor figure (half the A10's rate per SM). Treat it as approximate.
    GpuSpec("a10g", "A10G", r"\bA10G\b", 70.0, 24.0),
    # NVIDIA A10 datasheet: BF16 125 TFLOPS (250 with sparsity); 24 GB GDDR6.
    GpuSpec("a10", "A10", r"\bA10\b", 125.0, 24.0),
    # NVIDIA RTX A6000 datasheet: tensor 309.7 TFLOPS with sparsity; 48 GB GDDR6.
    GpuSpec("rtx-a6000", "RTX A6000", r"\bRTX A6000\b", 154.8, 48.0),
    # NVIDIA Ada Lovelace architecture whitepaper, appendix table: GeForce RTX 4090 peak BF16 tensor TFLOPS
    # with FP32 accumulate 165.2 (330.4 with sparsity); 24 GB GDDR6X.
    GpuSpec("rtx-4090", "GeForce RTX 4090", r"\bRTX 4090\b", 165.2, 24.0),
    # NVIDIA Ampere GA102 whitepaper: GeForce RTX 3090 peak BF16 tensor TFLOPS with FP32 accumulate 71
    # (142 with sparsity); 24 GB GDDR6X.
    GpuSpec("rtx-3090", "GeForce RTX 3090", r"\bRTX 3090\b", 71.0, 24.0),
)


def match_gpu(name: str) -> GpuSpec | None:
    """The table entry for a CUDA device name (e.g. "NVIDIA H100 80GB HBM3") or a `--gpu` key, else None.

    MIG slices ("... MIG 1g.10gb") get None: a slice has only part of the chip's compute.
    """
    lowered = name.strip().lower()
    for spec in GPUS:
        if lowered == spec.key:
            return spec
    if re.search(r"\bMIG\b", name):
        return None
    for spec in GPUS:
        if re.search(spec.pattern, name, flags=re.IGNORECASE):
            return spec
    return None


def gpu_spec(name: str) -> GpuSpec:
    """Like `match_gpu`, but an unknown name is an error listing the known keys.

    Raises:
        GptforgeError: `name` matches no entry.
    """
    spec = match_gpu(name)
    if spec is None:
        raise GptforgeError(f"unknown GPU '{name}' (known: {', '.join(s.key for s in GPUS)}); "
                            f"give --peak-tflops instead")
    return spec


def _device_key(device: torch.device, dtype: torch.dtype) -> str:
    """What a measured peak depends on: the processor or GPU model, the dtype, threads and the torch build."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return f"{device.type}|{name}|{str(dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}|" \
           f"torch={torch.__version__}"


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(key: str, flops: float) -> float:
    """Store max(cached, flops) for `key` in the per-machine cache; return that maximum. A cache that cannot be
    written (read-only home) is not an error."""
    path = cache_dir() / PEAK_CACHE_FILE
    cached = _read_cache(path)
    best = max(flops, float(cached.get(key, 0.0)))
    if best > float(cached.get(key, 0.0)):
        try:
            atomic_write_text(path, json.dumps({**cached, key: best}, indent=1) + "\n")
        except OSError:
            pass
    return best


def peak_flops_for(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """The peak FLOP/s that MFU is computed against, and where it came from.

    On CUDA with a 16-bit dtype, the datasheet figure of the matching table entry ("H200 SXM datasheet").
    Otherwise (CPU, MPS, float32, an unknown GPU or a MIG slice) a large-matmul rate measured on this machine,
    cached per processor, dtype, thread count and torch version in `~/.cache/gptforge/peak_flops.json`
    (`$GPTFORGE_CACHE_DIR`): the first run measures (~1 s), later runs read the best figure seen so far, so a
    measurement taken while the machine was busy is superseded by a quieter one. A user-given `train.peak_flops`
    takes precedence; the caller checks it first.

    Returns:
        (peak in FLOP/s, a short source description).
    """
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        spec = match_gpu(torch.cuda.get_device_name(device))
        if spec is not None:
            return spec.bf16_tflops * 1e12, f"{spec.label} datasheet"
    key = _device_key(device, dtype)
    cached = float(_read_cache(cache_dir() / PEAK_CACHE_FILE).get(key, 0.0))
    if cached > 0:
        return cached, "measured on this machine earlier, cached"
    return _remember(key, measure_peak_flops(device, dtype)), "measured now"


@dataclass
class PeakFlops:
    """The per-device peak in use for MFU, and where it came from ("given", "... datasheet", "measured ...")."""

    flops: float
    source: str
    key: str | None = None  # the cache key of a measured peak

    @classmethod
    def given(cls, flops: float) -> PeakFlops:
        return cls(flops, "given")

    @classmethod
    def for_device(cls, device: torch.device, dtype: torch.dtype) -> PeakFlops:
        flops, source = peak_flops_for(device, dtype)
        return cls(flops, source, key=_device_key(device, dtype) if "measured" in source else None)

    def raise_to(self, achieved: float) -> bool:
        """If `achieved` FLOP/s beats the peak (a measurement on a busy machine), make it the peak and remember it
        for this machine; returns True when it did. MFU against the result never exceeds 1."""
        if achieved <= self.flops:
            return False
        self.flops = _remember(self.key, achieved) if self.key else achieved
        self.source = "raised to the achieved training rate"
        return True
