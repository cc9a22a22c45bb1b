"""LoRA runs on disk: fold the adapters into a new run directory (`merge_run`), and write them in PEFT's format
next to a Hugging Face GPT-2 export (`write_peft_adapter`).

PEFT layout (peft >= 0.17; `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(DIR), DIR/adapter)`):
    adapter_config.json        peft_type LORA, r, lora_alpha, lora_dropout, target_modules (a regex over module
                               paths, so "c_proj" of the attention and of the MLP are told apart), fan_in_fan_out
                               true (GPT-2 stores its linear layers as Conv1D, (in, out); PEFT issue #568)
    adapter_model.safetensors  base_model.model.transformer.h.N.attn.c_attn.lora_A.weight (r, in) and
                               ...lora_B.weight (out, r): gptforge's A and B unchanged, since PEFT's LoRA layers are
                               nn.Linear even around a Conv1D; an adapted token embedding as
                               base_model.model.transformer.wte.lora_embedding_A (r, V) and ...lora_embedding_B
                               (D, r), gptforge's A and B of `LoRAEmbedding` unchanged
An adapted lm_head is not exported (the head is tied to the token embedding; see `merged_state`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptforge.checkpoint.io import (
    LABELS_FILE,
    find_resume_checkpoint,
    load_checkpoint,
    load_labels,
    save_checkpoint,
)
from gptforge.config import save_config
from gptforge.errors import GptforgeError
from gptforge.model.lora import LoRAEmbedding, LoRALinear, merge_lora, plain_config
from gptforge.utils.io import atomic_write_json

# gptforge module inside a block -> GPT-2 module inside transformer.h.N
HF_MODULES = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}


def _fresh(path: str | Path) -> Path:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GptforgeError(f"output directory {out} already exists and is not empty; choose a new --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def merge_run(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Fold the LoRA adapters of `run_dir`'s latest intact checkpoint (or of a checkpoint directory) into the
    weights and write a new run directory `out_dir` (config with lora_r = 0, tokenizer, one checkpoint at the same
    step), which every command loads as a plain model. Written to a temporary sibling and renamed into place.

    Returns:
        (out_dir, the source checkpoint).

    Raises:
        GptforgeError: no checkpoint, a model without adapters, an adapted lm_head, or an `out_dir` that exists
        and is not empty (nothing is written then).
    """
    out = _fresh(out_dir)
    src = find_resume_checkpoint(run_dir)
    model, cfg, tokenizer, state = load_checkpoint(src)
    labels = load_labels(src) if cfg.model.n_labels else None  # a classifier keeps its class names

    def write_labels(directory: Path) -> None:
        if labels is not None:
            atomic_write_json(directory / LABELS_FILE, {"labels": labels})

    merged = merge_lora(model)
    cfg.model = plain_config(cfg.model)
    cfg.train.init_from = ""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_checkpoint(tmp, step=int(state.get("step", 0)), cfg=cfg, tokenizer=tokenizer, model=merged,
                        state={"tokens_seen": state.get("tokens_seen", 0), "val_loss": state.get("val_loss"),
                               "merged_from": str(src.resolve())}, extra=write_labels)
        save_config(cfg, tmp / "config.yaml")
        write_labels(tmp)
        tokenizer.save(tmp)
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, src


def peft_target_regex(model: torch.nn.Module) -> str:
    """PEFT `target_modules` for `model`'s adapted layers: a regex that PEFT full-matches against module paths of
    a GPT2LMHeadModel, e.g. r"transformer\\.h\\.\\d+\\.(attn\\.c_attn|mlp\\.c_proj)", with "|transformer\\.wte"
    when the token embedding is adapted."""
    kinds = sorted({name.split(".", 2)[2] for name, m in model.named_modules() if isinstance(m, LoRALinear)},
                   key=list(HF_MODULES).index)
    parts = [r"transformer\.h\.\d+\.(" + "|".join(re.escape(HF_MODULES[k]) for k in kinds) + ")"] if kinds else []
    if isinstance(model.wte, LoRAEmbedding):
        parts.append(r"transformer\.wte")
    return "|".join(parts)


def write_peft_adapter(model: torch.nn.Module, out_dir: Path, *, base_model: str) -> Path:
    """Write `model`'s adapters (a plain GPT with lora_r > 0) as a PEFT LoRA adapter directory `out_dir`
    (adapter_config.json + adapter_model.safetensors; see the module docstring).

    Raises:
        GptforgeError: the head is adapted (no PEFT equivalent here: it is tied to the token embedding).
    """
    cfg = model.cfg
    if "lm_head" in cfg.lora_target_names():
        raise GptforgeError("cannot export a LoRA adapter on lm_head in PEFT format: the head is tied to the token "
                            "embedding (train without lm_head in lora_targets)")
    tensors = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            _, index, local = name.split(".", 2)  # blocks.N.attn.qkv
            prefix = f"base_model.model.transformer.h.{index}.{HF_MODULES[local]}"
            tensors[f"{prefix}.lora_A.weight"] = m.lora_A.detach().float().cpu().contiguous()  # (r, in)
            tensors[f"{prefix}.lora_B.weight"] = m.lora_B.detach().float().cpu().contiguous()  # (out, r)
        elif isinstance(m, LoRAEmbedding):
            prefix = "base_model.model.transformer.wte"
            tensors[f"{prefix}.lora_embedding_A"] = m.lora_A.detach().float().cpu().contiguous()  # (r, V)
            tensors[f"{prefix}.lora_embedding_B"] = m.lora_B.detach().float().cpu().contiguous()  # (D, r)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(out_dir / "adapter_config.json", {
        # a classifier's trained `score` head is in the exported base model itself; PEFT's SEQ_CLS task type would
        # look for it among the adapter's modules_to_save, so no task type is given (PeftModel wraps any model)
        "peft_type": "LORA", "task_type": None if cfg.n_labels else "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
        "target_modules": peft_target_regex(model), "fan_in_fan_out": True, "bias": "none",
        "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "inference_mode": True,
    })
    return out_dir
