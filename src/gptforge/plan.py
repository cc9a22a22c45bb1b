"""Sizing planner: training compute, wall-clock time and per-GPU memory of a GPT config, before training it.

Pure functions of a `ModelConfig` and a few numbers; nothing here allocates tensors, so 175B plans cost
microseconds. Legend: s context_length (tokens), b micro_batch_size (sequences), h d_model, a n_head,
L n_layer, V vocab_size, N parameters (`count_parameters`).

Compute. Training FLOPs per token are `gptforge.model.gpt.flops_per_token` (6 per matmul parameter plus the
attention term, Chowdhery et al. 2022 App. B): the same count gptforge's logged MFU divides by, so the
wall-clock estimate total / (gpus x peak x MFU) matches what a run reports. The GPT-3 paper's Table D.1 uses
6 N tokens and ignores attention ("typically less than 10% of the total compute", Appendix D); with N =
`count_parameters` it reproduces the table to within 0.3% (175B: 3.14e23 FLOPs, 3.64e3 PF-days; Small:
2.25e20), while our count adds 1.6% (175B) to 16% (Small, where 12 h s is large next to 12 h^2).

Memory, bytes per GPU, what gptforge does: fp32 parameters trained directly (the fp32 "master" copy *is* the
model), fp32 gradients, AdamW's two fp32 moments: 4 + 4 + 8 = 16 bytes per parameter. Three strategies:
  ddp      everything replicated; bf16 autocast keeps bf16 copies of the matmul weights from the forward to
           the backward (2 N, counted as "working"); gradient buckets assumed `gradient_as_bucket_view=True`
           (otherwise add 4 N). fp32 residual stream (autocast leaves the residual adds in fp32).
  fsdp     FSDP2 `fully_shard` per block and at the root: weights, gradients and optimizer state / world
           size, with `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)` instead of autocast
           (torchtitan's setting), so activations and the residual stream are bf16. (Plain autocast over
           fp32 FSDP parameters instead saves bf16 casts of every *unsharded* weight for the backward: add
           2 N per GPU, which undoes most of the sharding at scale.) "Working" holds the
           all-gathered bf16 root (embeddings, head) and two blocks (current + prefetched), the unsharded
           bf16 gradients of the root and of one block, and that block's fp32 reduce-scatter copy.
  fsdp+ac  the same plus activation checkpointing of every block: only block inputs are kept, and one
           block's activations are rebuilt at a time during the backward.
Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
section 4.1: 34 s b h + 5 a s^2 b bytes per layer with 16-bit activations, dropout and materialised attention
scores. gptforge runs attention through SDPA's flash / memory-efficient kernels, which keep no s^2 tensor
(only a fp32 log-sum-exp, 4 a s b bytes), and its GPT-3 presets use no dropout (no 1-byte masks: -2 s b h).
The per-layer figures match the bytes autograd saves in a real CPU forward to within 0.4% (tests/unit/
test_plan.py); the gap is LayerNorm statistics (8-16 s b bytes). Not modelled: the CUDA context and
allocator fragmentation (hence `USABLE_FRACTION`), banded layers' (s, s) masks (s^2 bytes each), and
communication buffers beyond the ones named above.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from gptforge.config import ModelConfig
from gptforge.errors import GptforgeError
from gptforge.model.gpt import count_parameters, flops_per_token

PF_DAY_FLOPS = 1e15 * 86400  # one petaFLOP/s for a day, the GPT-3 paper's compute unit (Appendix D)
GIB = 2**30
USABLE_FRACTION = 0.9  # of GPU memory an estimate may use; the rest is CUDA context, fragmentation, temporaries
WEIGHT_BYTES, GRAD_BYTES, ADAM_BYTES, BF16_BYTES = 4, 4, 8, 2  # per parameter
STRATEGIES = ("ddp", "fsdp", "fsdp+ac")
STRATEGY_LABELS = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP", "fsdp+ac": "FSDP + act. ckpt"}


def training_flops(cfg: ModelConfig, tokens: float) -> float:
    """Total training FLOPs = `flops_per_token(cfg)` x tokens (forward + backward, attention included)."""
    return flops_per_token(cfg) * tokens


def table_d1_flops(n_params: float, tokens: float) -> float:
    """Training FLOPs as in GPT-3's Table D.1 (Brown et al. 2020, Appendix D): 6 N tokens, no attention term."""
    return 6.0 * n_params * tokens


def pf_days(flops: float) -> float:
    """FLOPs expressed in petaFLOP/s-days (1 PF-day = 1e15 x 86,400 = 8.64e19 FLOPs)."""
    return flops / PF_DAY_FLOPS


def wall_clock_s(total_flops: float, *, gpus: int, peak_flops: float, mfu: float) -> float:
    """Seconds to compute `total_flops` on `gpus` devices of `peak_flops` FLOP/s each at utilisation `mfu`."""
    return total_flops / (gpus * peak_flops * mfu)


def activation_bytes_per_layer(*, seq_len: int, micro_batch_size: int, d_model: int, n_head: int,
                               flash: bool = True, dropout: bool = False, fp32_residual: bool = False) -> float:
    """Bytes one transformer block keeps for its backward (Korthikanti et al. 2022, section 4.1).

    Start from 34 s b h + 5 a s^2 b (16-bit activations, dropout, attention scores materialised). Without
    dropout drop the two 1-byte residual-dropout masks (-2 s b h) and the attention-dropout mask (-a s^2 b).
    With a fused (flash / memory-efficient) SDPA kernel no s^2 tensor is stored, only a fp32 log-sum-exp per
    query and head (+4 a s b). With a fp32 residual stream (bf16 autocast over fp32 weights) both LayerNorm
    inputs take 4 bytes instead of 2 (+4 s b h). gptforge under autocast: 36 s b h + 4 a s b.
    """
    s, b, h, a = seq_len, micro_batch_size, d_model, n_head
    per_token = 34.0 - (0 if dropout else 2) + (4 if fp32_residual else 0)
    if flash:
        scores = 4.0 * a * s * b
    else:
        scores = (5.0 if dropout else 4.0) * a * s * s * b
    return per_token * s * b * h + scores


def output_activation_bytes(*, seq_len: int, micro_batch_size: int, d_model: int, vocab_size: int,
                            fp32_residual: bool = False) -> float:
    """Bytes held around the final LayerNorm, the head and the loss at the end of the forward.

    The final LayerNorm's input (4 or 2 s b h) and the head's bf16 input (2 s b h); then gptforge's loss takes
    bf16 logits (2 s b V), a fp32 copy (4 s b V) and a fp32 log-softmax (4 s b V): 10 s b V at the peak,
    which at V = 50257 outweighs a block of a 125M model.
    """
    s, b = seq_len, micro_batch_size
    return ((4 if fp32_residual else 2) + 2) * s * b * d_model + 10.0 * s * b * vocab_size


def activation_bytes(cfg: ModelConfig, micro_batch_size: int, *, checkpointing: bool = False,
                     flash: bool = True, fp32_residual: bool = False) -> float:
    """Activation bytes of one micro-batch through the whole model.

    Without checkpointing: n_layer x `activation_bytes_per_layer` plus `output_activation_bytes`. With
    activation checkpointing of every block only the block inputs stay (residual stream, 4 or 2 s b h per
    layer; Korthikanti et al.'s "full recomputation" 2 s b h L) plus one block rebuilt during its backward.
    """
    kw = dict(seq_len=cfg.context_length, micro_batch_size=micro_batch_size, d_model=cfg.d_model)
    layer = activation_bytes_per_layer(**kw, n_head=cfg.n_head, flash=flash, dropout=cfg.dropout > 0,
                                       fp32_residual=fp32_residual)
    output = output_activation_bytes(**kw, vocab_size=cfg.vocab_size, fp32_residual=fp32_residual)
    if not checkpointing:
        return cfg.n_layer * layer + output
    block_input = (4 if fp32_residual else 2) * cfg.context_length * micro_batch_size * cfg.d_model
    return cfg.n_layer * block_input + layer + output


def block_parameters(cfg: ModelConfig) -> int:
    """Parameters of one distinct block (one FSDP unit), as the difference of two `count_parameters` calls."""
    g = cfg.shared_layer_group
    return count_parameters(dataclasses.replace(cfg, n_layer=2 * g)) - count_parameters(
        dataclasses.replace(cfg, n_layer=g))


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-GPU training memory of one strategy. Units: bytes."""

    strategy: str
    weights_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    working_bytes: float  # autocast weight copies (ddp) or gathered units and unsharded grads (fsdp)
    runtime_bytes: float = 0.0  # the process itself (host memory only: Python, torch, gloo)

    @property
    def total_bytes(self) -> float:
        return (self.weights_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.working_bytes + self.runtime_bytes)

    def fits(self, gpu_memory_gib: float) -> bool:
        """Whether the total is within `USABLE_FRACTION` of a GPU with `gpu_memory_gib` GiB."""
        return self.total_bytes <= USABLE_FRACTION * gpu_memory_gib * GIB


def memory_per_gpu(cfg: ModelConfig, *, micro_batch_size: int, world_size: int, strategy: str,
                   flash: bool = True) -> MemoryEstimate:
    """Estimate per-GPU memory for `strategy` in `STRATEGIES` (see the module docstring for assumptions).

    Raises:
        GptforgeError: unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise GptforgeError(f"unknown strategy '{strategy}' (allowed: {', '.join(STRATEGIES)})")
    n = count_parameters(cfg)
    if strategy == "ddp":
        return MemoryEstimate(strategy, WEIGHT_BYTES * n, GRAD_BYTES * n, ADAM_BYTES * n,
                              activation_bytes(cfg, micro_batch_size, flash=flash, fp32_residual=True),
                              BF16_BYTES * n)
    block = block_parameters(cfg)
    root = n - (cfg.n_layer // cfg.shared_layer_group) * block
    gathered = BF16_BYTES * (root + 2 * block)  # bf16 params: root + current and prefetched block
    unsharded_grads = BF16_BYTES * (root + block) + 4 * block  # bf16 grads + fp32 reduce-scatter input
    acts = activation_bytes(cfg, micro_batch_size, checkpointing=strategy == "fsdp+ac", flash=flash)
    return MemoryEstimate(strategy, WEIGHT_BYTES * n / world_size, GRAD_BYTES * n / world_size,
                          ADAM_BYTES * n / world_size, acts, gathered + unsharded_grads)


CPU_STRATEGIES = ("single", "ddp", "fsdp", "fsdp+ac")
# Resident memory of a training process before any model exists: Python, torch, gptforge, the gloo process group.
# Measured on this project's machine (torch 2.13 CPU, Linux; benchmarks/bench_memory.py "baseline RSS").
CPU_RUNTIME_BYTES = 0.33 * GIB


def memory_per_rank(cfg: ModelConfig, *, micro_batch_size: int, world_size: int, strategy: str,
                    device: str = "cuda", flash: bool = True) -> MemoryEstimate:
    """Per-rank training memory: `memory_per_gpu` for device "cuda", host memory (RSS) of a CPU rank for "cpu".

    CPU ranks train in float32 throughout (no autocast; FSDP2's MixedPrecisionPolicy with fp32 params), so
    every term counts 4-byte values, with `strategy` in CPU_STRATEGIES ("single": one process, no sharding):
      weights 4 N, grads 4 N, AdamW 8 N                       (/ world_size under fsdp)
      activations    twice the 16-bit figures of `activation_bytes` (the same tensors in fp32; SDPA's fused CPU
                     kernel keeps a fp32 log-sum-exp, no s^2 tensor), plus the loss's fp32 logits and
                     log-softmax (8 s b V) in place of the 16-bit output terms
      working        fsdp: the unsharded root (embeddings, tied head; kept from forward to backward) and two
                     all-gathered blocks (current, prefetched), one block's all-gather buffer, the root's and one
                     block's unsharded gradients and the reduce-scatter input: 4 (2 root + 5 block); unsharded:
                     the tied embedding's second gradient contribution before accumulation, 4 V D
      runtime        CPU_RUNTIME_BYTES, the process before the model
    Not modelled: allocator fragmentation (glibc returns large freed blocks to the system; measured within a few
    percent, see docs/scale.md), communication buffers of gloo beyond those named.

    Raises:
        GptforgeError: unknown strategy or device.
    """
    if device == "cuda":
        return memory_per_gpu(cfg, micro_batch_size=micro_batch_size, world_size=world_size, strategy=strategy,
                              flash=flash)
    if device != "cpu" or strategy not in CPU_STRATEGIES:
        raise GptforgeError(f"unknown device/strategy '{device}'/'{strategy}' (allowed: cuda with "
                            f"{', '.join(STRATEGIES)}; cpu with {', '.join(CPU_STRATEGIES)})")
    n, sharded = count_parameters(cfg), strategy.startswith("fsdp")
    ways = world_size if sharded else 1
    s, b = cfg.context_length, micro_batch_size
    acts = 2 * activation_bytes(cfg, micro_batch_size, checkpointing=strategy == "fsdp+ac", flash=flash)
    acts += 8.0 * s * b * cfg.vocab_size - 2 * 10.0 * s * b * cfg.vocab_size  # fp32 loss terms, not 2 x 16-bit
    # unsharded: the tied embedding's second gradient contribution (head, then embedding) is a full V x D
    # temporary before it is accumulated
    working = GRAD_BYTES * cfg.vocab_size * cfg.d_model
    if sharded:
        block = block_parameters(cfg)
        root = n - (cfg.n_layer // cfg.shared_layer_group) * block
        working = WEIGHT_BYTES * (2 * root + 5 * block)
    return MemoryEstimate(strategy, WEIGHT_BYTES * n / ways, GRAD_BYTES * n / ways, ADAM_BYTES * n / ways, acts,
                          working, CPU_RUNTIME_BYTES)


@dataclass(frozen=True)
class Plan:
    """Everything `gptforge plan` prints. Units in the field names; FLOPs are totals over the run."""

    n_params: int
    flops_per_token: float
    tokens: float
    training_flops: float
    table_d1_flops: float
    gpus: int
    peak_flops: float
    mfu: float
    wall_clock_s: float
    micro_batch_size: int
    gpu_memory_gib: float
    memory: tuple[MemoryEstimate, ...]
    device: str = "cuda"  # "cpu": `memory` is host memory per CPU rank (memory_per_rank)


def parse_number(flag: str, text: str, *, integer: bool = False) -> float:
    """A command-line number ("300e9", "0.4"), or a one-line GptforgeError naming `flag`."""
    try:
        value = float(text)
    except ValueError:
        raise GptforgeError(f"{flag} must be a number, got {text!r}") from None
    if integer:
        if not (math.isfinite(value) and value.is_integer()):
            raise GptforgeError(f"{flag} must be a whole number, got {text!r}")
        return int(value)
    return value


def _check_positive(name: str, value: float, *, upper: float = math.inf) -> None:
    if not (math.isfinite(value) and 0 < value <= upper):
        bound = f" and <= {upper:g}" if math.isfinite(upper) else ""
        raise GptforgeError(f"{name} must be a finite number > 0{bound}, got {value!r}")


def make_plan(cfg: ModelConfig, *, tokens: float, gpus: int, peak_flops: float, mfu: float,
              micro_batch_size: int, gpu_memory_gib: float, device: str = "cuda") -> Plan:
    """Compute, time and memory of training `cfg` on `tokens` tokens with `gpus` GPUs (or CPU ranks).

    Args:
        tokens: training tokens. peak_flops: per-GPU peak, FLOP/s, or 0 when unknown (no wall-clock estimate).
        mfu: model FLOPs utilisation in (0, 1].
        micro_batch_size: sequences per GPU per micro-step. gpu_memory_gib: memory of one GPU, GiB.
        device: "cuda" (GPU memory, `memory_per_gpu`) or "cpu" (host memory of CPU ranks, `memory_per_rank`).

    Raises:
        GptforgeError: a non-positive or non-finite number, or mfu > 1.
    """
    for name, value in (("--tokens", tokens), ("--gpus", gpus), ("--micro_batch_size", micro_batch_size),
                        ("--gpu-memory-gb", gpu_memory_gib)):
        _check_positive(name, value)
    if peak_flops != 0:
        _check_positive("--peak-tflops", peak_flops)
    _check_positive("--mfu", mfu, upper=1.0)
    n = count_parameters(cfg)
    total = training_flops(cfg, tokens)
    memory = tuple(memory_per_rank(cfg, micro_batch_size=micro_batch_size, world_size=gpus, strategy=s,
                                   device=device) for s in (CPU_STRATEGIES if device == "cpu" else STRATEGIES))
    return Plan(n_params=n, flops_per_token=flops_per_token(cfg), tokens=tokens, training_flops=total,
                table_d1_flops=table_d1_flops(n, tokens), gpus=gpus, peak_flops=peak_flops, mfu=mfu,
                wall_clock_s=wall_clock_s(total, gpus=gpus, peak_flops=peak_flops, mfu=mfu) if peak_flops else math.nan,
                micro_batch_size=micro_batch_size, gpu_memory_gib=gpu_memory_gib, memory=memory, device=device)


def _count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: Plan, cfg: ModelConfig, *, name: str, peak_source: str) -> str:
    """The plan as the text `gptforge plan` prints (one table for memory, assumptions at the end)."""
    six_n = 6.0 * plan.n_params
    days = plan.wall_clock_s / 86400
    cpu = plan.device == "cpu"
    gpus = f"{plan.gpus:,} {'CPU rank' if cpu else 'GPU'}{'s' if plan.gpus > 1 else ''}"
    lines = [
        f"{name}: {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads, context {cfg.context_length}, "
        f"vocab {cfg.vocab_size}, attention {cfg.attention_pattern}",
        f"parameters        {_count(plan.n_params)} ({plan.n_params:,})",
        f"FLOPs per token   {plan.flops_per_token:.4g} (6N = {six_n:.4g}; the rest is attention, "
        f"{plan.flops_per_token / six_n - 1:+.1%})",
        f"training tokens   {_count(plan.tokens)} ({plan.tokens:.4g})",
        f"training FLOPs    {plan.training_flops:.3g} = {pf_days(plan.training_flops):,.4g} PF-days "
        f"(GPT-3 Table D.1 convention, 6N x tokens: {plan.table_d1_flops:.3g} = "
        f"{pf_days(plan.table_d1_flops):,.4g} PF-days)",
        *([f"cluster           {gpus} x {plan.peak_flops / 1e12:g} TFLOP/s ({peak_source}) x MFU {plan.mfu:g} = "
           f"{plan.gpus * plan.peak_flops * plan.mfu / 1e15:,.4g} PFLOP/s",
           f"wall clock        {days:,.1f} days ({plan.wall_clock_s / 3600:,.1f} hours)"] if plan.peak_flops else
          ["wall clock        unknown: give --gpu NAME or --peak-tflops X for days"]),
        "",
        f"{'host memory per CPU rank (RSS)' if cpu else 'memory per GPU'} in GiB: micro-batch "
        f"{plan.micro_batch_size} x {cfg.context_length} tokens, {gpus}; fits = total <= {USABLE_FRACTION:.0%} of "
        f"{plan.gpu_memory_gib:g} GiB",
        f"{'strategy':<17}{'weights':>9}{'grads':>9}{'optimizer':>11}{'activations':>13}{'working':>9}"
        f"{'runtime' if cpu else '':>9}{'total':>9}  fits",
    ]
    for m in plan.memory:
        lines.append(f"{STRATEGY_LABELS[m.strategy]:<17}{m.weights_bytes / GIB:>9.2f}{m.grads_bytes / GIB:>9.2f}"
                     f"{m.optimizer_bytes / GIB:>11.2f}{m.activations_bytes / GIB:>13.2f}"
                     f"{m.working_bytes / GIB:>9.2f}{f'{m.runtime_bytes / GIB:.2f}' if cpu else '':>9}"
                     f"{m.total_bytes / GIB:>9.2f}  {'yes' if m.fits(plan.gpu_memory_gib) else 'no'}")
    if cpu:
        return "\n".join(lines + ["", "assumptions: float32 throughout on CPU ranks (16 bytes/parameter of state), "
                                  "fp32 activations, FSDP2 working", "  memory and the process's own "
                                  "runtime; see memory_per_rank in gptforge/plan.py and docs/scale.md."])
    lines += [
        "",
        "assumptions: fp32 weights and gradients, AdamW moments in fp32 (16 bytes/parameter); DDP: bf16 autocast,",
        "  working = bf16 weight copies; FSDP: FSDP2 per block + root, bf16 MixedPrecisionPolicy, working = gathered",
        "  bf16 root + 2 blocks and unsharded gradients; activations: Korthikanti et al. 2022 with SDPA flash",
        "  attention and no dropout (see gptforge/plan.py); act. ckpt keeps block inputs only.",
    ]
    return "\n".join(lines)
