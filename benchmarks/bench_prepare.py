"""Benchmark `gptforge.data.prepare`: throughput, and peak memory staying flat as the corpus grows.

Builds ~10 MB and ~100 MB text corpora from shuffled Tiny Shakespeare lines, then runs `prepare` on
each in a fresh subprocess (so one run's memory cannot hide another's) and prints a table of corpus
size, tokens, seconds, MB/s and the child's peak RSS.

Two modes per size:
- `train`: BPE trained on the corpus itself, then tokenized (the full cost of a first run);
- `reuse`: the tokenizer trained on the 10 MB corpus, reused (`tokenizer=PATH`), so the two peaks
  compare the streaming encode path alone.

Usage: PYTHONPATH=src python benchmarks/bench_prepare.py [--sizes-mb 10 100] [--vocab-size 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

SHARED_DATA = Path(os.environ.get("GPTFORGE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

_CHILD = """
import json, resource, sys, time
from gptforge.data.prepare import prepare
corpus, out, tokenizer, vocab_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t0 = time.perf_counter()
meta = prepare(corpus, out, tokenizer=tokenizer, vocab_size=vocab_size, progress=False)
seconds = time.perf_counter() - t0
peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024, "bytes": meta["bytes"],
                  "tokens": meta["tokens"]["train"] + meta["tokens"]["val"]}))
"""


def make_corpus(path: Path, size_mb: int, seed: int = 0) -> None:
    """Write about `size_mb` MB of shuffled Tiny Shakespeare lines to `path`."""
    lines = (SHARED_DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    rng = random.Random(seed)
    target = size_mb * 1_000_000
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            rng.shuffle(lines)
            block = "".join(lines)[: target - written]
            f.write(block)
            written += len(block.encode("utf-8"))


def run_prepare(corpus: Path, out: Path, tokenizer: str, vocab_size: int) -> dict:
    """Run `prepare` in a fresh interpreter and return its timing and peak-RSS report."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(corpus), str(out), tokenizer, str(vocab_size)],
        check=True, capture_output=True, text=True, env=env,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    """Build the corpora, run the benchmark, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[10, 100], help="corpus sizes in MB")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size in tokens")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        rows = []
        corpora = {}
        for size in args.sizes_mb:
            corpora[size] = root / f"corpus_{size}mb.txt"
            make_corpus(corpora[size], size)
        reference = root / f"out_train_{args.sizes_mb[0]}"  # its tokenizer is reused below
        for mode in ("train", "reuse"):
            for size, corpus in corpora.items():
                out = root / f"out_{mode}_{size}"
                tokenizer = "bpe" if mode == "train" else str(reference)
                report = run_prepare(corpus, out, tokenizer, args.vocab_size)
                rows.append((mode, size, report))
                print(f"done: {mode} {size} MB in {report['seconds']:.1f} s", file=sys.stderr)

    print(f"\nprepare, BPE vocab {args.vocab_size}, {os.cpu_count()} cores")
    print(f"{'mode':<6} {'corpus MB':>9} {'tokens':>12} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>11}")
    for mode, _, r in rows:
        mb = r["bytes"] / 1e6
        print(f"{mode:<6} {mb:>9.1f} {r['tokens']:>12,} {r['seconds']:>8.1f} {mb / r['seconds']:>7.2f} "
              f"{r['peak_rss_mb']:>11.0f}")
    for mode in ("train", "reuse"):
        peaks = [r["peak_rss_mb"] for m, _, r in rows if m == mode]
        print(f"peak RSS ratio ({mode}, largest / smallest corpus): {peaks[-1] / peaks[0]:.2f}")


if __name__ == "__main__":
    main()
