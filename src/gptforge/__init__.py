"""gptforge: pretrain, generate from and serve GPT-3-architecture language models.

The public Python API is small:

    import gptforge
    lm = gptforge.load("runs/demo")       # a run directory or one checkpoint directory
    lm.model(tokens)                       # (B, T) int64 -> logits (B, T, vocab_size)
    lm.tokenizer.encode("text")
    lm.generate("def main(", max_new_tokens=50)
    gptforge.evaluate("runs/demo", tasks="hellaswag,piqa", shots="0,1", data_dir="data/eval")
    gptforge.finetune(cfg, "train.tsv", "runs/sst2", init="runs/demo")  # cfg.finetune.task = "classify"
"""

from gptforge.errors import GptforgeError

__version__ = "0.1.0"
__all__ = ["GptforgeError", "evaluate", "finetune", "load", "pretrain", "__version__"]


def load(path, *, device: str = "cpu"):
    """Load a trained model; see `gptforge.api.load` (imported lazily to keep `import gptforge` light)."""
    from gptforge.api import load as _load

    return _load(path, device=device)


def evaluate(model_or_run_dir, tasks, shots=0, **kwargs):
    """Zero/few-shot evaluation; see `gptforge.eval.harness.evaluate` (imported lazily)."""
    from gptforge.eval.harness import evaluate as _evaluate

    return _evaluate(model_or_run_dir, tasks, shots, **kwargs)


def pretrain(cfg, data_dir, run_dir, **kwargs):
    """Pretrain on prepared data; see `gptforge.train.pretrain.pretrain` (imported lazily)."""
    from gptforge.train.pretrain import pretrain as _pretrain

    return _pretrain(cfg, data_dir, run_dir, **kwargs)


def __getattr__(name: str):
    """`gptforge.finetune` is the `gptforge.finetune` package, imported on first use; the package is callable:
    `gptforge.finetune(cfg, data, run_dir, init=...)` runs `gptforge.finetune.tasks.finetune`."""
    if name == "finetune":
        import importlib

        return importlib.import_module("gptforge.finetune")
    raise AttributeError(f"module 'gptforge' has no attribute {name!r}")
