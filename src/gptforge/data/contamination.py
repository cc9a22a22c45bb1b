"""Benchmark contamination: which evaluation items share a 13-gram with the training data.

GPT-3 (Brown et al. 2020, section 4 and Appendix C) flagged a benchmark item as potentially contaminated when
any of its 13-grams occurs in the training data, after normalising both sides: lower-cased, punctuation
removed, split on whitespace. Here punctuation is every character that is neither a word character nor
whitespace, and it becomes a space (`high-quality` and WikiText's `high @-@ quality` both give `high quality`);
an item with fewer than 13 words cannot be checked:
it is counted as `too_short` and treated as clean.

Memory stays bounded for any training set: only the benchmark's n-grams are held (as 64-bit hashes of their
words), and the training text is streamed past them. The training text is recovered by decoding the token
shards of each source's training split (byte-level BPE and char tokenizers round-trip exactly), so the check
sees exactly what the model trains on, after dedup and filtering; the validation tail is not training data.
The output `{"task": [clean item ids]}` is what `gptforge eval --clean_only FILE` reads.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.utils.io import atomic_write_json

NGRAM = 13  # Brown et al. 2020, Appendix C
_PUNCT = re.compile(r"[^\w\s]+|_+")
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: the polynomial combination of word hashes mod 2^64
_CHUNK_TOKENS = 4 << 20
_CARRY_TOKENS = 4096  # an endless document is scanned in overlapping pieces (hits are a set: no double count)


def normalize(text: str) -> list[str]:
    """GPT-3's normalisation: lower-case, strip punctuation, split on whitespace.

    Punctuation becomes a space rather than nothing, so text tokenised with punctuation split off (WikiText's
    `high @-@ quality`, `1 @,@ 000`, PTB) and the same text written normally (`high-quality`, `1,000`) give
    the same words.
    """
    return _PUNCT.sub(" ", text.lower()).split()


class _WordHasher:
    """Stable 64-bit word hashes (blake2b), cached: a corpus has far fewer distinct words than words."""

    def __init__(self, max_cache: int = 5_000_000) -> None:
        self.cache: dict[str, int] = {}
        self.max_cache = max_cache

    def __call__(self, words: list[str]) -> np.ndarray:
        if len(self.cache) > self.max_cache:
            self.cache.clear()
        cache = self.cache
        out = np.empty(len(words), dtype=np.uint64)
        for i, w in enumerate(words):
            h = cache.get(w)
            if h is None:
                h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")
            out[i] = h
        return out


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """(len - n + 1,) uint64 hashes of every n consecutive words (empty when there are fewer than n)."""
    m = len(word_hashes) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    acc = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            acc = acc * _MULT + word_hashes[j:j + m]
    return acc


def find_contaminated(items: Iterable[tuple[str, str, str]], texts: Iterable[tuple[str, str]], *,
                      n: int = NGRAM) -> dict:
    """Check benchmark items against a stream of training texts.

    Args:
        items: (task, item_id, text) per benchmark item.
        texts: (source name, text) pieces of training data; an n-gram never spans two pieces.
        n: words per n-gram (13 in GPT-3).

    Returns:
        {"tasks": {task: {"items", "dirty", "dirty_fraction", "too_short", "dirty_ids", "clean_ids",
        "by_source": {source: dirty items found there}}}, "training_words": words scanned}.
    """
    hasher = _WordHasher()
    keys: list[tuple[str, str]] = []
    gram_parts, item_parts, too_short = [], [], set()
    for task, item_id, text in items:
        grams = np.unique(ngram_hashes(hasher(normalize(text)), n))
        idx = len(keys)
        keys.append((task, str(item_id)))
        if len(grams) == 0:
            too_short.add(idx)
        gram_parts.append(grams)
        item_parts.append(np.full(len(grams), idx, dtype=np.int64))
    all_grams = np.concatenate(gram_parts) if gram_parts else np.zeros(0, dtype=np.uint64)
    order = np.argsort(all_grams, kind="stable")
    all_grams, all_items = all_grams[order], (np.concatenate(item_parts) if item_parts else np.zeros(0, np.int64))[order]
    unique = np.unique(all_grams)
    hits: dict[str, set[int]] = {}  # source -> benchmark n-gram hashes found there
    n_words = 0
    for source, text in texts:
        words = normalize(text)
        n_words += len(words)
        grams = ngram_hashes(hasher(words), n)
        if len(grams) and len(unique):
            pos = np.minimum(np.searchsorted(unique, grams), len(unique) - 1)
            found = grams[unique[pos] == grams]
            if len(found):
                hits.setdefault(source, set()).update(int(g) for g in found)
    dirty: dict[int, set[str]] = {}
    for source, grams in hits.items():
        g = np.array(sorted(grams), dtype=np.uint64)
        lo, hi = np.searchsorted(all_grams, g, "left"), np.searchsorted(all_grams, g, "right")
        for a, b in zip(lo, hi):
            for item in all_items[a:b]:
                dirty.setdefault(int(item), set()).add(source)
    return {"tasks": _per_task(keys, dirty, too_short), "training_words": n_words}


def _per_task(keys: list[tuple[str, str]], dirty: dict[int, set[str]], too_short: set[int]) -> dict:
    tasks: dict[str, dict] = {}
    for idx, (task, item_id) in enumerate(keys):
        t = tasks.setdefault(task, {"items": 0, "dirty": 0, "too_short": 0, "dirty_ids": [], "clean_ids": [],
                                    "by_source": {}})
        t["items"] += 1
        t["too_short"] += idx in too_short
        if idx in dirty:
            t["dirty"] += 1
            t["dirty_ids"].append(item_id)
            for source in sorted(dirty[idx]):
                t["by_source"][source] = t["by_source"].get(source, 0) + 1
        else:
            t["clean_ids"].append(item_id)
    for t in tasks.values():
        t["dirty_fraction"] = round(t["dirty"] / t["items"], 6)
    return tasks


def training_texts(data_dir: str | Path, *, progress: bool = False) -> Iterator[tuple[str, str]]:
    """(source name, document text) of every source's training split, decoded from its shards in chunks."""
    from tqdm import tqdm

    from gptforge.data.shards import load_meta, open_sources
    from gptforge.tokenizer import load_tokenizer

    meta = load_meta(data_dir)
    tok, eot = load_tokenizer(data_dir), meta["eot_id"]
    sources = open_sources(data_dir, meta)
    with tqdm(total=sum(len(s.train) for s in sources), desc="scan training tokens", unit="tok", unit_scale=True,
              file=sys.stderr, disable=not progress) as bar:
        for src in sources:
            carry = np.zeros(0, dtype=np.int64)
            for start in range(0, len(src.train), _CHUNK_TOKENS):
                chunk = np.concatenate([carry, src.train[start:start + _CHUNK_TOKENS].astype(np.int64)])
                bar.update(len(chunk) - len(carry))
                ends = np.flatnonzero(chunk == eot).tolist()
                if not ends:  # inside one long document: scan it all, keep an overlap for the next piece
                    if len(chunk) > _CARRY_TOKENS:
                        yield src.name, tok.decode(chunk.tolist())
                        chunk = chunk[-_CARRY_TOKENS:]
                    carry = chunk
                    continue
                prev = 0
                for e in ends:
                    if e > prev:
                        yield src.name, tok.decode(chunk[prev:e].tolist())
                    prev = e + 1
                carry = chunk[prev:]
            if len(carry):
                yield src.name, tok.decode(carry.tolist())


def load_task_items(tasks: list[str] | None, data_dir: str | None) -> list[tuple[str, str, str]]:
    """(task, item id, text) of every evaluated item of `tasks` (default: all), read by `gptforge.eval.tasks`.

    Raises:
        GptforgeError: an unknown task, or a missing file.
    """
    from gptforge.eval.tasks import TASKS, data_dir_from, read_split

    root = data_dir_from(data_dir)
    return [(name, doc.id, doc.text) for name in (tasks or list(TASKS)) for doc in read_split(name, "eval", root)]


def run_contamination(data_dir: str | Path, items: list[tuple[str, str, str]], *, out: str | Path,
                      n: int = NGRAM, progress: bool = True, report_path: str | Path | None = None) -> dict:
    """Check `items` against the training splits of `data_dir`; write `{"task": [clean ids]}` to `out`.

    Returns:
        The report: per task items, dirty, dirty_fraction, too_short, dirty_ids, by_source; training_tokens,
        training_words, seconds.

    Raises:
        GptforgeError: a bad data directory or n.
    """
    if not isinstance(n, int) or n < 1:
        raise GptforgeError(f"ngram must be a positive integer, got {n!r}")
    start = time.perf_counter()
    from gptforge.data.shards import load_meta

    meta = load_meta(data_dir)
    result = find_contaminated(items, training_texts(data_dir, progress=progress), n=n)
    report = {"ngram": n, "data": str(data_dir), "training_tokens": meta["tokens"]["train"],
              "training_words": result["training_words"], "seconds": round(time.perf_counter() - start, 2),
              "tasks": {t: {k: v for k, v in r.items() if k != "clean_ids"} for t, r in result["tasks"].items()}}
    atomic_write_json(Path(out), {t: r["clean_ids"] for t, r in result["tasks"].items()})
    if report_path:
        atomic_write_json(Path(report_path), report)
    return report
