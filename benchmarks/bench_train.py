"""Training throughput: gptforge vs Hugging Face transformers' GPT2LMHeadModel of identical shape.

Both models do the same AdamW training steps (same batch, same loss: mean next-token cross-entropy) on the
same random token windows. Prints a table of tokens/s and MFU (against this machine's measured matmul peak).

    python benchmarks/bench_train.py [--steps 40] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch

from gptforge.config import ModelConfig, OptimConfig
from gptforge.model.gpt import GPT, flops_per_token
from gptforge.train.loop import train_step
from gptforge.train.optim import build_optimizer
from gptforge.utils.metrics import measure_peak_flops

SHAPES = {  # name: (model config, micro_batch_size in sequences)
    "shakespeare-char": (ModelConfig(n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=66), 12),
    "6L-384d-256ctx": (ModelConfig(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=66), 8),
}


class HFWrapper(torch.nn.Module):
    """GPT2LMHeadModel behind gptforge's `model(tokens) -> logits` call."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        self.inner = GPT2LMHeadModel(hf_cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=tokens, use_cache=False).logits


def time_training(model: torch.nn.Module, cfg: ModelConfig, batch_size: int, steps: int, warmup: int = 5) -> float:
    """Tokens per second over `steps` optimizer steps (after `warmup` untimed ones)."""
    opt = build_optimizer(model, OptimConfig(lr=1e-4), "cpu")
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), generator=g) for _ in range(8)]
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        batch = data[i % len(data)]
        train_step(model, opt, [(batch[:, :-1], batch[:, 1:])], grad_clip=1.0)
    return steps * batch_size * cfg.context_length / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2, help="best of this many timed rounds per model")
    parser.add_argument("--compile", action="store_true", help="also time gptforge under torch.compile")
    args = parser.parse_args()
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=1.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s\n")
    rows = []
    for name, (cfg, bs) in SHAPES.items():
        steps = args.steps if cfg.d_model <= 128 else max(5, args.steps // 4)
        makers = {"gptforge": lambda c=cfg: GPT(c), "transformers": lambda c=cfg: HFWrapper(c)}
        if args.compile:
            makers["gptforge+compile"] = lambda c=cfg: torch.compile(GPT(c))
        results = {}
        for label, make in makers.items():
            torch.manual_seed(0)
            model = make()
            results[label] = max(time_training(model, cfg, bs, steps) for _ in range(args.rounds))
        fpt = flops_per_token(cfg)
        for label, tps in results.items():
            rows.append((name, label, tps, fpt * tps / peak, tps / results["transformers"]))
    print(f"{'config':<18} {'implementation':<18} {'tokens/s':>10} {'MFU':>7} {'vs HF':>7}")
    for name, label, tps, m, ratio in rows:
        print(f"{name:<18} {label:<18} {tps:>10,.0f} {m:>7.1%} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
