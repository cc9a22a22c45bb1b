"""Training hooks for LoRA runs: freeze the base before weights load, save the adapters with every checkpoint.

Any task (pretraining, SFT, classification) whose model config has `lora_r > 0` puts `lora_hooks(...)` into its
`Task.setup_model` / `Task.save_extra`. Freezing happens on the meta device, before sharding, so DDP and FSDP2 see
frozen parameters as `requires_grad=False` from the start: they get no gradients, no gradient communication and
no optimizer state (`train/optim.py` builds groups from trainable parameters only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from gptforge.model.lora import (
    adapter_info,
    adapter_state,
    base_checksum,
    describe_trainable,
    freeze_base,
    write_adapter,
)
from gptforge.utils.logging import print0


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def lora_hooks(trainable: tuple[str, ...] = ()) -> tuple[Callable[[nn.Module], None], Callable[[Path], None]]:
    """(setup_model, save_extra) for a Task whose model has LoRA adapters.

    setup_model freezes everything but the adapters and the `trainable` name prefixes (`freeze_base`) and prints
    "LoRA: N trainable of M parameters (x%)". save_extra writes adapter.safetensors + adapter.json into each
    checkpoint (read from the checkpoint's model.safetensors when the model is sharded; with sharded checkpoints of
    an FSDP model it writes nothing, and `gptforge merge` / `export` work from the full checkpoint instead). The
    base checksum is computed at the first save and reused: the base is frozen.
    """
    held: dict = {}

    def setup_model(model: nn.Module) -> None:
        held["model"] = model
        print0(describe_trainable(*freeze_base(model, trainable)))

    def save_extra(directory: Path) -> None:
        model = held["model"]
        weights = Path(directory) / "model.safetensors"
        if not _is_sharded(model):
            tensors = adapter_state(model, trainable)
            named = lambda: ((n, p) for n, p in model.named_parameters())  # noqa: E731
        elif weights.is_file():
            from safetensors.torch import load_file

            state = load_file(str(weights))
            tensors = adapter_state_from(state, trainable)
            named = lambda: state.items()  # noqa: E731
        else:
            if not held.get("warned"):
                print0("note: sharded checkpoints of an FSDP model hold no separate adapter files; "
                       "gptforge merge/export read the adapters from the checkpoint")
                held["warned"] = True
            return
        if "checksum" not in held:
            held["checksum"] = base_checksum(named(), trainable)
        write_adapter(Path(directory), tensors, adapter_info(model.cfg, held["checksum"], trainable))

    return setup_model, save_extra


def adapter_state_from(state: dict, trainable: tuple[str, ...] = ()) -> dict:
    """The adapter (and `trainable`) tensors of a full state dict, float32 on CPU."""
    from gptforge.model.lora import is_adapter_param

    return {k: v.float().contiguous() for k, v in state.items()
            if is_adapter_param(k) or (trainable and k.startswith(trainable))}
