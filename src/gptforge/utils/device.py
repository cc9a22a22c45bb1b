"""Turning a device setting ("auto", "cpu", "cuda:1", ...) into a usable torch.device, or a clear error; building
modules on the meta device without running their initialisers."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.overrides import TorchFunctionMode

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


# torch.nn.init functions that modules' reset_parameters() call; on a meta tensor they would do nothing useful.
_INITIALISERS = frozenset(getattr(torch.nn.init, name) for name in (
    "normal_", "uniform_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_", "kaiming_normal_",
    "xavier_uniform_", "xavier_normal_", "orthogonal_"))


class _SkipMetaInit(TorchFunctionMode):
    """Returns a meta tensor unchanged from torch.nn.init's initialisers instead of running them: their meta
    kernels are Python decompositions whose first call imports torch._dynamo (about 1 s of start-up on a CPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _INITIALISERS:
            tensor = args[0] if args else kwargs.get("tensor")
            if isinstance(tensor, torch.Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


@contextlib.contextmanager
def meta_device() -> Iterator[None]:
    """Modules built inside get meta parameters (shapes only, no storage) and skip their default initialisation,
    which the caller replaces anyway (`materialize`, a weight file). Like `with torch.device("meta")`, faster."""
    with torch.device("meta"), _SkipMetaInit():
        yield
