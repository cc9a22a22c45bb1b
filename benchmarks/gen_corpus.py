"""Generate a synthetic English-like text corpus of a given size, reproducibly (fixed seed).

Words come from a fixed made-up vocabulary of 30,000 syllable words drawn with Zipf-like frequencies
(exponent 1.1), in capitalised sentences of 6-24 words, in paragraphs of 40-200 words separated by blank lines.
About 5% of paragraphs are near copies (one to three words changed) of a recent paragraph, so deduplication has
something to find. The vocabulary is fixed, so the number of distinct words (and a BPE trainer's memory) stops
growing with the corpus size: 100 MB and 1 GB differ only in length.

Usage: python benchmarks/gen_corpus.py --size_mb 1000 --out /tmp/corpus_1gb.txt [--seed 0]
Keep the output out of git (/tmp or an ignored folder).
"""

from __future__ import annotations

import argparse
import sys
from collections import deque
from pathlib import Path

import numpy as np

SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
VOCAB_SIZE = 30_000
DUP_FRACTION = 0.05


def make_vocab(rng: np.random.Generator) -> np.ndarray:
    """VOCAB_SIZE distinct words of 1-4 syllables (object array of str), most frequent first."""
    words: dict[str, None] = {}
    while len(words) < VOCAB_SIZE:
        n = int(rng.integers(1, 5))
        words["".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n))] = None
    return np.array(list(words), dtype=object)


def paragraphs(seed: int = 0):
    """An endless, reproducible stream of paragraphs (str, without the separating blank line)."""
    rng = np.random.default_rng(seed)
    vocab = make_vocab(rng)
    ranks = np.arange(1, VOCAB_SIZE + 1, dtype=np.float64)
    p = ranks ** -1.1
    p /= p.sum()
    recent: deque[list[str]] = deque(maxlen=500)
    while True:
        words = vocab[rng.choice(VOCAB_SIZE, size=200_000, p=p)].tolist()
        pos = 0
        while pos < len(words) - 200:
            if recent and rng.random() < DUP_FRACTION:
                para = list(recent[int(rng.integers(0, len(recent)))])
                for k in rng.integers(0, len(para), int(rng.integers(1, 4))):
                    para[k] = words[pos]
                    pos += 1
            else:
                n = int(rng.integers(40, 201))
                para, pos = _sentences(words[pos:pos + n], rng), pos + n
                recent.append(para)
            yield " ".join(para)


def _sentences(words: list[str], rng: np.random.Generator) -> list[str]:
    out, i = list(words), 0
    while i < len(out):
        n = int(rng.integers(6, 25))
        out[i] = out[i].capitalize()
        end = min(i + n, len(out)) - 1
        out[end] = out[end] + ("." if rng.random() < 0.9 else "?")
        if n > 12 and end - i > 6:
            out[i + 5] = out[i + 5] + ","
        i += n
    return out


def generate(path: str | Path, size_bytes: int, seed: int = 0) -> int:
    """Write about `size_bytes` bytes (whole paragraphs, at least that many) to `path`; returns bytes written."""
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        buffer: list[str] = []
        for para in paragraphs(seed):
            buffer.append(para + "\n\n")
            written += len(para) + 2  # the vocabulary is ASCII: characters are bytes
            if len(buffer) >= 2000 or written >= size_bytes:
                f.write("".join(buffer))
                buffer.clear()
            if written >= size_bytes:
                return written
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size_mb", type=float, required=True, help="corpus size in MB (1e6 bytes)")
    parser.add_argument("--out", type=Path, required=True, help="output text file")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    n = generate(args.out, int(args.size_mb * 1e6), args.seed)
    print(f"wrote {n:,} bytes to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
