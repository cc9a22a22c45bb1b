"""Document deduplication: exact (normalised-text hash) and fuzzy (MinHash LSH with `datasketch`).

GPT-3 (Brown et al. 2020, section 2.2 and Appendix A) fuzzily deduplicated documents within each dataset
with Spark's MinHashLSH (10 hashes). Here, within each source, in stream order: a document is an exact
duplicate when its normalised text (lower-cased words, `\\w+`, joined by single spaces) hashes like an earlier
kept document's; a near duplicate when MinHash LSH finds an earlier kept document whose estimated Jaccard
similarity of word `shingle`-grams is at least `threshold` (LSH candidates are confirmed against the stored
signature, so a candidate below the threshold never removes anything; the bands are chosen for recall). The
first occurrence is kept.

Signatures are computed where the tokenizer runs (worker processes); `Deduplicator` makes the decisions in the
main process, in order, so the result does not depend on the number of processes. Every kept document's
signature is appended to a file: a resumed run replays it to rebuild the index exactly.
Memory: the LSH index grows with the kept documents (about 1-2 KB each at 128 permutations).
"""

from __future__ import annotations

import hashlib
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.errors import GptforgeError

_WORD = re.compile(r"\w+")
_EMPTY = np.iinfo(np.uint32).max  # a signature of no shingles: every value at the maximum
LSH_WEIGHTS = (0.1, 0.9)  # datasketch's (false positive, false negative) weights when choosing bands x rows
_HEADER = 4  # uint32 words before the signature in a row: document index (lo, hi), exact hash (lo, hi)


@dataclass(frozen=True)
class DedupConfig:
    """Deduplication settings.

    Attributes:
        fuzzy: also remove near duplicates (MinHash LSH); exact duplicates are always removed.
        threshold: Jaccard similarity of shingle sets at or above which a document is a near duplicate.
        num_perm: MinHash permutations (signature length); GPT-3's Spark job used 10 hashes.
        shingle: words per shingle.
        seed: seed of the MinHash permutations.
    """

    fuzzy: bool = True
    threshold: float = 0.8
    num_perm: int = 128
    shingle: int = 5
    seed: int = 1

    def check(self) -> None:
        """Raises GptforgeError naming a setting out of range."""
        if not 0.0 < self.threshold <= 1.0:
            raise GptforgeError(f"dedup threshold must be in (0, 1], got {self.threshold}")
        if not 2 <= self.num_perm <= 1024:
            raise GptforgeError(f"dedup num_perm must be in [2, 1024], got {self.num_perm}")
        if not 1 <= self.shingle <= 64:
            raise GptforgeError(f"dedup shingle must be in [1, 64] words, got {self.shingle}")


def words(text: str) -> list[str]:
    """The normalised words of a text: lower-cased runs of word characters."""
    return _WORD.findall(text.lower())


def exact_hashes(texts: list[str]) -> np.ndarray:
    """(n,) uint64 hashes (blake2b, 8 bytes) of each text's normalised words joined by single spaces."""
    return np.array([int.from_bytes(hashlib.blake2b(" ".join(words(t)).encode(), digest_size=8).digest(), "little")
                     for t in texts], dtype=np.uint64)


def shingles(text: str, k: int) -> set[bytes]:
    """The set of word k-grams of a text (the whole text as one shingle when it has fewer than k words)."""
    w = words(text)
    if len(w) <= k:
        return {" ".join(w).encode()} if w else set()
    return {" ".join(w[i:i + k]).encode() for i in range(len(w) - k + 1)}


def signatures(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """(n, num_perm) uint32 MinHash signatures of the texts' shingle sets (datasketch, scheme "affine32").

    Shingles are hashed with CRC-32 (stable across processes, unlike Python's `hash`); datasketch mixes it
    with the MurmurHash3 finalizer before permuting. A text without words gets the all-maximum signature.
    """
    from datasketch import MinHash  # lazy: optional extra [data]

    base = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=zlib.crc32, scheme="affine32")
    out = np.full((len(texts), cfg.num_perm), _EMPTY, dtype=np.uint32)
    for i, text in enumerate(texts):
        items = shingles(text, cfg.shingle)
        if items:
            m = MinHash(num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=zlib.crc32, permutations=base.permutations,
                        scheme="affine32")
            m.update_batch(items)
            out[i] = m.hashvalues
    return out


class Deduplicator:
    """Exact and near-duplicate decisions for one source's documents, in stream order, resumable.

    Args:
        cfg: the settings.
        rows_path: the append-only file of kept documents' rows (index, exact hash, signature); created if
            missing, else truncated to `resume_rows` rows and replayed into the index.
        resume_rows: rows recorded at the checkpoint being resumed (0 for a fresh start).
    """

    def __init__(self, cfg: DedupConfig, rows_path: Path, resume_rows: int = 0) -> None:
        from datasketch import MinHashLSH  # lazy: optional extra [data]

        self.cfg = cfg
        self.row_words = _HEADER + (cfg.num_perm if cfg.fuzzy else 0)
        self.exact: dict[int, int] = {}  # exact hash -> document index of the kept document
        # Tuned for recall: candidates are confirmed against the stored signature, so extra ones cost a read,
        # never a wrong removal (at threshold 0.8 and 128 permutations: 14 bands of 9 rows).
        self.lsh = (MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, weights=LSH_WEIGHTS)
                    if cfg.fuzzy else None)
        self.rows = 0
        self._fd = os.open(rows_path, os.O_RDWR | os.O_CREAT, 0o644)
        os.ftruncate(self._fd, resume_rows * self.row_words * 4)
        data = np.fromfile(rows_path, dtype="<u4").reshape(-1, self.row_words) if resume_rows else None
        for row in data if data is not None else []:
            self._index(row)
        os.lseek(self._fd, 0, os.SEEK_END)

    def _index(self, row: np.ndarray) -> None:
        doc = int(row[0]) | int(row[1]) << 32
        self.exact[int(row[2]) | int(row[3]) << 32] = doc
        if self.lsh is not None and row[_HEADER] != _EMPTY:
            self.lsh.insert(self.rows, self._lean(row[_HEADER:]), check_duplication=False)
        self.rows += 1

    def _lean(self, signature: np.ndarray):
        from datasketch import LeanMinHash

        return LeanMinHash(seed=self.cfg.seed, hashvalues=signature, scheme="affine32")

    def _row(self, key: int) -> np.ndarray:
        data = os.pread(self._fd, self.row_words * 4, key * self.row_words * 4)
        return np.frombuffer(data, dtype="<u4")

    def check(self, doc_index: int, exact_hash: int, signature: np.ndarray | None
              ) -> tuple[str | None, int, float]:
        """Decide one document; a kept one is added to the index.

        Returns:
            (None, -1, 0.0) when kept; ("exact_duplicate", kept index, 1.0) or ("near_duplicate", kept index,
            estimated Jaccard similarity) when removed.
        """
        if exact_hash in self.exact:
            return "exact_duplicate", self.exact[exact_hash], 1.0
        if self.lsh is not None and signature is not None and signature[0] != _EMPTY:
            best_key, best = -1, 0.0
            for key in self.lsh.query(self._lean(signature)):
                similarity = float(np.mean(self._row(key)[_HEADER:] == signature))
                if similarity >= self.cfg.threshold and similarity > best:
                    best_key, best = key, similarity
            if best_key >= 0:
                row = self._row(best_key)
                return "near_duplicate", int(row[0]) | int(row[1]) << 32, best
        row = np.zeros(self.row_words, dtype="<u4")
        row[:4] = [doc_index & 0xFFFFFFFF, doc_index >> 32, exact_hash & 0xFFFFFFFF, exact_hash >> 32]
        if self.lsh is not None:
            row[_HEADER:] = signature if signature is not None else _EMPTY
        os.write(self._fd, row.tobytes())
        self._index(row)
        return None, -1, 0.0

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def jaccard(a: str, b: str, k: int) -> float:
    """The exact Jaccard similarity of two texts' word k-gram sets (for the dedup report)."""
    sa, sb = shingles(a, k), shingles(b, k)
    return len(sa & sb) / len(sa | sb) if sa or sb else 1.0
