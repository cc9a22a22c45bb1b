"""Checkpoint directories: write atomically, find the latest, load without executing pickled code.

Layout of RUN_DIR/checkpoints/step_NNNNNNNN/:
    model.safetensors   weights (the tied output head is stored once, as wte.weight)
    config.json         the resolved Config (all sections)
    tokenizer.json | char_tokenizer.json
    optimizer.pt        AdamW state (tensors and plain containers only; loaded with weights_only=True)
    state.json          schema_version, step, tokens_seen, val_loss
RUN_DIR/latest names the newest complete checkpoint. A checkpoint is written to a hidden temporary
directory and renamed into place, so a crash never leaves a partial checkpoint under a final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from gptforge.config import Config, config_from_dict
from gptforge.errors import GptforgeError
from gptforge.utils.io import atomic_replace_dir, atomic_write_json, atomic_write_text

SCHEMA_VERSION = 1
TIED_KEYS = ("lm_head.weight",)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors to store: contiguous CPU copies, tied duplicates dropped, no `_orig_mod.` prefix."""
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items() if k not in TIED_KEYS}


def save_checkpoint(run_dir: Path, *, step: int, model: torch.nn.Module, cfg: Config, tokenizer,
                    optimizer: torch.optim.Optimizer | None = None, state: dict[str, Any] | None = None,
                    keep: int = 3) -> Path:
    """Write checkpoint `step` under RUN_DIR/checkpoints, point RUN_DIR/latest at it, keep the newest `keep`."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(tmp / "config.json", cfg.to_dict())
    tokenizer.save(tmp)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", {"schema_version": SCHEMA_VERSION, "step": step, **(state or {})})
    atomic_replace_dir(tmp, final)
    atomic_write_text(Path(run_dir) / "latest", final.name + "\n")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory (its `latest` checkpoint) or a checkpoint directory to a checkpoint directory.

    Raises:
        GptforgeError: the path does not exist or holds no checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise GptforgeError(f"run or checkpoint directory not found: {path}")
    if (path / "model.safetensors").is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        candidate = path / "checkpoints" / latest.read_text(encoding="utf-8").strip()
        if (candidate / "model.safetensors").is_file():
            return candidate
    found = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / "model.safetensors").is_file())
    if not found:
        raise GptforgeError(f"no checkpoint in {path} (expected {path}/checkpoints/step_*/model.safetensors)")
    return found[-1]


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, naming it in the error if it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptforgeError(f"corrupt JSON in {path}: {exc}") from None


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors into `model` (strict apart from the tied head).

    Raises:
        GptforgeError: the file is truncated/corrupt or does not match the model's shapes.
    """
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise GptforgeError(f"corrupt weights file {path}: {exc}") from None
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise GptforgeError(f"weights in {path} do not fit the model: {str(exc).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in TIED_KEYS]
    if missing or unexpected:
        raise GptforgeError(f"weights in {path} do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint for inference or fine-tuning.

    Returns:
        (model, cfg, tokenizer, state): a GPT in eval mode on `device` (float32), the Config, the tokenizer,
        and the state.json dict.
    """
    from gptforge.model.gpt import GPT
    from gptforge.tokenizer import load_tokenizer

    ckpt = find_checkpoint(path)
    cfg: Config = config_from_dict(read_json(ckpt / "config.json"))
    state = read_json(ckpt / "state.json")
    if state.get("schema_version", 0) > SCHEMA_VERSION:
        raise GptforgeError(f"{ckpt} has checkpoint schema {state['schema_version']}; this gptforge reads up to "
                            f"{SCHEMA_VERSION} (upgrade gptforge)")
    tokenizer = load_tokenizer(ckpt)
    model = GPT(cfg.model)
    load_weights(model, ckpt / "model.safetensors")
    return model.to(device).eval(), cfg, tokenizer, state
