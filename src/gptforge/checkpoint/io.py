"""Checkpoint directories: write atomically, find the latest, load without executing pickled code.

Two formats. A consolidated checkpoint (written by one process; the default without FSDP) holds full tensors;
a sharded one (`checkpoint/sharded.py`; the default under FSDP) holds every rank's shards, written in parallel.
Every reader here (`find_checkpoint`, `load_checkpoint`, `load_model_weights`) takes either.

Layout of a consolidated RUN_DIR/checkpoints/step_NNNNNNNN/:
    model.safetensors   weights (the tied output head is stored once, as wte.weight)
    config.json         the resolved Config (all sections)
    tokenizer.json | char_tokenizer.json
    optimizer.pt        AdamW state keyed by parameter name (loadable at any world size; weights_only=True)
    trainer.pt          data-sampler and RNG states of every rank (Python, NumPy, torch CPU/CUDA; weights_only)
    state.json          schema_version, format, step, tokens_seen, val_loss, and the sha256 of every other file
RUN_DIR/latest names the newest complete checkpoint, RUN_DIR/best the one with the lowest val loss. A checkpoint
is written to a hidden temporary directory and renamed into place, so a crash never leaves a partial
checkpoint under a final name; the sha256 manifest catches a file truncated or damaged later. Nothing here
unpickles arbitrary objects: weights go through safetensors, the rest through JSON or
`torch.load(weights_only=True)`, which refuses pickled code.

Schema versions (state.json "schema_version"; migration is explicit, one rule per version):
    1  consolidated layout above, no "format" field. Read as format "consolidated"; nothing else changes.
    2  adds "format" ("consolidated" | "sharded"); sharded checkpoints add "world_size" and list nested files
       (model/__0_0.distcp, trainer/rank_00000.pt, ...) in the manifest by relative path.
A gptforge that reads schema N reads every older schema; a newer schema is refused with a one-line error.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from gptforge.config import Config, config_from_dict
from gptforge.errors import GptforgeError
from gptforge.utils.device import meta_device
from gptforge.utils.io import atomic_replace_dir, atomic_write_json, atomic_write_text, sha256_file
from gptforge.utils.logging import print0

SCHEMA_VERSION = 2
TIED_KEYS = ("lm_head.weight",)


def save_checkpoint(run_dir: Path, *, step: int, cfg: Config, tokenizer, model: torch.nn.Module | None = None,
                    model_state: dict[str, torch.Tensor] | None = None,
                    optimizer: torch.optim.Optimizer | None = None, optimizer_state: dict | None = None,
                    trainer_state: dict | None = None, state: dict[str, Any] | None = None, keep: int = 3,
                    extra: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint `step` under RUN_DIR/checkpoints, point RUN_DIR/latest at it, and keep the newest
    `keep` plus the best by validation loss. Call on the main process only.

    Args:
        model / model_state: the model, or its full (unsharded) CPU tensors by name from `full_model_state`.
        optimizer / optimizer_state: the optimizer, or its state keyed by parameter name from
            `full_optimizer_state` (under FSDP, gather both on every rank first and pass the states).
        trainer_state: sampler and RNG states (tensors, numbers, lists, dicts only).
        state: JSON-serialisable run counters (tokens_seen, val_loss, ...).
        extra: writes further files into the (temporary) checkpoint directory; they join the sha256 manifest.

    Raises:
        GptforgeError: a weight is NaN or infinite (a checkpoint never holds a non-finite value).
    """
    if model_state is None:
        model_state = full_model_state(model)
    if optimizer is not None and optimizer_state is None:
        optimizer_state = full_optimizer_state(model, optimizer)
    for name, tensor in model_state.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise GptforgeError(f"refusing to write checkpoint step {step}: parameter {name} is not finite")
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {k: v for k, v in model_state.items() if k not in TIED_KEYS}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    atomic_write_json(tmp / "config.json", cfg.to_dict())
    tokenizer.save(tmp)
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / "optimizer.pt")
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer.pt")
    if extra is not None:
        extra(tmp)
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
    atomic_write_json(tmp / "state.json", {"schema_version": SCHEMA_VERSION, "format": "consolidated", "step": step,
                                           **(state or {}), "files": files})
    atomic_replace_dir(tmp, final)
    atomic_write_text(Path(run_dir) / "latest", final.name + "\n")
    prune_checkpoints(Path(run_dir), keep)
    return final


def _val_loss(ckpt: Path) -> float:
    try:
        value = json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("val_loss")
    except (OSError, ValueError):
        return float("inf")
    return value if isinstance(value, (int, float)) and value == value else float("inf")


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints and the best one by val loss (RUN_DIR/best names it)."""
    found = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir())
    if not found:
        return
    best = min(found, key=_val_loss)
    if _val_loss(best) < float("inf"):
        atomic_write_text(run_dir / "best", best.name + "\n")
    for old in found[:-keep]:
        if old != best:
            shutil.rmtree(old)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "_orig_mod", model)  # torch.compile


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors by parameter name from a plain, compiled, DDP or FSDP2 model (a collective under
    FSDP: call it on every rank)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {k: v.detach().contiguous() for k, v in get_model_state_dict(_unwrap(model), options=options).items()}


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded, on CPU (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(_unwrap(model), optimizer, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a name-keyed full optimizer state into `optimizer` (each FSDP rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(_unwrap(model), optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


# What inference needs: weights (either format; a name ending in "/" covers a directory), config and tokenizer.
INFERENCE_FILES = ("model.safetensors", "model/", "config.json", "tokenizer.json", "char_tokenizer.json")


def _selected(name: str, only: tuple[str, ...] | None) -> bool:
    return only is None or any(name == o or (o.endswith("/") and name.startswith(o)) for o in only)


def verify_checkpoint(ckpt: Path, only: tuple[str, ...] | None = None, *, part: tuple[int, int] = (0, 1)
                      ) -> dict[str, Any]:
    """Check a checkpoint's manifest: every file (or those selected by `only`: names, or directory prefixes
    ending in "/") present with the recorded sha256. With `part=(i, n)` only every n-th of those files from
    the i-th on (ranks verify a large checkpoint in parallel). Returns state.json.

    Raises:
        GptforgeError: naming the missing, truncated or corrupt file.
    """
    state = read_json(ckpt / "state.json")
    if state.get("schema_version", 0) > SCHEMA_VERSION:
        raise GptforgeError(f"{ckpt} has checkpoint schema {state['schema_version']}; this gptforge reads up to "
                            f"{SCHEMA_VERSION} (upgrade gptforge)")
    names = [name for name in sorted(state.get("files", {})) if _selected(name, only)]
    for name in names[part[0]::part[1]]:
        path = ckpt / name
        if not path.is_file():
            raise GptforgeError(f"checkpoint file missing: {path}")
        if sha256_file(path) != state["files"][name]:
            raise GptforgeError(f"checkpoint file is corrupt or truncated (sha256 mismatch): {path}")
    return state


def checkpoint_format(ckpt: Path) -> str:
    """"sharded" or "consolidated" (schema 1 checkpoints, which predate the field, are consolidated)."""
    if (ckpt / "state.json").is_file():
        return read_json(ckpt / "state.json").get("format", "consolidated")
    return "sharded" if (ckpt / "model" / ".metadata").is_file() else "consolidated"


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` holds a checkpoint's weights, in either format."""
    return (path / "model.safetensors").is_file() or (path / "model" / ".metadata").is_file()


def _verify_everywhere(ckpt: Path, only: tuple[str, ...] | None, info) -> str | None:
    """Verify `ckpt`, the files shared out over the ranks of `info` (a collective); the first error, or None,
    the same on every rank."""
    from gptforge.distributed.env import all_gather_object

    try:
        verify_checkpoint(ckpt, only, part=(info.rank, info.world_size) if info is not None else (0, 1))
        error = None
    except GptforgeError as exc:
        error = str(exc)
    errors = [e for e in (all_gather_object(error, info) if info is not None else [error]) if e]
    return errors[0] if errors else None


def find_resume_checkpoint(path: str | Path, only: tuple[str, ...] | None = None, info=None) -> Path:
    """The checkpoint to resume from: `path` itself if it is a checkpoint (verified; an error if damaged), else
    the newest checkpoint of the run directory that verifies, falling back past damaged ones with a one-line
    warning. With `info` (a `DistInfo`; call on every rank) the ranks share the hashing and agree on the answer.

    Raises:
        GptforgeError: no checkpoint, or no intact one.
    """
    path = Path(path)
    if (path / "state.json").is_file() or is_checkpoint_dir(path):
        error = _verify_everywhere(path, only, info)
        if error:
            raise GptforgeError(error)
        return path
    found = sorted((p for p in (path / "checkpoints").glob("step_*") if p.is_dir()), reverse=True)
    if not found:
        raise GptforgeError(f"no checkpoint in {path} (expected {path}/checkpoints/step_*; is it a run directory?)")
    latest = path / "checkpoints" / (path / "latest").read_text(encoding="utf-8").strip() \
        if (path / "latest").is_file() else None
    if latest in found:  # the run's own pointer first: after a resume from an older step it is not the newest
        found.remove(latest)
        found.insert(0, latest)
    elif latest is not None:
        print0(f"warning: {path}/latest names {latest.name}, which does not exist; using {found[0].name}")
    for ckpt in found:
        error = _verify_everywhere(ckpt, only, info)
        if error is None:
            return ckpt
        print0(f"warning: skipping damaged checkpoint: {error}")
    raise GptforgeError(f"every checkpoint in {path}/checkpoints is damaged")


def abandon_later_checkpoints(run_dir: Path, step: int) -> list[Path]:
    """Move checkpoints newer than `step` (an abandoned future, after resuming from an older one) into
    RUN_DIR/checkpoints/abandoned/, so they are neither lost nor mistaken for this run's. Returns the moved paths."""
    root = Path(run_dir) / "checkpoints"
    later = [p for p in root.glob("step_*") if p.is_dir() and int(p.name.split("_")[1]) > step]
    moved = []
    for ckpt in sorted(later):
        target = root / "abandoned" / ckpt.name
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(exist_ok=True)
        ckpt.rename(target)
        moved.append(target)
    return moved


def load_torch_file(path: Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never pickled code.

    Raises:
        GptforgeError: the file is missing, corrupt, or holds anything but plain data (e.g. a malicious pickle).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise GptforgeError(f"missing file: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GptforgeError(f"refusing to load {path}: not a plain tensor file ({reason[:160]})") from None


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run directory (its `latest` checkpoint) or a checkpoint directory (either format) to a
    checkpoint directory.

    Raises:
        GptforgeError: the path does not exist or holds no checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise GptforgeError(f"run or checkpoint directory not found: {path}")
    if is_checkpoint_dir(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        candidate = path / "checkpoints" / latest.read_text(encoding="utf-8").strip()
        if is_checkpoint_dir(candidate):
            return candidate
    found = sorted(p for p in (path / "checkpoints").glob("step_*") if is_checkpoint_dir(p))
    if not found:
        raise GptforgeError(f"no checkpoint in {path} (expected {path}/checkpoints/step_*/model.safetensors)")
    return found[-1]


LABELS_FILE = "labels.json"  # a classification run's class names, in the run directory and every checkpoint


def load_labels(ckpt: Path) -> list[str]:
    """The class names (index = class id) of a classification checkpoint: its labels.json, else its run's.

    Raises:
        GptforgeError: neither file exists (not a classification run), or it is corrupt.
    """
    for candidate in (ckpt / LABELS_FILE, ckpt.parent.parent / LABELS_FILE):
        if candidate.is_file():
            labels = read_json(candidate).get("labels")
            if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
                raise GptforgeError(f"corrupt {candidate}: 'labels' must be a list of strings")
            return labels
    raise GptforgeError(f"{ckpt} has no {LABELS_FILE}: not a classification run (fine-tune with --task classify)")


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, naming it in the error if it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"missing file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptforgeError(f"corrupt JSON in {path}: {exc}") from None


def load_weights(model: torch.nn.Module, path: Path, *, missing_ok: tuple[str, ...] = ()) -> None:
    """Load model.safetensors into `model`, plain or sharded (FSDP2 DTensors): each rank reads only the rows of
    each tensor that its shard holds, so no rank ever holds the whole file. Strict apart from the tied head and
    parameters whose names start with one of `missing_ok`, which keep their current values.

    Raises:
        GptforgeError: the file is truncated/corrupt or does not match the model's names or shapes.
    """
    from safetensors import safe_open

    from gptforge.distributed.materialize import assign_rows, clean_named_parameters

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            saved = set(f.keys())
            params = dict(clean_named_parameters(model))
            missing = [k for k in params if k not in saved and not k.startswith(missing_ok)]
            unexpected = [k for k in saved if k not in params and k not in TIED_KEYS]
            if missing or unexpected:
                raise GptforgeError(f"weights in {path} do not fit the model: missing {missing[:3]}, "
                                    f"unexpected {unexpected[:3]}")
            for name, p in params.items():
                if name not in saved:
                    continue
                piece = f.get_slice(name)
                if tuple(piece.get_shape()) != tuple(p.shape):
                    raise GptforgeError(f"weights in {path} do not fit the model: {name} has shape "
                                        f"{tuple(piece.get_shape())}, the model {tuple(p.shape)}")
                assign_rows(p, (lambda a, b, t=piece: t[a:b]) if p.dim() else (lambda a, b, n=name: f.get_tensor(n)))
    except (SafetensorError, OSError) as exc:
        raise GptforgeError(f"corrupt weights file {path}: {exc}") from None


def load_model_weights(model: torch.nn.Module, ckpt: Path, *, missing_ok: tuple[str, ...] = (),
                       no_dist: bool = False) -> None:
    """Load the weights of checkpoint directory `ckpt` (either format) into `model` (plain or sharded; under a
    process group, a sharded checkpoint is a collective unless `no_dist`).

    Raises:
        GptforgeError: the weights are damaged or do not fit the model.
    """
    if checkpoint_format(ckpt) == "sharded":
        from gptforge.checkpoint.sharded import load_model

        load_model(model, ckpt, missing_ok=missing_ok, no_dist=no_dist)
    else:
        load_weights(model, ckpt / "model.safetensors", missing_ok=missing_ok)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Load a checkpoint (either format; a sharded one is consolidated on the fly) for inference or fine-tuning.

    Returns:
        (model, cfg, tokenizer, state): a GPT in eval mode on `device` (float32), the Config, the tokenizer,
        and the state.json dict.

    Raises:
        GptforgeError: no checkpoint, or every checkpoint's weights, config or tokenizer damaged.
    """
    from gptforge.model.gpt import GPT
    from gptforge.tokenizer import load_tokenizer

    if not Path(path).exists():
        raise GptforgeError(f"run or checkpoint directory not found: {path}")
    ckpt = find_resume_checkpoint(path, only=INFERENCE_FILES)  # the newest checkpoint whose weights are intact
    cfg: Config = config_from_dict(read_json(ckpt / "config.json"))
    state = read_json(ckpt / "state.json")
    tokenizer = load_tokenizer(ckpt)
    with meta_device():
        model = GPT(cfg.model)
    model.to_empty(device=device)
    model.tie_weights()
    load_model_weights(model, ckpt, no_dist=True)
    return model.float().eval(), cfg, tokenizer, state
