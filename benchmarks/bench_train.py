"""Training throughput: gptforge vs Hugging Face transformers' GPT2LMHeadModel of identical shape.

Both models do the same AdamW training steps (same batch, same loss: mean next-token cross-entropy) on the
same random token windows. Prints a table of tokens/s and MFU (against this machine's measured matmul peak).

    python benchmarks/bench_train.py [--steps 40] [--compile]

The time a user waits for a whole training command (start-up, validation, checkpoint included), side by side with
nanoGPT, is `benchmarks/bench_train_wall.py` (`python benchmarks/bench_train.py --wall ...` runs it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gptforge.config import ModelConfig, OptimConfig
from gptforge.data.batches import Batch
from gptforge.model.gpt import GPT, flops_per_token
from gptforge.train.optim import build_optimizer
from gptforge.train.step import train_step
from gptforge.utils.metrics import measure_peak_flops

SHAPES = {  # name: (model config, micro_batch_size in sequences)
    "shakespeare-char": (ModelConfig(n_layer=4, n_head=4, d_model=128, context_length=64, vocab_size=66), 12),
    "6L-384d-256ctx": (ModelConfig(n_layer=6, n_head=6, d_model=384, context_length=256, vocab_size=66), 8),
}


class HFWrapper(torch.nn.Module):
    """GPT2LMHeadModel behind gptforge's `model(tokens) -> logits` call (dropout 0 as in gptforge's config,
    unless `hf_default_dropout`: GPT2Config's shipped 0.1, as a user who sets only the shape would get)."""

    def __init__(self, cfg: ModelConfig, hf_default_dropout: bool = False) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        p = 0.1 if hf_default_dropout else 0.0
        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.d_model,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
                            bos_token_id=0, eos_token_id=0)
        self.inner = GPT2LMHeadModel(hf_cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids=tokens, use_cache=False).logits


class Trainer:
    """One model, its AdamW (gptforge's settings for both) and a fixed pool of random batches."""

    def __init__(self, model: torch.nn.Module, cfg: ModelConfig, batch_size: int) -> None:
        self.model, self.tokens_per_step = model, batch_size * cfg.context_length
        self.opt = build_optimizer(model, OptimConfig(lr=1e-4), "cpu")
        g = torch.Generator().manual_seed(0)
        self.data = [torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), generator=g)
                     for _ in range(8)]
        self.step(3)  # warm-up

    def step(self, n: int) -> float:
        """Run n optimizer steps; return tokens per second."""
        start = time.perf_counter()
        for i in range(n):
            batch = self.data[i % len(self.data)]
            train_step(self.model, self.opt, [Batch(batch[:, :-1], batch[:, 1:])], grad_clip=1.0)
        return n * self.tokens_per_step / (time.perf_counter() - start)


def main() -> None:
    if "--wall" in sys.argv:
        sys.argv.remove("--wall")
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_train_wall import main as wall

        return wall()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round (shakespeare-char)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, interleaved across models; best is kept")
    parser.add_argument("--compile", action="store_true", help="also time gptforge under torch.compile")
    args = parser.parse_args()
    peak = measure_peak_flops(torch.device("cpu"), torch.float32, seconds=1.0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured fp32 matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s; AdamW (fused), grad clip 1.0, fp32, dropout 0 unless noted\n")
    rows = []
    for name, (cfg, bs) in SHAPES.items():
        steps = args.steps if cfg.d_model <= 128 else max(4, args.steps // 6)
        makers = {"gptforge": lambda c=cfg: GPT(c), "transformers": lambda c=cfg: HFWrapper(c),
                  "transformers (dropout 0.1)": lambda c=cfg: HFWrapper(c, hf_default_dropout=True)}
        if args.compile:
            makers["gptforge + compile"] = lambda c=cfg: torch.compile(GPT(c))
        trainers = {}
        for label, make in makers.items():
            torch.manual_seed(0)
            trainers[label] = Trainer(make(), cfg, bs)
        best = dict.fromkeys(trainers, 0.0)
        for _ in range(args.rounds):  # interleaved, so machine noise hits every model alike
            for label, trainer in trainers.items():
                best[label] = max(best[label], trainer.step(steps))
        fpt = flops_per_token(cfg)
        for label, tps in best.items():
            rows.append((name, label, tps, fpt * tps / peak, tps / best["transformers"]))
    print(f"{'config':<18} {'implementation':<28} {'tokens/s':>10} {'MFU':>7} {'vs HF':>7}")
    for name, label, tps, m, ratio in rows:
        print(f"{name:<18} {label:<28} {tps:>10,.0f} {m:>7.1%} {ratio:>6.2f}x")


if __name__ == "__main__":
    main()
