"""Hugging Face GPT-2 interop: export a run as a GPT-2 model directory, import a GPT-2 directory as a run.

Legend: L n_layer, D d_model, V vocab_size, C context_length.
gptforge's GPT is GPT-2's architecture, so the conversion is a renaming plus one layout change: GPT-2 stores its
matrices as `Conv1D` weights of shape (in, out), where gptforge's `nn.Linear` holds (out, in). The fused QKV
projection splits into q, k, v and then into heads the same way in both, so it needs no reordering.

    gptforge                    GPT-2 (transformers' GPT2LMHeadModel)
    wte, wpe, ln_f              transformer.wte, transformer.wpe, transformer.ln_f
    blocks.i.ln_1 / ln_2        transformer.h.i.ln_1 / ln_2
    blocks.i.attn.qkv / proj    transformer.h.i.attn.c_attn / c_proj       (weights transposed)
    blocks.i.mlp.fc / proj      transformer.h.i.mlp.c_fc / c_proj          (weights transposed)
    lm_head (tied to wte)       lm_head (tied to transformer.wte; not stored)
    score (n_labels > 0)        score (GPT2ForSequenceClassification; no bias, (n_labels, D) in both)

Both formats are plain JSON + safetensors, so this module never imports transformers. It depends on
`config`, `tokenizer`, `model` and `checkpoint.io`; the tokenizer files live in `checkpoint.hf_tokenizer`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptforge.checkpoint.hf_tokenizer import export_tokenizer, import_tokenizer
from gptforge.checkpoint.io import (
    TIED_KEYS,
    find_checkpoint,
    load_checkpoint,
    load_labels,
    load_torch_file,
    read_json,
    save_checkpoint,
)
from gptforge.config import Config, ModelConfig, config_from_dict, save_config
from gptforge.errors import GptforgeError
from gptforge.utils.io import atomic_write_json

LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which gptforge uses; GPT-2's layer_norm_epsilon default
# GPT-2 activations equal to gptforge's F.gelu(approximate="tanh").
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")
# gptforge name inside a block -> (GPT-2 name inside transformer.h.i, stored transposed as Conv1D (in, out)).
BLOCK_NAMES = {
    "ln_1.weight": ("ln_1.weight", False), "ln_1.bias": ("ln_1.bias", False),
    "attn.qkv.weight": ("attn.c_attn.weight", True), "attn.qkv.bias": ("attn.c_attn.bias", False),
    "attn.proj.weight": ("attn.c_proj.weight", True), "attn.proj.bias": ("attn.c_proj.bias", False),
    "ln_2.weight": ("ln_2.weight", False), "ln_2.bias": ("ln_2.bias", False),
    "mlp.fc.weight": ("mlp.c_fc.weight", True), "mlp.fc.bias": ("mlp.c_fc.bias", False),
    "mlp.proj.weight": ("mlp.c_proj.weight", True), "mlp.proj.bias": ("mlp.c_proj.bias", False),
}
TOP_NAMES = ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias")
# Causal-mask buffers that older GPT-2 checkpoints store; they hold no weights.
MASK_BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def gpt2_name(name: str) -> tuple[str, bool]:
    """gptforge tensor name -> (GPT-2 name with the `transformer.` prefix, stored transposed)."""
    if name in TOP_NAMES:
        return "transformer." + name, False
    match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    if match is None or match.group(2) not in BLOCK_NAMES:
        raise GptforgeError(f"tensor {name!r} has no GPT-2 counterpart")
    gpt2, transposed = BLOCK_NAMES[match.group(2)]
    return f"transformer.h.{match.group(1)}.{gpt2}", transposed


# ---------------------------------------------------------------------------------------------- export


def unsupported_features(cfg: ModelConfig) -> list[str]:
    """The features of `cfg` that GPT-2's architecture cannot represent (empty: exportable)."""
    features = []
    banded = [i for i, kind in enumerate(cfg.layer_attention()) if kind == "local"]
    if banded and cfg.local_window < cfg.context_length:
        features.append(f"banded attention (attention_pattern={cfg.attention_pattern!r}: layers {banded[:4]}"
                        f"{'...' if len(banded) > 4 else ''} attend to the last {cfg.local_window} of "
                        f"{cfg.context_length} tokens; GPT-2 attends to the whole context in every layer)")
    if cfg.shared_layer_group > 1:
        features.append(f"shared layers (shared_layer_group={cfg.shared_layer_group}: groups of layers share "
                        f"weights; every GPT-2 layer has its own)")
    if not cfg.bias:
        features.append("bias=false (GPT-2's linear layers and LayerNorms always have biases)")
    return features


def gpt2_config(cfg: ModelConfig, *, eot_id: int) -> dict:
    """transformers' GPT2Config for `cfg`, as the dict that goes into config.json."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS, "initializer_range": 0.02,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "add_cross_attention": False, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "dtype": "float32",
    }


def to_gpt2_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """gptforge state (no tied head) -> GPT-2 state: renamed, Conv1D matrices transposed to (in, out), float32."""
    out = {}
    for name, tensor in state.items():
        gpt2, transposed = gpt2_name(name)
        tensor = tensor.detach().to("cpu", torch.float32)
        out[gpt2] = (tensor.t() if transposed else tensor).contiguous()
    return out


def export_hf(run_dir: str | Path, out_dir: str | Path, *, merged: bool = False) -> Path:
    """Write the latest checkpoint of `run_dir` (or a checkpoint directory) as a Hugging Face GPT-2 directory.

    `out_dir` gets config.json, generation_config.json, model.safetensors and the tokenizer (tokenizer.json,
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json), so that
    `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` load it offline.
    A LoRA run (model.lora_r > 0) exports its base weights there and the adapters in PEFT's format in
    `out_dir`/adapter (`checkpoint/adapters.py`), or with `merged` the weights with the adapters folded in.

    Raises:
        GptforgeError: no checkpoint, a model feature GPT-2 cannot represent (banded attention, shared layers,
            no biases), a character-level tokenizer, an adapted lm_head, or an `out_dir` that exists and is not
            empty.
    """
    from gptforge.checkpoint.adapters import write_peft_adapter
    from gptforge.model.lora import is_adapter_param, merge_lora

    model, cfg, tokenizer, _ = _load_exportable(run_dir)
    out = _fresh_output(out_dir)
    adapted, export_model = cfg.model.lora_r > 0, model
    if adapted and merged:
        export_model, adapted = merge_lora(model), False
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if adapted:
            write_peft_adapter(model, tmp / "adapter", base_model=str(out.resolve()))
        state = {k: v for k, v in export_model.state_dict().items()
                 if k not in TIED_KEYS and not is_adapter_param(k)}
        score = state.pop("score.weight", None)
        tensors = to_gpt2_state(state)
        hf_config = gpt2_config(cfg.model, eot_id=tokenizer.eot_id)
        if score is not None:
            tensors["score.weight"] = score.detach().to("cpu", torch.float32).contiguous()
            hf_config.update(classification_config(run_dir, cfg.model.n_labels, eot_id=tokenizer.eot_id))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config)
        atomic_write_json(tmp / "generation_config.json", {"bos_token_id": tokenizer.eot_id,
                                                           "eos_token_id": tokenizer.eot_id})
        export_tokenizer(tokenizer, tmp, context_length=cfg.model.context_length)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def classification_config(run_dir: str | Path, n_labels: int, *, eot_id: int) -> dict:
    """The GPT2Config fields of a classification run: GPT2ForSequenceClassification with the run's labels, and
    end-of-text as the pad token (HF pools the last token that is not padding; gptforge's classification rows
    never contain end-of-text, so both pool the same last real token)."""
    labels = load_labels(find_checkpoint(run_dir))
    if len(labels) != n_labels:
        raise GptforgeError(f"{run_dir}: labels.json names {len(labels)} labels but the model has {n_labels}")
    return {"architectures": ["GPT2ForSequenceClassification"], "pad_token_id": eot_id,
            "id2label": {str(i): name for i, name in enumerate(labels)},
            "label2id": {name: i for i, name in enumerate(labels)}, "summary_first_dropout": 0.1}


def _load_exportable(run_dir: str | Path):
    """Load the checkpoint after checking, from its config and tokenizer alone, that GPT-2 can represent it."""
    from gptforge.tokenizer import load_tokenizer

    ckpt = find_checkpoint(run_dir)
    cfg = config_from_dict(read_json(ckpt / "config.json"))
    features = unsupported_features(cfg.model)
    if features:
        raise GptforgeError(f"cannot export {ckpt} in GPT-2 format: the model uses {'; '.join(features)}")
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.kind != "bpe":
        raise GptforgeError(f"cannot export {ckpt} in GPT-2 format: its tokenizer is {tokenizer.kind}-level; GPT-2 "
                            f"tokenizers are byte-level BPE (prepare the data with --tokenizer bpe)")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise GptforgeError(f"cannot export {ckpt}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                            f"vocab_size is {cfg.model.vocab_size}")
    return load_checkpoint(ckpt)


def _fresh_output(path: str | Path) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptforgeError(f"output directory {out} already exists and is not empty; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _install(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory to `out` (which is absent or an empty directory)."""
    if out.is_dir():
        out.rmdir()
    os.replace(tmp, out)


# ---------------------------------------------------------------------------------------------- import


@dataclass
class ImportReport:
    """What `import_hf` wrote: the run directory, its checkpoint, the model config, and notes for the user."""

    run_dir: Path
    checkpoint: Path
    model: ModelConfig
    num_parameters: int
    notes: list[str] = field(default_factory=list)


def _field(hf: dict, names: tuple[str, ...], default, kind: type, source: Path):
    """The first of `names` present in a GPT-2 config.json (GPT2Config's attribute aliases), else `default`,
    as `kind` (int or float).

    Raises:
        GptforgeError: the value is not a number of that kind.
    """
    name, value = next(((n, hf[n]) for n in names if hf.get(n) is not None), (names[0], default))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise GptforgeError(f"{source}: {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def model_config_from_gpt2(hf: dict, *, source: Path) -> tuple[ModelConfig, list[str]]:
    """Map a GPT-2 config.json onto ModelConfig (missing fields take GPT2Config's defaults).

    Returns:
        The model config and notes (settings gptforge represents differently).

    Raises:
        GptforgeError: not a GPT-2 config, or a setting gptforge's model cannot reproduce (naming `source`).
    """
    if not isinstance(hf, dict):
        raise GptforgeError(f"{source} is not a model config (expected a JSON object)")
    model_type = hf.get("model_type")
    if model_type != "gpt2":
        raise GptforgeError(f"{source}: model_type is {model_type!r}; only GPT-2-family checkpoints (model_type "
                            f"'gpt2') can be imported")
    d_model = _field(hf, ("n_embd", "hidden_size"), 768, int, source)
    refusals = [
        (hf.get("activation_function", "gelu_new") in TANH_GELUS,
         f"activation_function {hf.get('activation_function')!r} (gptforge uses the tanh GELU, 'gelu_new')"),
        (abs(_field(hf, ("layer_norm_epsilon",), LAYER_NORM_EPS, float, source) - LAYER_NORM_EPS) < 1e-12,
         f"layer_norm_epsilon {hf.get('layer_norm_epsilon')} (gptforge uses {LAYER_NORM_EPS})"),
        (hf.get("n_inner") in (None, 4 * d_model), f"n_inner {hf.get('n_inner')} (gptforge's MLP is 4 * n_embd)"),
        (hf.get("scale_attn_weights", True), "scale_attn_weights false (gptforge scales by 1/sqrt(d_head))"),
        (not hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx true"),
        (not hf.get("add_cross_attention", False), "add_cross_attention true (an encoder-decoder model)"),
    ]
    bad = [message for ok, message in refusals if not ok]
    if bad:
        raise GptforgeError(f"{source}: cannot import a GPT-2 with {'; '.join(bad)}")
    dropouts = {name: _field(hf, (name,), 0.1, float, source) for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    notes = []
    if len(set(dropouts.values())) > 1:
        notes.append(f"GPT-2 dropouts differ ({', '.join(f'{k} {v:g}' for k, v in dropouts.items())}); gptforge "
                     f"has one dropout, set to resid_pdrop {dropouts['resid_pdrop']:g}")
    cfg = ModelConfig(
        vocab_size=_field(hf, ("vocab_size",), 50257, int, source),
        n_layer=_field(hf, ("n_layer", "num_hidden_layers"), 12, int, source),
        n_head=_field(hf, ("n_head", "num_attention_heads"), 12, int, source),
        d_model=d_model,
        context_length=_field(hf, ("n_positions", "max_position_embeddings", "n_ctx", "block_size"), 1024, int,
                              source),
        dropout=dropouts["resid_pdrop"],
    )
    try:
        config_from_dict({"model": cfg.__dict__})
    except GptforgeError as exc:
        raise GptforgeError(f"{source}: {exc}") from None
    return cfg, notes


def read_gpt2_weights(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Read every tensor of a GPT-2 checkpoint directory (safetensors preferred; a sharded index is followed).

    Returns:
        tensors by name (float32, `transformer.` prefix removed) and the file each came from.

    Raises:
        GptforgeError: no weights file, a missing shard, a corrupt file, or a pickle that is not plain tensors.
    """
    found = next((src / name for name in WEIGHT_FILES if (src / name).is_file()), None)
    if found is None:
        raise GptforgeError(f"no weights in {src} (expected one of {', '.join(WEIGHT_FILES)})")
    files = [found]
    if found.name.endswith(".index.json"):
        weight_map = read_json(found).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GptforgeError(f"{found} has no 'weight_map'")
        files = [src / name for name in dict.fromkeys(weight_map.values())]
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        if not path.is_file():
            raise GptforgeError(f"missing weights file {path} (listed in {found})")
        for name, tensor in _read_weight_file(path).items():
            name = name.removeprefix("transformer.")
            if not MASK_BUFFER.fullmatch(name):
                tensors[name], origin[name] = tensor.to(torch.float32), path
    return tensors, origin


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (SafetensorError, OSError) as exc:
            raise GptforgeError(f"corrupt weights file {path}: {exc}") from None
    state = load_torch_file(path)  # weights_only=True: tensors and plain containers, never pickled code
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GptforgeError(f"{path} is not a state dict of tensors")
    return state


def from_gpt2_state(tensors: dict[str, torch.Tensor], origin: dict[str, Path], cfg: ModelConfig, *,
                    tied: bool) -> dict[str, torch.Tensor]:
    """GPT-2 tensors (prefix removed) -> gptforge state for `cfg` (without the tied head).

    Raises:
        GptforgeError: a missing tensor, a shape that does not fit `cfg`, an untied output head, or tensors
            that are not part of GPT-2 (each naming its file).
    """
    expected = model_shapes(cfg)
    where = next(iter(origin.values())).parent
    state = {}
    for name, shape in expected.items():
        gpt2, transposed = gpt2_name(name)
        gpt2 = gpt2.removeprefix("transformer.")
        if gpt2 not in tensors:
            raise GptforgeError(f"weights in {where} lack {gpt2!r}, which config.json's {cfg.n_layer} layers need")
        stored = tensors.pop(gpt2)
        want = shape[::-1] if transposed else shape
        if tuple(stored.shape) != want:
            raise GptforgeError(f"{origin[gpt2]}: {gpt2} has shape {tuple(stored.shape)} but config.json implies "
                                f"{want}")
        state[name] = (stored.t() if transposed else stored).contiguous()
    head = tensors.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state["wte.weight"]):
        raise GptforgeError(f"{origin['lm_head.weight']}: lm_head.weight differs from wte.weight; gptforge ties the "
                            f"output head to the token embedding")
    if head is None and not tied:
        raise GptforgeError(f"{where}: tie_word_embeddings is false but no lm_head.weight is stored")
    if tensors:
        extra = sorted(tensors)
        raise GptforgeError(f"{origin[extra[0]]}: unexpected tensors {extra[:3]}{'...' if len(extra) > 3 else ''} "
                            f"(not part of a {cfg.n_layer}-layer GPT-2 as config.json describes it)")
    return state


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor a gptforge checkpoint of `cfg` stores (tied head excluded, no layer sharing).

    Computed rather than read off a model, so importing a large checkpoint builds nothing; a unit test keeps
    it equal to `GPT(cfg).state_dict()`.
    """
    D, V, C = cfg.d_model, cfg.vocab_size, cfg.context_length
    block = {"ln_1.weight": (D,), "ln_1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
             "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ln_2.weight": (D,), "ln_2.bias": (D,),
             "mlp.fc.weight": (4 * D, D), "mlp.fc.bias": (4 * D,), "mlp.proj.weight": (D, 4 * D),
             "mlp.proj.bias": (D,)}
    shapes = {"wte.weight": (V, D), "wpe.weight": (C, D)}
    for i in range(cfg.n_layer):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    return {**shapes, "ln_f.weight": (D,), "ln_f.bias": (D,)}


def import_hf(src_dir: str | Path, run_dir: str | Path) -> ImportReport:
    """Turn a local GPT-2-family checkpoint directory into a gptforge run directory (checkpoint at step 0).

    `src_dir` holds config.json, weights (model.safetensors, a sharded model.safetensors.index.json, or
    pytorch_model.bin loaded with weights_only=True) and a tokenizer (tokenizer.json, or vocab.json +
    merges.txt). Nothing is downloaded. The run directory works with every command that takes one
    (`generate`, `pretrain --init_from`, ...).

    Raises:
        GptforgeError: a missing or corrupt file, a setting or tensor gptforge cannot represent, a tokenizer that
            does not fit the model, or a `run_dir` that exists and is not empty (each naming the file).
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise GptforgeError(f"GPT-2 checkpoint directory not found: {src}")
    hf = read_json(src / "config.json")
    model_cfg, notes = model_config_from_gpt2(hf, source=src / "config.json")
    tokenizer, tokenizer_source = import_tokenizer(src)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise GptforgeError(f"{tokenizer_source} has {tokenizer.vocab_size} tokens but {src / 'config.json'} has "
                            f"vocab_size {model_cfg.vocab_size}")
    eos = hf.get("eos_token_id")
    if isinstance(eos, int) and eos != tokenizer.eot_id:
        raise GptforgeError(f"{src / 'config.json'} has eos_token_id {eos} but <|endoftext|> is id "
                            f"{tokenizer.eot_id} in {tokenizer_source}")
    tensors, origin = read_gpt2_weights(src)
    state = from_gpt2_state(tensors, origin, model_cfg, tied=hf.get("tie_word_embeddings", True))
    cfg = config_from_dict(Config(model=model_cfg).to_dict())

    out = _fresh_output(run_dir)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ckpt = save_checkpoint(tmp, step=0, cfg=cfg, tokenizer=tokenizer, model_state=state, state={
            "tokens_seen": 0, "val_loss": None, "imported_from": str(src.resolve())})
        save_config(cfg, tmp / "config.yaml")
        tokenizer.save(tmp)
        _install(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportReport(run_dir=out, checkpoint=out / "checkpoints" / ckpt.name, model=model_cfg,
                        num_parameters=sum(t.numel() for t in state.values()), notes=notes)


def describe(report: ImportReport) -> str:
    """One line for the CLI: what was imported where."""
    m = report.model
    return (f"imported {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, context {m.context_length}, "
            f"vocab {m.vocab_size} ({report.num_parameters / 1e6:.1f}M parameters) into {report.run_dir}")
