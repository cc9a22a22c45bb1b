"""Linear layers for inference: the faster of PyTorch's two CPU matrix-multiply libraries.

Legend: N rows (tokens) multiplied at once, `in`/`out` the layer's widths.
PyTorch's CPU build multiplies through MKL (`F.linear`) or oneDNN (`torch.ops.mkldnn._linear_pointwise`, the
op Inductor uses), both reading nn.Linear's (out, in) weight as stored. Decoding multiplies a few rows by every
weight matrix, so it streams each matrix from memory once per step. Measured on this project's CPU (AMD EPYC,
2 threads, float32, every matrix of a 124M GPT-2 once), oneDNN does that about 2x faster than MKL at one row
(23 vs 48 ms, near the memory bandwidth) and at 8 rows (36 vs 78 ms), and is still ~20% ahead at 256 rows;
benchmarks/bench_generate_hf.py shows the end-to-end effect. Each oneDNN call costs ~20 us more, so matrices
under 128k weights (0.5 MB: 256 x 256 and smaller) stay with MKL. Only code running under `torch.inference_mode()`
(the generation engine) takes the oneDNN route; training and evaluation (autograd or `no_grad`) call the layer
itself, so their numerics never change. This module knows nothing of models beyond nn.Linear.
"""

from __future__ import annotations

import torch
from torch import nn

ONEDNN_MIN_WEIGHTS = 1 << 17  # below this many weights MKL's lower per-call cost wins (measured, see above)
_onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() \
    else None


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """`layer(x)` for x (..., in) -> (..., out): through oneDNN for a plain float32 nn.Linear of at least
    ONEDNN_MIN_WEIGHTS weights on CPU in inference mode (unless `torch.backends.mkldnn` is disabled), else the
    layer's own forward (MKL, or a wrapper's)."""
    global _onednn_linear
    if torch.compiler.is_compiling():  # a traced graph (training under --compile): the plain layer, no graph break
        return layer(x)
    if (_onednn_linear is not None and type(layer) is nn.Linear and torch.is_inference_mode_enabled()
            and x.device.type == "cpu" and x.dtype == torch.float32 and layer.weight.dtype == torch.float32
            and layer.weight.numel() >= ONEDNN_MIN_WEIGHTS and torch.backends.mkldnn.enabled):
        try:
            return _onednn_linear(x, layer.weight, layer.bias, "none", [], "")
        except RuntimeError:  # a PyTorch build whose private op differs: use the public path from now on
            _onednn_linear = None
    return layer(x)
