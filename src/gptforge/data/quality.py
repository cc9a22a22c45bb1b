"""Quality filtering as GPT-3 did for Common Crawl (Brown et al. 2020, Appendix A).

A logistic-regression classifier (scikit-learn) on hashed word features (`HashingVectorizer`, term
frequencies, L2-normalised) is trained with a curated reference corpus as positives and the raw corpus as
negatives; it scores each raw document with the probability of being reference-like. A document is kept when
`np.random.pareto(alpha) > 1 - score` with alpha = 9 (the paper's rule: mostly high scores, some low ones).
The Pareto draw is the inverse CDF of numpy's `pareto` (a Lomax variable, `(1 - u) ** (-1 / alpha) - 1`)
at a uniform `u` hashed from (seed, source, document position), so the decision for a document does not depend
on batching, worker processes or where a resumed run restarted.

The trained filter is saved as a `.npz` of plain arrays (weights, bias, settings; no pickle) and can be reused
with `--quality_filter FILE`. Depends on numpy (+ scikit-learn, imported lazily) and `gptforge.errors`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.utils.io import atomic_write

FILTER_FILE = "quality_filter.npz"
N_FEATURES = 1 << 18
MAX_TRAIN_CHARS = 20_000  # a sampled document is cut to this many characters for training
PARETO_ALPHA = 9.0  # Brown et al. 2020, Appendix A


@dataclass(frozen=True)
class QualityConfig:
    """Quality-filter settings.

    Attributes:
        reference: corpus source of the positives (curated text), or None when `filter_path` is given.
        documents: units of the reference corpus ("file", "lines", "paragraphs").
        text_field: record field of the reference, for .jsonl/.parquet/hf: sources.
        filter_path: a filter saved by an earlier prepare (`quality_filter.npz`) to reuse instead of training.
        alpha: the Pareto shape of the keep rule.
        seed: seeds the training sample and the keep draws.
        max_train_docs: documents sampled per class for training.
    """

    reference: str | None = None
    documents: str = "file"
    text_field: str = "text"
    filter_path: str | None = None
    alpha: float = PARETO_ALPHA
    seed: int = 0
    max_train_docs: int = 20_000

    def check(self) -> None:
        """Raises GptforgeError naming a missing or out-of-range setting."""
        if not self.reference and not self.filter_path:
            raise GptforgeError("quality filtering needs --quality_reference CORPUS (to train a filter) or "
                                "--quality_filter FILE (a saved one)")
        if self.filter_path and not Path(self.filter_path).is_file():
            raise GptforgeError(f"quality filter not found: {self.filter_path} (expected a {FILTER_FILE} "
                                "written by gptforge prepare)")
        if not self.alpha > 0:
            raise GptforgeError(f"quality alpha must be > 0, got {self.alpha}")


class QualityFilter:
    """A trained classifier: `score(texts)` is P(reference-like) per text.

    Attributes:
        coef: (N_FEATURES,) float32 weights over hashed word counts.
        intercept: the bias.
        info: training facts (documents per class, training accuracy), saved with it.
    """

    def __init__(self, coef: np.ndarray, intercept: float, info: dict) -> None:
        self.coef, self.intercept, self.info = coef.astype(np.float32), float(intercept), info

    @staticmethod
    def vectorizer():
        from sklearn.feature_extraction.text import HashingVectorizer  # lazy: optional extra [data]

        return HashingVectorizer(n_features=N_FEATURES, alternate_sign=False, norm="l2", lowercase=True)

    def score(self, texts: list[str]) -> np.ndarray:
        """(n,) float64 probabilities in (0, 1) that each text is like the reference corpus."""
        if not texts:
            return np.zeros(0)
        x = self.vectorizer().transform([t[:MAX_TRAIN_CHARS * 5] for t in texts])
        logits = x @ self.coef.astype(np.float64) + self.intercept
        return 1.0 / (1.0 + np.exp(-np.asarray(logits).ravel()))

    def save(self, path: Path) -> Path:
        """Write the filter as `.npz` atomically; returns the path."""
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, coef=self.coef, intercept=np.float64(self.intercept),
                         info=np.frombuffer(json.dumps(self.info).encode(), dtype=np.uint8),
                         n_features=np.int64(N_FEATURES))

        atomic_write(Path(path), write)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityFilter:
        """Read a filter written by `save`.

        Raises:
            GptforgeError: the file is missing, not a filter, or for another feature size.
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["n_features"]) != N_FEATURES:
                    raise GptforgeError(f"quality filter {path} has {int(data['n_features'])} features; "
                                        f"this version uses {N_FEATURES}")
                return cls(data["coef"], float(data["intercept"]), json.loads(bytes(data["info"]).decode()))
        except GptforgeError:
            raise
        except (OSError, KeyError, ValueError) as exc:
            raise GptforgeError(f"{path} is not a gptforge quality filter ({str(exc).splitlines()[0]})") from None


def sample_texts(texts: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of at most `k` texts from a stream (reservoir sampling, seeded; memory O(k))."""
    rng = random.Random(seed)
    sample: list[str] = []
    for n, text in enumerate(texts):
        if not text.strip():
            continue
        if len(sample) < k:
            sample.append(text[:MAX_TRAIN_CHARS])
        else:
            j = rng.randrange(n + 1)
            if j < k:
                sample[j] = text[:MAX_TRAIN_CHARS]
    return sample


def train_filter(positives: list[str], negatives: list[str], *, seed: int = 0) -> QualityFilter:
    """Fit the logistic regression: reference documents (label 1) against raw documents (label 0).

    Classes are weighted to balance them. Raises GptforgeError when either side is empty.
    """
    if not positives:
        raise GptforgeError("the quality reference corpus has no documents; give a non-empty --quality_reference")
    if not negatives:
        raise GptforgeError("no raw documents to train the quality filter against (the filtered sources are empty)")
    from sklearn.linear_model import LogisticRegression  # lazy: optional extra [data]

    x = QualityFilter.vectorizer().transform(positives + negatives)
    y = np.array([1] * len(positives) + [0] * len(negatives))
    model = LogisticRegression(C=1.0, max_iter=1000, class_weight="balanced", random_state=seed)
    model.fit(x, y)
    info = {"positives": len(positives), "negatives": len(negatives),
            "train_accuracy": round(float(model.score(x, y)), 4)}
    return QualityFilter(model.coef_.ravel(), float(model.intercept_[0]), info)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finalizer, elementwise on uint64 (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pareto_draws(seed: int, source_index: int, doc_indices: np.ndarray, alpha: float) -> np.ndarray:
    """(n,) float64 Pareto (Lomax, numpy's `pareto`) draws, one per document position, reproducible.

    u = SplitMix64(seed, source, position) scaled to [0, 1); draw = (1 - u) ** (-1 / alpha) - 1.
    """
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(1, ((seed & 0xFFFFFFFFFFF) << 20) ^ source_index, dtype=np.uint64))[0]
        bits = _splitmix64(np.asarray(doc_indices, dtype=np.uint64) ^ key)
    u = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    return (1.0 - u) ** (-1.0 / alpha) - 1.0


def keep_mask(scores: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """GPT-3's rule: keep a document when its Pareto draw exceeds 1 - score."""
    return draws > 1.0 - scores
