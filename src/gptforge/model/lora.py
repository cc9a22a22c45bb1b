"""LoRA: low-rank adapters on the model's linear layers and token embedding (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of LLMs").

Legend: N rows (tokens), `in`/`out` the layer's widths, r the rank (model.lora_r), V vocab_size, D d_model.
An adapted linear layer computes `W x + b + (alpha / r) * B A dropout(x)` with A (r, in) and B (out, r). B starts
at zero, so a fresh adapter leaves the model's outputs unchanged (Hu et al., section 4.1); A starts Gaussian with
std 1 / sqrt(3 * in), the variance of PEFT's default (Kaiming-uniform with a = sqrt(5), i.e. uniform on
[-1/sqrt(in), 1/sqrt(in)]) so learning rates carry over between the two. `LoRALinear` subclasses nn.Linear and
keeps its parameters (`...qkv.weight`, `...qkv.bias`), adding `...qkv.lora_A` and `...qkv.lora_B`, so a base
checkpoint loads into an adapted model with only the adapters missing.

The token embedding (target `wte`, `LoRAEmbedding`) adapts the lookup: row t becomes `W[t] + (alpha / r) * B A[:, t]`
with A (r, V) starting at zero (each token's own r numbers) and B (D, r) Gaussian, PEFT's layout and convention
for embeddings (its `lora_embedding_A` / `lora_embedding_B`). The tied LM head keeps reading the base matrix, as
under PEFT. A small model fine-tuned for classification gets most of its gain from moving word embeddings (SST-2,
4 layers, d_model 128: 0.789 dev accuracy with everything trained, 0.681 with the embeddings frozen), which
adapters on the linear layers alone cannot do (0.577); with `wte` added LoRA comes within 2 points of full
fine-tuning (examples/finetune_sst2.py, docs/finetuning.md).

Adapters are part of the model config (model.lora_r and friends), so every loader builds the adapted model from
a checkpoint's config.json. This module also freezes the base (`freeze_base`), folds adapters into the weights
(`merge_lora`), fingerprints the base (`base_checksum`) and saves / loads the adapters on their own
(`save_adapter`, `load_adapter`: adapter.safetensors + adapter.json). It knows nothing of training or parallelism.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from gptforge.config import LORA_TARGETS, ModelConfig
from gptforge.errors import GptforgeError
from gptforge.utils.device import meta_device

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"
LORA_PARAMS = ("lora_A", "lora_B")
TIED_KEYS = ("lm_head.weight",)  # the head shares the token embedding's matrix (stored once, as wte.weight)
MODEL_LEVEL_TARGETS = ("lm_head", "wte")  # one module for the whole model (the others: one per block)


class _LowRank:
    """What both adapted layers share: A (r, n_in), B (n_out, r), scale = alpha / r, and their initialisation
    from the layer's `init_std(leaf)` (a std, or 0 for zeros)."""

    def _add_adapter(self, like: torch.Tensor, n_in: int, n_out: int, r: int, alpha: float) -> None:
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, n_in, device=like.device, dtype=like.dtype))
        self.lora_B = nn.Parameter(torch.empty(n_out, r, device=like.device, dtype=like.dtype))
        with torch.random.fork_rng(devices=[]):  # leave the global stream alone: GPT.init_weights draws its seed next
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re)initialise the adapter only (see `init_std`); the base weights are left alone."""
        if self.lora_A.is_meta:
            return
        for leaf in LORA_PARAMS:
            param, std = getattr(self, leaf), self.init_std(leaf)
            if std:
                param.normal_(0.0, std)
            else:
                param.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}"


class LoRALinear(_LowRank, nn.Linear):
    """An nn.Linear plus a rank-r update: y = x W^T + b + scale * dropout(x) A^T B^T, scale = alpha / r.

    Built around an existing layer (its `weight` and `bias` parameters are taken over, not copied), so names and
    checkpoints of the base are unchanged. `model/linear.py` sends only plain nn.Linear layers to its oneDNN fast
    path; this subclass always runs its own forward.
    """

    def __init__(self, base: nn.Linear, *, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._add_adapter(base.weight, self.in_features, self.out_features, r, alpha)

    def init_std(self, leaf: str) -> float:
        """Std of the zero-mean normal that initialises adapter parameter `leaf` ("lora_A" / "lora_B"); 0 = zeros."""
        return lora_a_std(self.in_features) if leaf == "lora_A" else 0.0

    def delta(self) -> torch.Tensor:
        """The update of the weight, scale * B A: (out, in) in float32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        base = nn.functional.linear(x, self.weight, self.bias)
        down = nn.functional.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        return base + nn.functional.linear(down, self.lora_B) * self.scale


def lora_a_std(in_features: int) -> float:
    """Std of A's Gaussian initialisation: 1 / sqrt(3 * in), the variance of PEFT's default uniform init."""
    return 1.0 / math.sqrt(3 * in_features)


# Std of the embedding adapter's B: PEFT's N(0, 1), so learning rates carry over between the two. Measured on SST-2
# (examples/finetune_sst2.py's LoRA arm, r 8, lr 3e-3, 600 steps): std 0.02, 0.1, 1.0 gave dev accuracy 0.770,
# 0.795, 0.786 (one seed; a seed moves it by 1-2 points).
LORA_EMBEDDING_B_STD = 1.0


class LoRAEmbedding(_LowRank, nn.Embedding):
    """An nn.Embedding plus a rank-r update of its rows: row t = W[t] + scale * B A[:, t], scale = alpha / r.

    A (r, V) starts at zero and B (D, r) Gaussian with std `LORA_EMBEDDING_B_STD`: PEFT's layout for embeddings
    (`lora_embedding_A` (r, V), `lora_embedding_B` (D, r)), so the tensors export unchanged. Built around an
    existing embedding (its `weight` is taken over, not copied). No dropout: a lookup has no input to drop (PEFT
    applies none to embedding adapters either).
    """

    def __init__(self, base: nn.Embedding, *, r: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = base.weight
        self._add_adapter(base.weight, self.num_embeddings, self.embedding_dim, r, alpha)

    def init_std(self, leaf: str) -> float:
        """Std of the zero-mean normal that initialises adapter parameter `leaf` ("lora_A" / "lora_B"); 0 = zeros."""
        return LORA_EMBEDDING_B_STD if leaf == "lora_B" else 0.0

    def delta(self) -> torch.Tensor:
        """The update of the whole table, scale * (B A)^T: (V, D) in float32."""
        return (self.lora_B.float() @ self.lora_A.float()).t() * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int64 -> (..., D) in the weight's dtype."""
        base = nn.functional.embedding(ids, self.weight)
        codes = nn.functional.embedding(ids, self.lora_A.t())  # (..., r): each token's own adapter coordinates
        return base + nn.functional.linear(codes, self.lora_B) * self.scale


LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def with_lora_settings(base: ModelConfig, user: ModelConfig, *, source: str = "the initial checkpoint") -> ModelConfig:
    """`base` (an initial checkpoint's architecture) with `user`'s lora_* fields on top: how `--init_from` /
    `--init` runs take the architecture from the checkpoint and the adapters from the command line. Validate the
    result with `config.validate` (LoRA needs dense attention, no shared layers).

    Raises:
        GptforgeError: `base` already has adapters (fold them in first with `gptforge merge`).
    """
    if base.lora_r:
        raise GptforgeError(f"{source} has LoRA adapters (model.lora_r={base.lora_r}); fold them in first with: "
                            "gptforge merge RUN --out NEW_RUN")
    return dataclasses.replace(base, **{f: getattr(user, f) for f in LORA_FIELDS})


def target_modules(cfg: ModelConfig, n_blocks: int) -> list[str]:
    """Module names (`wte`, `blocks.0.attn.qkv`, ..., `lm_head`) adapted under `cfg`, in model order."""
    names = []
    for target in cfg.lora_target_names():
        path = LORA_TARGETS[target]
        names += [path] if target in MODEL_LEVEL_TARGETS else [f"blocks.{i}.{path}" for i in range(n_blocks)]
    return names


def add_lora(model: nn.Module, cfg: ModelConfig) -> None:
    """Replace each targeted nn.Linear of `model` (a GPT) by a LoRALinear around it (the token embedding `wte` by
    a LoRAEmbedding), on the same device (meta included). Does nothing when `cfg.lora_r` is 0.

    Raises:
        GptforgeError: a target is not a plain nn.Linear / nn.Embedding (the config's checks normally catch this).
    """
    if not cfg.lora_r:
        return
    names = target_modules(cfg, len(model.blocks))
    if not names:
        raise GptforgeError(f"model.lora_targets={cfg.lora_targets!r} matches no layer "
                            f"(allowed: {', '.join(LORA_TARGETS)})")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if type(layer) is nn.Embedding:
            setattr(parent, child, LoRAEmbedding(layer, r=cfg.lora_r, alpha=cfg.lora_alpha))
            continue
        if type(layer) is not nn.Linear:
            raise GptforgeError(f"LoRA target {name} is a {type(layer).__name__}, not a plain linear layer")
        setattr(parent, child, LoRALinear(layer, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout))


def is_adapter_param(name: str) -> bool:
    """True for the name of a LoRA parameter (`....lora_A` / `....lora_B`)."""
    return name.rpartition(".")[2] in LORA_PARAMS


def lora_missing_ok(model: nn.Module) -> tuple[str, ...]:
    """Names of `model`'s adapter parameters: pass as `load_model_weights(..., missing_ok=...)` to load a base
    checkpoint (which has none) into an adapted model; the adapters keep their initialisation."""
    return tuple(n for n, _ in _clean_params(model) if is_adapter_param(n))


# Segments that wrappers insert into parameter names (activation checkpointing, torch.compile, DDP); the same list as
# distributed/materialize.py's WRAPPER_SEGMENTS, repeated so that model/ imports nothing from distributed/.
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.")


def _clean_params(model: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """`named_parameters` under the names an unwrapped model (and a checkpoint) uses."""
    for name, p in model.named_parameters():
        for segment in _WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        yield name, p


def freeze_base(model: nn.Module, trainable: tuple[str, ...] = ()) -> tuple[int, int]:
    """Set `requires_grad` False on every parameter but the LoRA adapters and those whose names start with one of
    `trainable` (e.g. a new classification head). Works on the meta device (counts need shapes only).

    Returns:
        (trainable_params, total_params): element counts, the tied head and shared layers counted once.

    Raises:
        GptforgeError: nothing would be trained (no adapters and no `trainable` prefix matches).
    """
    n_trainable = n_total = 0
    for name, p in _clean_params(model):
        keep = is_adapter_param(name) or (bool(trainable) and name.startswith(trainable))
        p.requires_grad_(keep)
        n_total += p.numel()
        n_trainable += p.numel() if keep else 0
    if n_trainable == 0:
        raise GptforgeError("freeze_base: no parameter left to train (the model has no LoRA adapters "
                            f"(model.lora_r=0) and no parameter starts with {list(trainable)})")
    return n_trainable, n_total


def describe_trainable(n_trainable: int, n_total: int) -> str:
    """The line training prints: 'LoRA: N trainable of M parameters (x%)'."""
    return f"LoRA: {n_trainable:,} trainable of {n_total:,} parameters ({100.0 * n_trainable / n_total:.2f}%)"


def adapter_state(model: nn.Module, trainable: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The adapter tensors (and parameters under the `trainable` prefixes) by name, detached CPU float32 copies."""
    return {n: p.detach().float().cpu().contiguous() for n, p in _clean_params(model)
            if is_adapter_param(n) or (trainable and n.startswith(trainable))}


def base_checksum(named_tensors: Iterable[tuple[str, torch.Tensor]], trainable: tuple[str, ...] = ()) -> str:
    """The base model's identity: sha256 over (name, shape, float32 bytes) of every tensor in name order, skipping
    adapters, the tied head and the `trainable` prefixes (they are saved with the adapter).

    Cost: one pass over the weights (0.66 s for 124M parameters, measured on the 2-core CPU).
    """
    digest = hashlib.sha256()
    tensors = dict(named_tensors)
    for name in sorted(tensors):
        if is_adapter_param(name) or name in TIED_KEYS or (trainable and name.startswith(trainable)):
            continue
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def adapter_info(cfg: ModelConfig, checksum: str, trainable: tuple[str, ...] = ()) -> dict:
    """adapter.json's content: the LoRA settings, the adapted module names and the base model's checksum."""
    return {"format": "gptforge-lora", "version": 1, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout, "lora_targets": cfg.lora_targets, "trainable": list(trainable),
            "base_sha256": checksum}


def write_adapter(directory: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write adapter.safetensors and adapter.json into `directory` (each atomically)."""
    from safetensors.torch import save_file

    from gptforge.utils.io import atomic_write, atomic_write_json

    atomic_write(Path(directory) / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(Path(directory) / ADAPTER_CONFIG, info)


def save_adapter(model: nn.Module, directory: str | Path, trainable: tuple[str, ...] = ()) -> Path:
    """Save `model`'s adapters (plus `trainable` parameters) on their own: `directory`/adapter.safetensors (only
    those tensors: r * (in + out) floats per adapted layer) and adapter.json (`adapter_info`). `model` is a
    plain (unsharded) GPT with lora_r > 0. Returns the directory."""
    if not model.cfg.lora_r:
        raise GptforgeError("save_adapter: the model has no LoRA adapters (model.lora_r=0)")
    params = dict(_clean_params(model))
    write_adapter(Path(directory), adapter_state(model, trainable),
                  adapter_info(model.cfg, base_checksum(params.items(), trainable), trainable))
    return Path(directory)


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Load adapter.safetensors from `directory` into `model` (a plain GPT whose config has the same LoRA
    settings), after checking that `model`'s base weights are the ones the adapter was trained on.

    Raises:
        GptforgeError: missing/corrupt files, different LoRA settings, a different base (checksum), or tensors
        that do not fit.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        info = json.loads((directory / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GptforgeError(f"cannot read {directory / ADAPTER_CONFIG}: {exc}") from None
    cfg = model.cfg
    for key in ("lora_r", "lora_alpha", "lora_targets"):
        if info.get(key) != getattr(cfg, key):
            raise GptforgeError(f"adapter in {directory} has {key}={info.get(key)!r} but the model has "
                                f"{getattr(cfg, key)!r}")
    trainable = tuple(info.get("trainable", ()))
    params = dict(_clean_params(model))
    if base_checksum(params.items(), trainable) != info.get("base_sha256"):
        raise GptforgeError(f"adapter in {directory} was trained on a different base model (base checksum "
                            f"{str(info.get('base_sha256'))[:12]}..., this model's differs); load it onto its own base")
    try:
        tensors = load_file(str(directory / ADAPTER_WEIGHTS))
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise GptforgeError(f"corrupt adapter file {directory / ADAPTER_WEIGHTS}: {exc}") from None
    expected = set(adapter_state(model, trainable))
    if set(tensors) != expected:
        raise GptforgeError(f"adapter in {directory} does not fit the model: missing "
                            f"{sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(params[name].shape):
                raise GptforgeError(f"adapter in {directory} does not fit the model: {name} has shape "
                                    f"{tuple(value.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(value)


@torch.no_grad()
def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's weights with every adapter folded in (W + each adapter's `delta`), float32 on CPU.

    Raises:
        GptforgeError: the head is adapted (it shares its matrix with the token embedding, so folding an update
        into it would change the embedding too), or the token embedding of a language model is (folding it in
        would change the tied head, which the adapted model leaves alone). A classifier (model.n_labels > 0)
        may fold `wte` in: its class logits do not read the LM head.
    """
    targets = model.cfg.lora_target_names()
    if "lm_head" in targets:
        raise GptforgeError("cannot merge LoRA adapters on lm_head: the head shares its matrix with the token "
                            "embedding, so the update cannot be folded in (train without lm_head in lora_targets)")
    if "wte" in targets and not model.cfg.n_labels:
        raise GptforgeError("cannot merge a LoRA adapter on wte into a language model: the token embedding shares "
                            "its matrix with the LM head, which the adapter leaves alone, so folding it in would "
                            "change the logits; use the adapter unmerged (or its PEFT export), or train without wte")
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, _LowRank):  # weight (out, in) or an embedding's table (V, D), plus its delta
            state[f"{name}.weight"] = module.weight.detach().float().cpu() + module.delta().detach().cpu()
    for name, p in _clean_params(model):
        if not is_adapter_param(name) and name not in state:
            state[name] = p.detach().float().cpu()
    return state


def plain_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without LoRA: lora_r 0 and the other lora_* fields at their defaults."""
    defaults = ModelConfig()
    return dataclasses.replace(cfg, **{f: getattr(defaults, f) for f in LORA_FIELDS})


def merge_lora(model: nn.Module) -> nn.Module:
    """A plain GPT (model.lora_r = 0, float32, CPU, eval mode) whose weights are `model`'s with every adapter
    folded in; its logits equal the adapted model's up to float32 rounding. `model` is left unchanged.

    Raises:
        GptforgeError: the model has no adapters, or the head is adapted (see `merged_state`).
    """
    from gptforge.model.gpt import GPT

    if not model.cfg.lora_r:
        raise GptforgeError("nothing to merge: the model has no LoRA adapters (model.lora_r=0)")
    state = merged_state(model)
    with meta_device():
        merged = GPT(plain_config(model.cfg))
    merged.to_empty(device="cpu")
    merged.tie_weights()
    params = dict(merged.named_parameters())
    for name, p in params.items():
        p.data.copy_(state[name])
    return merged.eval()
