"""Generation speed race: gptforge vs transformers on the same GPT-2 weights, greedy, on this machine.

For each shape, transformers initialises a GPT2LMHeadModel; its weights go into a gptforge GPT through
`gptforge.checkpoint.convert` (the code behind `gptforge import`). Both then decode greedily from the same
prompts (32 random token ids per row) for `--new_tokens` tokens: gptforge with `generate.engine.iter_tokens`,
transformers with `generate` and its KV cache. End-of-text never stops a row, so both produce every token. Rounds alternate between the two implementations and the best
round of each counts (the least disturbed by other processes). The outputs must be identical.

    python benchmarks/bench_generate_hf.py [--new_tokens 256] [--rounds 3] [--batch_sizes 1 8]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from gptforge.checkpoint.convert import from_gpt2_state, model_config_from_gpt2  # noqa: E402
from gptforge.generate.engine import iter_tokens  # noqa: E402
from gptforge.generate.sampling import SamplingParams  # noqa: E402
from gptforge.model.gpt import GPT  # noqa: E402

SHAPES = {  # name -> GPT2Config fields (everything else: GPT2Config's defaults, vocab 50257, context 1024)
    "gpt2-124M": dict(n_layer=12, n_embd=768, n_head=12),
    "6L-384d": dict(n_layer=6, n_embd=384, n_head=6),
}
PROMPT_TOKENS = 32


def build_pair(shape: dict, seed: int = 0):
    """A random transformers GPT-2 (dropout off, eos never stops it) and a gptforge GPT with its weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape)
    hf = GPT2LMHeadModel(config).eval()
    hf.generation_config.eos_token_id = None  # decode every token, as gptforge does with eot_id=-1
    hf.generation_config.pad_token_id = 0
    cfg, _ = model_config_from_gpt2(config.to_dict(), source=Path("config.json"))
    tensors = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    state = from_gpt2_state(tensors, dict.fromkeys(tensors, Path("memory")), cfg, tied=True)
    ours = GPT(cfg)
    ours.load_state_dict(state, strict=False)
    return hf, ours.eval()


def prompts(batch_size: int, vocab_size: int) -> torch.Tensor:
    """(batch_size, PROMPT_TOKENS) int64 random ids, the same for every run (the speed does not depend on them)."""
    return torch.randint(0, vocab_size, (batch_size, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def run_gptforge(model: GPT, x: torch.Tensor, n: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_new_tokens=n, temperature=0)
    out: list[list[int]] = [[] for _ in range(x.shape[0])]
    start = time.perf_counter()
    for events in iter_tokens(model, x.tolist(), params, eot_id=-1):
        for row, tok in events:
            out[row].append(tok)
    return time.perf_counter() - start, out


@torch.no_grad()
def run_transformers(model, x: torch.Tensor, n: int) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False, use_cache=True)
    return time.perf_counter() - start, y[:, x.shape[1]:].tolist()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    import transformers

    print(f"{cpu_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads, "
          f"fp32, greedy, {args.new_tokens} new tokens after {PROMPT_TOKENS} prompt tokens, best of "
          f"{args.rounds} alternating rounds\n")
    print(f"{'shape':<10} {'batch':>5} {'gptforge tok/s':>15} {'transformers tok/s':>19} {'ratio':>6}  identical")
    all_same = True
    for name in args.shapes:
        hf, ours = build_pair(SHAPES[name])
        for batch_size in args.batch_sizes:
            x = prompts(batch_size, ours.cfg.vocab_size)
            run_gptforge(ours, x, 4), run_transformers(hf, x, 4)  # warm-up
            best = {"gptforge": float("inf"), "transformers": float("inf")}
            outputs = {}
            for _ in range(args.rounds):
                for impl, fn, model in (("gptforge", run_gptforge, ours), ("transformers", run_transformers, hf)):
                    seconds, outputs[impl] = fn(model, x, args.new_tokens)
                    best[impl] = min(best[impl], seconds)
            same = outputs["gptforge"] == outputs["transformers"]
            all_same &= same
            tps = {impl: batch_size * args.new_tokens / s for impl, s in best.items()}
            print(f"{name:<10} {batch_size:>5} {tps['gptforge']:>15.1f} {tps['transformers']:>19.1f} "
                  f"{tps['gptforge'] / tps['transformers']:>5.2f}x  {'yes' if same else 'NO'}", flush=True)
    if not all_same:
        sys.exit("outputs differ")


if __name__ == "__main__":
    main()
