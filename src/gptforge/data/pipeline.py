"""The encoding pass of `prepare`: documents -> (quality filter, dedup) -> token shards, parallel and resumable.

Workers (`num_proc` processes, or this process when 1) do the heavy per-document work on batches of documents:
token ids, exact-dedup hashes, MinHash signatures, quality scores. This process applies the results strictly in
document order: the quality rule, then exact then near-duplicate removal, then appends the kept documents'
tokens (and `<|endoftext|>` after each) to the source's `ShardWriter`. Every decision depends only on the
document stream, never on batching or the number of workers, so any `num_proc` gives the same bytes.

Resuming: a checkpoint (`state.json` in the work directory, written after each finished shard and at least
every CHECKPOINT_S seconds) records the position in the document stream, the shard writer's state, the
dedup index's row count and the counters. A resumed pass rewinds the shard and dedup files to it, skips the
documents already done, and continues: the shards come out byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptforge.data.dedup import DedupConfig, Deduplicator, exact_hashes, signatures
from gptforge.data.mixture import SourceSpec
from gptforge.data.quality import QualityFilter, keep_mask, pareto_draws
from gptforge.data.shards import SHARD_DIR, ShardWriter
from gptforge.data.sources import Document
from gptforge.data.units import iter_units
from gptforge.tokenizer import CharTokenizer, load_tokenizer

CHECKPOINT_S = 15.0
BATCH_CHARS = 1_000_000  # text per worker task
BATCH_DOCS = 2048
MAX_EXAMPLES = 10  # duplicate pairs kept per kind and source for --dedup_report


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to process batches (picklable): the tokenizer and filter files and the settings."""

    tokenizer_path: str
    dtype: str
    dedup: DedupConfig | None
    quality_path: str | None


class Worker:
    """Per-process state: the loaded tokenizer and quality filter."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.tok = load_tokenizer(spec.tokenizer_path)
        self.quality = QualityFilter.load(spec.quality_path) if spec.quality_path else None

    def process(self, texts: list[str], want_scores: bool) -> tuple:
        """Token ids (flat, with per-text lengths), exact hashes, signatures and scores of a batch.

        Returns:
            (ids: (sum len,) dtype, lengths: (n,) int64, exact: (n,) uint64 | None, sigs: (n, num_perm) uint32
            | None, scores: (n,) float64 | None).
        """
        if isinstance(self.tok, CharTokenizer):
            arrays = [self.tok.encode_array(t) for t in texts]
        else:
            arrays = [np.asarray(ids, dtype=np.int64) for ids in self.tok.encode_batch(texts)]
        lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        ids = np.concatenate(arrays).astype(self.spec.dtype) if arrays else np.zeros(0, self.spec.dtype)
        dedup = self.spec.dedup
        exact = exact_hashes(texts) if dedup else None
        sigs = signatures(texts, dedup) if dedup and dedup.fuzzy else None
        scores = self.quality.score(texts) if want_scores and self.quality else None
        return ids, lengths, exact, sigs, scores


_WORKER: Worker | None = None


def _init_worker(spec: WorkerSpec) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process, one core: parallelism comes from num_proc
    _WORKER = Worker(spec)


def _work(texts: list[str], want_scores: bool) -> tuple:
    assert _WORKER is not None
    return _WORKER.process(texts, want_scores)


class Executor:
    """Runs `Worker.process` on batches in `num_proc` processes (forkserver) or in this process, in order,
    with at most 2 x num_proc batches in flight (so memory does not grow with the corpus)."""

    def __init__(self, spec: WorkerSpec, num_proc: int) -> None:
        self.num_proc = num_proc
        if num_proc > 1:
            import multiprocessing as mp

            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(["gptforge.data.pipeline"])
            self.pool = ctx.Pool(num_proc, initializer=_init_worker, initargs=(spec,))
        else:
            self.local = Worker(spec)

    def map(self, batches: Iterator[tuple[list[Document], bool]]) -> Iterator[tuple[list[Document], tuple]]:
        """(batch, result) pairs in input order."""
        if self.num_proc <= 1:
            for docs, want in batches:
                yield docs, self.local.process([d.text for d in docs], want)
            return
        pending: deque = deque()
        for docs, want in batches:
            pending.append((docs, self.pool.apply_async(_work, ([d.text for d in docs], want))))
            if len(pending) >= 2 * self.num_proc:
                docs0, res = pending.popleft()
                yield docs0, res.get()
        while pending:
            docs0, res = pending.popleft()
            yield docs0, res.get()

    def close(self) -> None:
        if self.num_proc > 1:
            self.pool.terminate()
            self.pool.join()


@dataclass
class SourceState:
    """Resumable position and counters of one source's pass (JSON-serialisable via `vars`)."""

    units: int = 0  # units of the stream already applied (chunks and empty markers included)
    documents: int = 0  # documents read (a chunked file counts once)
    kept: int = 0  # documents kept
    bytes: int = 0
    replaced_bytes: int = 0
    tokens: int = 0
    removed: dict = field(default_factory=lambda: {"quality": 0, "exact_duplicate": 0, "near_duplicate": 0})
    doc_start: bool = True  # the next unit with text starts a document
    doc_kept: bool = True  # the verdict on the current document
    writer: dict | None = None
    dedup_rows: int = 0
    examples: list = field(default_factory=list)


@dataclass
class PassContext:
    """Settings shared by every source's pass."""

    work: Path
    dtype: str
    eot_id: int
    shard_tokens: int
    dedup: DedupConfig | None
    quality: QualityFilter | None
    quality_seed: int
    quality_alpha: float
    executor: Executor
    checkpoint: Callable[[SourceState], None]
    progress: Callable[[int, int], None]  # (bytes, tokens) done since the last call


def _batches(units: Iterator[Document], want_scores: bool) -> Iterator[tuple[list[Document], bool]]:
    batch: list[Document] = []
    chars = 0
    for doc in units:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch, want_scores
            batch, chars = [], 0
    if batch:
        yield batch, want_scores


def run_source(src: SourceSpec, index: int, ctx: PassContext, st: SourceState) -> tuple[SourceState, list[dict]]:
    """Encode one source into `shards/<name>/` of the work directory, resuming from `st`.

    Returns:
        The final state (counters) and the shard entries.
    """
    writer = ShardWriter(ctx.work, f"{SHARD_DIR}/{src.name}", shard_tokens=ctx.shard_tokens, dtype=ctx.dtype,
                         state=st.writer)
    dedup = Deduplicator(ctx.dedup, ctx.work / f"dedup_{src.name}.rows", st.dedup_rows) if ctx.dedup else None
    filtering = ctx.quality is not None and src.quality_filter
    units = iter_units(src.corpus, text_field=src.text_field, documents=src.documents)
    skipped = sum(d.num_bytes for d in itertools.islice(units, st.units))
    ctx.progress(skipped, 0)
    eot = np.array([ctx.eot_id], dtype=ctx.dtype)
    last_save = time.monotonic()
    try:
        for docs, (ids, lengths, exact, sigs, scores) in ctx.executor.map(_batches(units, filtering)):
            keep = np.ones(len(docs), dtype=bool)
            if scores is not None:
                draws = pareto_draws(ctx.quality_seed, index, np.arange(st.units, st.units + len(docs)),
                                     ctx.quality_alpha)
                keep = keep_mask(scores, draws)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            tokens_before, shards_done = st.tokens, 0
            for j, doc in enumerate(docs):
                shards_done += _apply(doc, j, st, keep[j], ids[offsets[j]:offsets[j + 1]], exact, sigs, dedup,
                                      writer, eot)
            ctx.progress(sum(d.num_bytes for d in docs), st.tokens - tokens_before)
            if shards_done or time.monotonic() - last_save >= CHECKPOINT_S:
                _save(st, writer, dedup, ctx)
                last_save = time.monotonic()
        shards = writer.finish()
        st.writer = {"shards": shards, "part_tokens": 0}
    finally:
        if dedup is not None:
            dedup.close()
    return st, shards


def _apply(doc: Document, j: int, st: SourceState, quality_ok: bool, ids: np.ndarray, exact, sigs,
           dedup: Deduplicator | None, writer: ShardWriter, eot: np.ndarray) -> int:
    """Decide one unit in stream order and write its tokens if kept; returns shards completed.

    A document read in several chunks (a text file over ~1 MB) is judged by its first chunk; the others follow
    that verdict, so a document is kept or removed whole and its `<|endoftext|>` follows its last chunk.
    """
    index = st.units
    st.units += 1
    st.bytes += doc.num_bytes
    st.replaced_bytes += doc.replaced_bytes
    if not doc.text:
        return 0
    if st.doc_start:
        verdict = None if quality_ok else "quality"
        if verdict is None and dedup is not None:
            verdict, other, similarity = dedup.check(index, int(exact[j]), sigs[j] if sigs is not None else None)
            if verdict and sum(e["kind"] == verdict for e in st.examples) < MAX_EXAMPLES:
                st.examples.append({"kind": verdict, "removed": index, "kept": other,
                                    "estimated_jaccard": round(similarity, 4)})
        st.documents += 1
        st.doc_kept = verdict is None
        if verdict is None:
            st.kept += 1
        else:
            st.removed[verdict] += 1
    st.doc_start = doc.is_last_chunk
    if not st.doc_kept:
        return 0
    st.tokens += len(ids) + doc.is_last_chunk
    return writer.write(np.concatenate([ids, eot]) if doc.is_last_chunk else ids)


def _save(st: SourceState, writer: ShardWriter, dedup: Deduplicator | None, ctx: PassContext) -> None:
    writer.sync()
    st.writer = writer.state()
    if dedup is not None:
        dedup.sync()
        st.dedup_rows = dedup.rows
    ctx.checkpoint(st)
