"""Turning a device setting ("auto", "cpu", "cuda:1", ...) into a usable torch.device, or a clear error."""

from __future__ import annotations

import torch

from gptforge.errors import GptforgeError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU.

    Raises:
        GptforgeError: an unknown device string, or a device this machine's PyTorch cannot use.
    """
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise GptforgeError(f"unknown device {name!r} (allowed: auto, cpu, cuda, cuda:N, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise GptforgeError(f"device {name!r} requested but no CUDA GPU is usable by this PyTorch "
                                f"({torch.__version__}); use --device cpu or install a CUDA build")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise GptforgeError(f"device {name!r} requested but only {torch.cuda.device_count()} GPU(s) are visible")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise GptforgeError("device 'mps' requested but MPS is not available on this machine")
        if device.type not in ("cpu", "cuda", "mps"):
            raise GptforgeError(f"unsupported device {name!r} (allowed: auto, cpu, cuda, cuda:N, mps)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
