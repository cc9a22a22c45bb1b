"""Typed run configuration: the single source of truth for every hyperparameter.

Four sections, each a dataclass handed only to the component that owns it:
`ModelConfig` (architecture), `OptimConfig` (AdamW and the lr/batch schedules), `TrainConfig`
(steps, batching, evaluation, checkpoints, device) and `FinetuneConfig` (the fine-tuning task and its data). Values come, in order, from the dataclass defaults,
a named preset (`PRESETS`, the GPT-3 paper's Table 2.1 plus small CPU presets), a YAML file
(sections `model:`, `optim:`, `train:`, `finetune:`) and finally command-line overrides `--field value`,
`--field=value` or `--section.field value`. Every field name is unique across sections, so the
short form is unambiguous. Unknown names are errors that suggest the closest valid name.

This module imports nothing else from gptforge but `errors`. It is past 500 lines on purpose: fields, presets,
aliases, parsing and validation stay in one place, so every name a user can type is checked against one table.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gptforge.errors import GptforgeError

ATTENTION_KINDS = ("dense", "local")
# LoRA target names (model.lora_targets) -> the linear layers they adapt, by the model's own module names.
LORA_TARGETS = {"qkv": "attn.qkv", "attn_proj": "attn.proj", "mlp_fc": "mlp.fc", "mlp_proj": "mlp.proj",
                "lm_head": "lm_head", "wte": "wte"}


@dataclass
class ModelConfig:
    """GPT-3 architecture (Brown et al. 2020, section 2.1: GPT-2 with alternating dense/banded attention).

    `d_head = d_model // n_head`; the MLP width is `4 * d_model`. `attention_pattern` is a comma-separated
    cycle of "dense"/"local" applied over layers ("dense,local" alternates as in GPT-3); local layers attend
    to the last `local_window` tokens (the paper gives no band width, so it is a setting). Each group of
    `shared_layer_group` adjacent layers shares one set of weights (1 means no sharing).
    `n_labels > 0` adds a classification head `score` (d_model -> n_labels, no bias) on the last real token's
    final hidden state, with dropout `classifier_dropout` before it (GPT-1, Radford et al. 2018, section 3.2);
    0 means no head.

    LoRA (Hu et al. 2021): with `lora_r > 0` every layer named in `lora_targets` (comma-separated names of
    `LORA_TARGETS`: the linear layers qkv, attn_proj, mlp_fc, mlp_proj, lm_head, and wte, the token embedding's
    lookup) gains a rank-`lora_r` update scaled by `lora_alpha / lora_r`, with dropout `lora_dropout` on a linear
    layer's input (model/lora.py). The default target is the
    fused attention input projection: Hu et al. (section 7.1, Table 5) find adapting the query and value
    projections the best use of a fixed budget, and GPT-2 fuses q, k and v into one matrix (PEFT's default for
    GPT-2 is the same `c_attn`).
    """

    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    context_length: int = 2048
    dropout: float = 0.0
    bias: bool = True
    attention_pattern: str = "dense"
    local_window: int = 256
    shared_layer_group: int = 1
    n_labels: int = 0
    classifier_dropout: float = 0.1
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "qkv"

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def layer_attention(self) -> list[str]:
        """The attention kind ("dense" or "local") of each of the `n_layer` layers."""
        cycle = [kind.strip() for kind in self.attention_pattern.split(",")]
        return [cycle[i % len(cycle)] for i in range(self.n_layer)]

    def lora_target_names(self) -> list[str]:
        """The names in `lora_targets` (qkv, attn_proj, ...), empty without LoRA (`lora_r` 0)."""
        if not self.lora_r:
            return []
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]


@dataclass
class OptimConfig:
    """AdamW and schedules, defaults from the GPT-3 paper, Appendix B.

    lr warms up linearly over `warmup_steps`, then follows a cosine from `lr` down to
    `min_lr_ratio * lr` at step `lr_decay_steps` (0 means `max_steps`), then stays constant.
    With `batch_ramp_tokens > 0` the global batch grows linearly from `batch_ramp_start_tokens`
    to `global_batch_tokens` over the first `batch_ramp_tokens` training tokens (Appendix B: 32k tokens
    up to the full batch over the first 4-12 billion tokens).
    `lr_schedule` "linear" replaces the cosine by a straight line from `lr` to `min_lr_ratio * lr` (GPT-1's
    fine-tuning recipe: linear decay to 0, Radford et al. 2018, section 4.1).
    """

    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 715
    lr_decay_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_ramp_start_tokens: int = 32768
    batch_ramp_tokens: int = 0
    lr_schedule: str = "cosine"


@dataclass
class TrainConfig:
    """The training loop: how long, how big a batch, how often to evaluate, log and checkpoint.

    `global_batch_tokens` is the optimizer-step batch in tokens (0 means one micro-batch per step);
    it must be a multiple of `micro_batch_size * context_length * world_size` (tokens per micro-step), and the
    quotient is `grad_accum_steps`. `global_batch_size` gives the batch in sequences instead (the natural unit
    for fine-tuning, whose rows are padded to different lengths); set at most one of the two.
    Validation scores the first `eval_tokens` tokens of the validation data (0: all of it) every
    `eval_interval` steps, the same tokens whatever the micro-batch size and world size. `max_time_s` stops training early (0: no limit). `peak_flops`
    is the machine's peak FLOP/s for MFU; 0 takes a known GPU's datasheet figure (utils/gpus.py) or, for a CPU or
    an unknown device, measures a matrix multiply at start-up.
    `init_from` starts from the weights of a run or checkpoint directory (e.g. one made by `gptforge import`)
    instead of a fresh initialisation; its model config replaces the `model` section.

    Under torchrun, `data_parallel` is "ddp" (replicas) or "fsdp" (FSDP2, fully sharded). `dtype` "float16" adds a
    gradient scaler; `tf32` allows TF32 matmuls on CUDA. A step whose loss or gradient norm is not finite is
    skipped (no update); `max_nonfinite_steps` such steps in a row stop the run. With `spike_zscore > 0`, a step
    whose loss exceeds the mean of the last `spike_window` losses by that many standard deviations is skipped.

    `checkpoint_format` is "consolidated" (full tensors gathered on rank 0), "sharded" (every rank writes its own
    shards with torch.distributed.checkpoint; loadable at any world size) or "auto" (sharded under FSDP, else
    consolidated); `async_checkpoint` writes sharded checkpoints in a background thread while training continues.
    `tensor_parallel` splits attention heads and MLP columns over that many ranks (a 2-D mesh with FSDP over the
    rest; see docs/scale.md).
    """

    max_steps: int = 1000
    micro_batch_size: int = 8
    global_batch_tokens: int = 0
    global_batch_size: int = 0
    eval_interval: int = 250
    eval_tokens: int = 262_144
    log_interval: int = 10
    checkpoint_interval: int = 1000
    keep_checkpoints: int = 3
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    max_time_s: float = 0.0
    peak_flops: float = 0.0
    init_from: str = ""
    data_parallel: str = "ddp"
    activation_checkpointing: bool = False
    tf32: bool = True
    max_nonfinite_steps: int = 5
    spike_zscore: float = 0.0
    spike_window: int = 50
    checkpoint_format: str = "auto"
    async_checkpoint: bool = False
    tensor_parallel: int = 1


@dataclass
class FinetuneConfig:
    """Fine-tuning on labeled data (`gptforge finetune`; ignored by `pretrain`). See docs/finetuning.md.

    `task` is "sft" (next-token loss on completions) or "classify" (a label per text). `epochs > 0` sets
    train.max_steps to ceil(epochs * training examples / examples per optimizer step) once the data is read; 0
    keeps train.max_steps. `warmup_fraction > 0` sets optim.warmup_steps to that fraction of max_steps (at least 1;
    GPT-1: 0.2%). SFT: `mask_prompt` scores only completion tokens (and the end-of-text after them);
    `prompt_field`/`completion_field` name the JSONL fields of the prompt/completion format. Classification:
    `text_field` ("" = "sentence" or "text", whichever the file has) and `label_field`; `lm_loss_weight` weighs the
    auxiliary next-token loss on the text (GPT-1 uses 0.5; 0 disables it). Without a validation file,
    `val_fraction` of the training examples (a seeded random choice) are held out.
    """

    task: str = "sft"
    epochs: float = 0.0
    warmup_fraction: float = 0.0
    mask_prompt: bool = True
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    text_field: str = ""
    label_field: str = "label"
    lm_loss_weight: float = 0.0
    val_fraction: float = 0.05


@dataclass
class Config:
    """The whole run configuration; see the section classes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def grad_accum_steps(self, world_size: int = 1) -> int:
        """Micro-steps per optimizer step to reach `global_batch_tokens` (derived, never set by hand)."""
        return _grad_accum_steps(self, world_size)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


SECTIONS = {"model": ModelConfig, "optim": OptimConfig, "train": TrainConfig, "finetune": FinetuneConfig}
# field name -> section name; field names are unique across sections (checked at import).
FIELD_SECTION = {f.name: s for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
assert len(FIELD_SECTION) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())


def _gpt3(n_layer, d_model, n_head, batch_tokens, lr):
    """One row of Table 2.1 plus the Appendix B recipe expressed in steps of that batch size.

    Warmup covers 375M tokens, the cosine decays over 260B tokens and training runs 300B tokens.
    """
    context_length = 2048
    return {
        "model": dict(n_layer=n_layer, d_model=d_model, n_head=n_head, context_length=context_length,
                      vocab_size=50257, attention_pattern="dense,local", local_window=256),
        "optim": dict(lr=lr, warmup_steps=round(375e6 / batch_tokens), lr_decay_steps=round(260e9 / batch_tokens),
                      batch_ramp_tokens=int(4e9)),
        "train": dict(global_batch_tokens=batch_tokens, max_steps=round(300e9 / batch_tokens),
                      micro_batch_size=1, checkpoint_interval=1000, eval_interval=1000),
    }


MTOK = 2**20  # the paper's "0.5M" batch is 2**19 = 524,288 tokens = 256 sequences of 2048
# Table 2.1 of Brown et al. (2020). Two rows are inconsistent as printed and are resolved here by keeping
# d_head = 128 and d_model fixed where that reproduces the published parameter count:
#   GPT-3 XL: 24 heads x 128 != 2048 = d_model, so n_head = 16 (d_head 128; 1.3B parameters).
#   GPT-3 13B: d_model 5140 is not divisible by 40 heads; d_model = 5120 = 40 x 128 (12.9B parameters).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt3-small": _gpt3(12, 768, 12, MTOK // 2, 6.0e-4),
    "gpt3-medium": _gpt3(24, 1024, 16, MTOK // 2, 3.0e-4),
    "gpt3-large": _gpt3(24, 1536, 16, MTOK // 2, 2.5e-4),
    "gpt3-xl": _gpt3(24, 2048, 16, MTOK, 2.0e-4),
    "gpt3-2.7b": _gpt3(32, 2560, 32, MTOK, 1.6e-4),
    "gpt3-6.7b": _gpt3(32, 4096, 32, 2 * MTOK, 1.2e-4),
    "gpt3-13b": _gpt3(40, 5120, 40, 2 * MTOK, 1.0e-4),
    "gpt3-175b": _gpt3(96, 12288, 96, 1536 * 2048, 0.6e-4),
    # Tiny model for tests and smoke runs.
    "debug": {
        "model": dict(n_layer=2, n_head=2, d_model=32, context_length=16, vocab_size=256),
        "optim": dict(lr=1e-3, warmup_steps=5),
        "train": dict(max_steps=20, micro_batch_size=4, eval_interval=10, eval_tokens=128, log_interval=5,
                      checkpoint_interval=10),
    },
    # Character-level Tiny Shakespeare: 4 layers, 4 heads, d_model 128, context 64, 12 sequences per step.
    "shakespeare-char": {
        "model": dict(n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=66),
        "optim": dict(lr=1e-3, warmup_steps=100, beta2=0.99),
        "train": dict(max_steps=2000, micro_batch_size=12, eval_interval=250, eval_tokens=38_400, log_interval=50,
                      checkpoint_interval=1000),
    },
    # `gptforge demo`: a small BPE model that learns visible structure in a few CPU minutes.
    "demo": {
        "model": dict(n_layer=4, n_head=4, d_model=192, context_length=128, vocab_size=4096),
        "optim": dict(lr=2e-3, warmup_steps=50, beta2=0.99),
        "train": dict(max_steps=900, micro_batch_size=16, eval_interval=300, eval_tokens=40_960, log_interval=20,
                      checkpoint_interval=300, max_time_s=300.0),
    },
    # Fine-tuning a classifier with GPT-1's recipe (Radford et al. 2018, section 4.1 "Fine-tuning details"):
    # lr 6.25e-5, batch 32 examples, 3 epochs, linear decay to 0 with warmup over 0.2% of training, dropout 0.1
    # (on the classifier too), auxiliary LM loss weight 0.5, Adam with L2 weight 0.01 (here AdamW's decay).
    "finetune-classify": {
        "model": dict(dropout=0.1, classifier_dropout=0.1),
        "optim": dict(lr=6.25e-5, lr_schedule="linear", min_lr_ratio=0.0, beta2=0.999, weight_decay=0.01),
        "train": dict(micro_batch_size=8, global_batch_size=32, eval_interval=200, log_interval=20,
                      checkpoint_interval=200, keep_checkpoints=2),
        "finetune": dict(task="classify", epochs=3, warmup_fraction=0.002, lm_loss_weight=0.5),
    },
    # Supervised fine-tuning (instruction tuning): completions scored, prompts masked; 3 epochs, batch 32,
    # linear decay to 0 after 3% warmup, no dropout, as common SFT recipes do (not a paper's numbers).
    "finetune-sft": {
        "model": dict(dropout=0.0),
        "optim": dict(lr=5e-5, lr_schedule="linear", min_lr_ratio=0.0, weight_decay=0.0),
        "train": dict(micro_batch_size=8, global_batch_size=32, eval_interval=200, log_interval=20,
                      checkpoint_interval=200, keep_checkpoints=2),
        "finetune": dict(task="sft", epochs=3, warmup_fraction=0.03, mask_prompt=True),
    },
}


# Names other tools use for gptforge's fields (nanoGPT, Hugging Face, Megatron): accepted on the command line and in
# YAML, stored under gptforge's name.
ALIASES = {
    "learning_rate": "lr", "max_lr": "lr", "block_size": "context_length", "n_ctx": "context_length",
    "n_positions": "context_length", "seq_len": "context_length", "seq_length": "context_length",
    "max_seq_len": "context_length", "n_embd": "d_model", "hidden_size": "d_model", "n_layers": "n_layer",
    "num_layers": "n_layer", "num_hidden_layers": "n_layer", "n_heads": "n_head", "num_heads": "n_head",
    "num_attention_heads": "n_head", "max_iters": "max_steps", "warmup_iters": "warmup_steps",
    "lr_decay_iters": "lr_decay_steps", "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size", "max_grad_norm": "grad_clip", "clip_grad": "grad_clip",
    "adam_beta1": "beta1", "adam_beta2": "beta2", "adam_epsilon": "eps", "eval_iters_tokens": "eval_tokens",
    "log_every": "log_interval", "eval_every": "eval_interval", "save_interval": "checkpoint_interval",
}
# Names that cannot be aliased because gptforge derives them; the error says what to set instead.
DERIVED = {
    "gradient_accumulation_steps": "it is derived: set train.global_batch_tokens (or global_batch_size) and "
                                   "micro_batch_size",
    "grad_accum_steps": "it is derived: set train.global_batch_tokens (or global_batch_size) and micro_batch_size",
    "d_head": "it is derived: d_model / n_head",
    "min_lr": "set optim.min_lr_ratio (the final lr as a fraction of lr; GPT-3 uses 0.1)",
    "eval_steps": "validation now scores a fixed number of tokens: set train.eval_tokens (0 = the whole split)",
    "eval_iters": "validation scores a fixed number of tokens: set train.eval_tokens (0 = the whole split)",
}


def _closest(name: str, options) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise naming the field."""
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "bool": bool, "str": str}[tp]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise GptforgeError(f"config: {name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise GptforgeError(f"config: {name} must be an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
        except ValueError:
            number = None
        if isinstance(number, (int, float)) and math.isfinite(number) and float(number).is_integer():
            return int(number)
        raise GptforgeError(f"config: {name} must be an integer, got {value!r}")
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise GptforgeError(f"config: {name} must be a number, got {value!r}") from None
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML list for a comma-separated field (lora_targets, attention_pattern)
    if not isinstance(value, str):
        raise GptforgeError(f"config: {name} must be a string, got {value!r}")
    return value


def field_name(key: str) -> str:
    """The field an override key names: "section.field" or "field", aliases resolved ("train.max_iters" ->
    "max_steps")."""
    name = key.rpartition(".")[2]
    return ALIASES.get(name, name)


def _set(cfg: Config, key: str, value: Any) -> None:
    """Set `key` ("field" or "section.field") on `cfg`, converting the value to the field's type."""
    section, name = key.rpartition(".")[0], field_name(key)
    if name in DERIVED:
        raise GptforgeError(f"config: cannot set '{name}': {DERIVED[name]}")
    if not section:
        if name not in FIELD_SECTION:
            raise GptforgeError(f"config: unknown field '{name}'{_closest(name, FIELD_SECTION)}")
        section = FIELD_SECTION[name]
    if section not in SECTIONS:
        raise GptforgeError(f"config: unknown section '{section}' (allowed: {', '.join(SECTIONS)})")
    sub = getattr(cfg, section)
    types_ = {f.name: f.type for f in dataclasses.fields(sub)}
    if name not in types_:
        raise GptforgeError(f"config: unknown field '{section}.{name}'{_closest(name, types_)}")
    setattr(sub, name, _coerce(value, types_[name], f"{section}.{name}"))


def _apply_tree(cfg: Config, tree: dict[str, Any], origin: str) -> None:
    for section, values in tree.items():
        if section not in SECTIONS:
            raise GptforgeError(f"{origin}: unknown section '{section}'{_closest(section, SECTIONS)} "
                                f"(allowed: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise GptforgeError(f"{origin}: section '{section}' must be a mapping of field: value")
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Turn `["--lr", "1e-3", "--max_steps=10"]` into `[("lr", "1e-3"), ("max_steps", "10")]`.

    Raises:
        GptforgeError: an argument that is not `--key value` or `--key=value`.
    """
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise GptforgeError(f"unexpected argument '{arg}' (overrides look like --field value or --field=value)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise GptforgeError(f"--{key} needs a value")
            value, i = args[i + 1], i + 1
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def load_config(*, preset: str | None = None, path: str | Path | None = None,
                overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Build and validate a Config from a preset, a YAML file and overrides (applied in that order).

    Raises:
        GptforgeError: unknown preset, missing or malformed YAML, unknown field, or an invalid value.
    """
    cfg = Config()
    if preset is not None:
        if preset not in PRESETS:
            raise GptforgeError(f"unknown preset '{preset}'{_closest(preset, PRESETS)} "
                                f"(allowed: {', '.join(PRESETS)})")
        _apply_tree(cfg, PRESETS[preset], f"preset {preset}")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise GptforgeError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise GptforgeError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if tree is None:
            raise GptforgeError(f"config file {path} is empty (expected sections {', '.join(SECTIONS)})")
        if not isinstance(tree, dict):
            raise GptforgeError(f"config file {path} must be a mapping with sections {', '.join(SECTIONS)}")
        _apply_tree(cfg, tree, str(path))
    for key, value in overrides or []:
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def _migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """Bring a config saved by an older gptforge up to date (explicit, one rule per change):
    train.eval_steps (micro-batches of random windows) became train.eval_tokens (a fixed set of tokens)."""
    train = tree.get("train")
    if isinstance(train, dict) and "eval_steps" in train:
        model = tree.get("model") or {}
        train = {k: v for k, v in train.items() if k != "eval_steps"}
        train["eval_tokens"] = int(tree["train"]["eval_steps"]) * int(train.get("micro_batch_size", 8)) * \
            int(model.get("context_length", 2048))
        tree = {**tree, "train": train}
    return tree


def config_from_dict(tree: dict[str, Any], overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Rebuild a validated Config from `Config.to_dict()` output (e.g. a checkpoint's config.json, migrated if an
    older gptforge wrote it), then apply `overrides` as `load_config` does."""
    cfg = Config()
    _apply_tree(cfg, _migrate(tree), "config")
    for key, value in overrides or []:
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def _grad_accum_steps(cfg: Config, world_size: int) -> int:
    t = cfg.train
    if t.global_batch_size:
        micro_seqs = t.micro_batch_size * world_size
        if t.global_batch_size % micro_seqs:
            raise GptforgeError(f"config: train.global_batch_size={t.global_batch_size} must be a multiple of "
                                f"micro_batch_size * world_size = {micro_seqs}")
        return t.global_batch_size // micro_seqs
    micro_tokens = t.micro_batch_size * cfg.model.context_length * world_size
    if t.global_batch_tokens == 0:
        return 1
    if t.global_batch_tokens % micro_tokens:
        raise GptforgeError(
            f"config: train.global_batch_tokens={t.global_batch_tokens} must be a multiple of "
            f"micro_batch_size * context_length * world_size = {micro_tokens}")
    return t.global_batch_tokens // micro_tokens


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise GptforgeError(f"config: {message}")


def validate(cfg: Config) -> None:
    """Check every value; raise GptforgeError naming the first bad field and what is allowed."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    for name in ("vocab_size", "n_layer", "n_head", "d_model", "context_length", "local_window",
                 "shared_layer_group"):
        _check(getattr(m, name) >= 1, f"model.{name} must be >= 1, got {getattr(m, name)}")
    _check(m.d_model % m.n_head == 0, f"model.n_head={m.n_head} must divide model.d_model={m.d_model}")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1), got {m.dropout}")
    kinds = [k.strip() for k in m.attention_pattern.split(",")]
    _check(all(k in ATTENTION_KINDS for k in kinds),
           f"model.attention_pattern={m.attention_pattern!r} must be a comma-separated list of "
           f"{' / '.join(ATTENTION_KINDS)}")
    _check(m.n_layer % m.shared_layer_group == 0,
           f"model.shared_layer_group={m.shared_layer_group} must divide model.n_layer={m.n_layer}")
    _validate_lora(m, t)
    _check(o.lr > 0 and math.isfinite(o.lr), f"optim.lr must be > 0, got {o.lr}")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _check(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(o.lr_decay_steps >= 0, f"optim.lr_decay_steps must be >= 0 (0 means max_steps), got {o.lr_decay_steps}")
    for name in ("beta1", "beta2"):
        _check(0.0 <= getattr(o, name) < 1.0, f"optim.{name} must be in [0, 1), got {getattr(o, name)}")
    _check(o.eps > 0, f"optim.eps must be > 0, got {o.eps}")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0 disables clipping), got {o.grad_clip}")
    _check(o.batch_ramp_tokens >= 0 and o.batch_ramp_start_tokens >= 1,
           "optim.batch_ramp_tokens must be >= 0 and optim.batch_ramp_start_tokens >= 1")
    for name in ("max_steps", "micro_batch_size", "eval_interval", "log_interval",
                 "checkpoint_interval", "keep_checkpoints"):
        _check(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}")
    _check(t.global_batch_tokens >= 0, f"train.global_batch_tokens must be >= 0, got {t.global_batch_tokens}")
    _check(t.global_batch_size >= 0, f"train.global_batch_size must be >= 0, got {t.global_batch_size}")
    _check(not (t.global_batch_tokens and t.global_batch_size),
           "set one of train.global_batch_tokens and train.global_batch_size, not both")
    _check(t.eval_tokens >= 0, f"train.eval_tokens must be >= 0 (0 scores the whole validation split), "
           f"got {t.eval_tokens}")
    _check(t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda", "mps"),
           f"train.device must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    _check(t.dtype in ("auto", "float32", "bfloat16", "float16"),
           f"train.dtype must be auto, float32, bfloat16 or float16, got {t.dtype!r}")
    _check(t.max_time_s >= 0 and t.peak_flops >= 0, "train.max_time_s and train.peak_flops must be >= 0")
    _check(t.data_parallel in ("ddp", "fsdp"), f"train.data_parallel must be ddp or fsdp, got {t.data_parallel!r}")
    _check(t.checkpoint_format in ("auto", "consolidated", "sharded"),
           f"train.checkpoint_format must be auto, consolidated or sharded, got {t.checkpoint_format!r}")
    _check(t.tensor_parallel >= 1, f"train.tensor_parallel must be >= 1, got {t.tensor_parallel}")
    _check(m.n_head % t.tensor_parallel == 0,
           f"train.tensor_parallel={t.tensor_parallel} must divide model.n_head={m.n_head} (whole heads per rank)")
    _check(t.tensor_parallel == 1 or m.dropout == 0,
           f"train.tensor_parallel={t.tensor_parallel} needs model.dropout = 0 (got {m.dropout}): replicated "
           "activations would draw different dropout masks on each rank")
    _check(m.n_labels >= 0, f"model.n_labels must be >= 0 (0 = no classification head), got {m.n_labels}")
    _check(0.0 <= m.classifier_dropout < 1.0, f"model.classifier_dropout must be in [0, 1), got {m.classifier_dropout}")
    _check(o.lr_schedule in ("cosine", "linear"), f"optim.lr_schedule must be cosine or linear, got {o.lr_schedule!r}")
    f = cfg.finetune
    _check(f.task in ("sft", "classify"), f"finetune.task must be sft or classify, got {f.task!r}")
    _check(f.epochs >= 0, f"finetune.epochs must be >= 0 (0 keeps train.max_steps), got {f.epochs}")
    _check(0.0 <= f.warmup_fraction < 1.0, f"finetune.warmup_fraction must be in [0, 1), got {f.warmup_fraction}")
    _check(f.lm_loss_weight >= 0, f"finetune.lm_loss_weight must be >= 0 (0 disables it), got {f.lm_loss_weight}")
    _check(0.0 <= f.val_fraction < 1.0, f"finetune.val_fraction must be in [0, 1), got {f.val_fraction}")
    _check(t.max_nonfinite_steps >= 1, f"train.max_nonfinite_steps must be >= 1, got {t.max_nonfinite_steps}")
    _check(t.spike_zscore >= 0 and t.spike_window >= 2,
           "train.spike_zscore must be >= 0 (0 disables) and train.spike_window >= 2")
    _grad_accum_steps(cfg, 1)


# Other tools' names (Hugging Face GPT-2 / PEFT, Llama-style) for the layers of LORA_TARGETS, for did-you-mean hints.
LORA_TARGET_SYNONYMS = {"c_attn": "qkv", "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "query_key_value": "qkv",
                        "o_proj": "attn_proj", "c_fc": "mlp_fc", "up_proj": "mlp_fc", "down_proj": "mlp_proj",
                        "embed": "wte", "embedding": "wte", "embeddings": "wte", "embed_tokens": "wte",
                        "tok_embeddings": "wte", "lm": "lm_head", "head": "lm_head"}


def _closest_target(name: str) -> str:
    synonym = LORA_TARGET_SYNONYMS.get(name.strip().lower())
    return f"; did you mean '{synonym}'?" if synonym else _closest(name, LORA_TARGETS)


def _validate_lora(m: ModelConfig, t: TrainConfig) -> None:
    _check(m.lora_r >= 0, f"model.lora_r must be >= 0 (0: no LoRA adapters), got {m.lora_r}")
    if not m.lora_r:
        return
    _check(m.lora_r <= m.d_model, f"model.lora_r={m.lora_r} exceeds model.d_model={m.d_model}: a low-rank update "
           "cannot have a rank above the layer's width (typical: 4-64)")
    _check(m.lora_alpha > 0 and math.isfinite(m.lora_alpha), f"model.lora_alpha must be > 0, got {m.lora_alpha}")
    _check(0.0 <= m.lora_dropout < 1.0, f"model.lora_dropout must be in [0, 1), got {m.lora_dropout}")
    names = m.lora_target_names()
    unknown = [n for n in names if n not in LORA_TARGETS]
    _check(not unknown, f"model.lora_targets: unknown target {unknown[0]!r}{_closest_target(unknown[0])} "
           f"(allowed: {', '.join(LORA_TARGETS)})" if unknown else "")
    _check(bool(names), f"model.lora_targets={m.lora_targets!r} matches no layer (allowed: {', '.join(LORA_TARGETS)})")
    _check(len(set(names)) == len(names), f"model.lora_targets={m.lora_targets!r} names a target twice")
    _check(set(m.layer_attention()) == {"dense"},
           f"LoRA (model.lora_r={m.lora_r}) needs dense attention, got model.attention_pattern="
           f"{m.attention_pattern!r}: banded layers have no Hugging Face GPT-2/PEFT equivalent, so the adapted "
           "model could not be exported")
    _check(m.shared_layer_group == 1,
           f"LoRA (model.lora_r={m.lora_r}) needs model.shared_layer_group=1, got {m.shared_layer_group}: shared "
           "layers have no Hugging Face GPT-2/PEFT equivalent, so the adapted model could not be exported")
    _check(t.tensor_parallel == 1, f"LoRA (model.lora_r={m.lora_r}) does not support train.tensor_parallel="
           f"{t.tensor_parallel} (the adapters are not split over ranks); use data parallelism (ddp or fsdp)")


def advisories(cfg: Config) -> list[str]:
    """Settings that are valid but probably not what was meant (the training loop prints them as warnings)."""
    t, o, notes = cfg.train, cfg.optim, []
    if o.warmup_steps > t.max_steps:
        notes.append(f"optim.warmup_steps={o.warmup_steps} exceeds train.max_steps={t.max_steps}: the learning rate "
                     f"never reaches optim.lr={o.lr:g}")
    if o.lr_decay_steps and o.lr_decay_steps < o.warmup_steps:
        notes.append(f"optim.lr_decay_steps={o.lr_decay_steps} is before the end of warm-up ({o.warmup_steps})")
    if t.eval_interval > t.max_steps:
        notes.append(f"train.eval_interval={t.eval_interval} exceeds train.max_steps={t.max_steps}: validation runs "
                     "only at the last step")
    m, defaults = cfg.model, ModelConfig()
    if not m.lora_r and any(getattr(m, f) != getattr(defaults, f) for f in ("lora_alpha", "lora_dropout", "lora_targets")):
        notes.append(f"model.lora_r=0, so no LoRA adapters are added and model.lora_targets={m.lora_targets!r} (and "
                     "lora_alpha, lora_dropout) are ignored: every parameter trains; set --lora_r 8 (say) for LoRA")
    return notes


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from gptforge.utils.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))

