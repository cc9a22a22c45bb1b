"""Turn a corpus or a weighted mixture of corpora into token shards, the tokenizer, and `meta.json`.

`prepare(corpus, out_dir)` (or `prepare(None, out_dir, mixture=MIX.yaml)`) runs in passes over the sources,
each streaming, so peak memory does not grow with the corpus:
1. the tokenizer: trained on a weighted sample of all sources (source i contributes weight_i of at most
   `tokenizer_sample_bytes`, taken evenly through it), or loaded from a path;
2. the quality filter, when asked (`data.quality`): trained on the reference corpus against a sample of the
   sources marked for filtering, or loaded;
3. the encoding pass per source (`data.pipeline`): quality filter, exact and fuzzy dedup (`data.dedup`),
   tokenization in `num_proc` processes, shards of `shard_tokens` tokens (`data.shards`).
Each document is followed by `<|endoftext|>`. A source's validation split is the last `val_fraction` of its
token stream, as in nanoGPT's data scripts.

Everything is built in a work directory beside `out_dir` (`.NAME.prepare`) with checkpoints: run the same
command again after an interruption (even SIGKILL) and it resumes where it stopped, giving byte-identical
shards; different settings start afresh. The finished files are moved into `out_dir` with `meta.json` last,
so a directory never looks complete before it is. Only files gptforge made are ever replaced.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from gptforge.data.dedup import DedupConfig
from gptforge.data.mixture import SourceSpec, load_mixture, single_source
from gptforge.data.output import install, write_report
from gptforge.data.pipeline import Executor, PassContext, SourceState, WorkerSpec, run_source
from gptforge.data.quality import FILTER_FILE, QualityConfig, QualityFilter, sample_texts, train_filter
from gptforge.data.shards import META_FILE, SHARD_DIR, V1_FILES, load_meta  # noqa: F401  (load_meta re-exported)
from gptforge.data.sources import estimate_bytes, list_files
from gptforge.data.units import iter_units
from gptforge.errors import GptforgeError
from gptforge.tokenizer import MIN_BPE_VOCAB_SIZE, load_tokenizer, train_bpe, train_char
from gptforge.utils.io import atomic_write_json

META_VERSION = 2
MAX_VAL_FRACTION = 0.5
DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_TOKENIZER_SAMPLE_BYTES = 1_000_000_000
STATE_FILE = "state.json"
SETTINGS_FILE = "settings.json"


def choose_dtype(vocab_size: int) -> str:
    """The smallest unsigned dtype that holds every id of a `vocab_size`-token vocabulary.

    Returns:
        "uint16" when vocab_size <= 65536, else "uint32".
    """
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def default_num_proc() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare(corpus: str | os.PathLike | None, out_dir: str | os.PathLike, *, mixture: str | os.PathLike | None = None,
            tokenizer: str = "bpe", vocab_size: int = 8192, val_fraction: float = 0.1, text_field: str = "text",
            documents: str = "file", num_proc: int | None = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
            tokenizer_sample_bytes: int = DEFAULT_TOKENIZER_SAMPLE_BYTES, dedup: DedupConfig | None = None,
            quality: QualityConfig | None = None, dedup_report: str | os.PathLike | None = None,
            progress: bool = True, overwrite: bool = False) -> dict:
    """Tokenize a corpus, or a mixture, into `out_dir/{shards/, meta.json}` plus the tokenizer file.

    Args:
        corpus: a corpus source (file, folder, glob, .jsonl/.parquet, hf:NAME, `shakespeare`, `python-stdlib`);
            None when `mixture` is given.
        out_dir: the data directory; created if missing. A directory that already holds a finished preparation
            (meta.json) is refused unless `overwrite`; then only gptforge's own files in it are replaced.
        mixture: a mixture YAML file (see `data.mixture`) instead of `corpus`.
        tokenizer: "bpe" (train byte-level BPE), "char" (train character-level), or the path of an
            existing tokenizer (directory or tokenizer.json) to reuse without training.
        vocab_size: BPE vocabulary size in tokens, including the 256 bytes and `<|endoftext|>` (>= 257).
        val_fraction: fraction of each source's token stream, taken from its end, for validation; in [0, 0.5].
        text_field: record field holding the text, for .jsonl/.parquet/hf: sources (of `corpus`).
        documents: units of `corpus` (and of the quality reference): "file", "lines" or "paragraphs".
        num_proc: worker processes for tokenization, hashing and scoring (default: all usable cores).
        shard_tokens: tokens per shard file (the last shard of a source is shorter).
        tokenizer_sample_bytes: at most this many bytes of text train the BPE tokenizer.
        dedup: remove exact (and, if `dedup.fuzzy`, near) duplicate documents within each source; None: keep all.
        quality: apply the quality filter (to `corpus`, or to the mixture sources marked `quality_filter`).
        dedup_report: write example duplicate pairs to this JSON-lines file.
        progress: show progress bars (bytes, MB/s, tokens) on stderr.

    Returns:
        The metadata written to `meta.json` (see `data.shards.load_meta`).

    Raises:
        GptforgeError: `out_dir` already holds prepared data and `overwrite` is False; a bad argument or
            mixture file, a missing or empty corpus or reference, an unknown character for a reused char
            tokenizer, or a source left too small for both splits.
    """
    out = Path(out_dir)
    if (out / META_FILE).is_file() and not overwrite:
        raise GptforgeError(f"{out} already holds prepared data (meta.json), which runs may have been trained on; "
                            "choose a new --out, or pass --overwrite to replace it (nothing was changed)")
    specs, note = _sources(corpus, mixture, documents, text_field, quality)
    if note:
        print(f"note: {note}", file=sys.stderr)
    num_proc = default_num_proc() if num_proc is None else num_proc
    _check_args(out, specs, tokenizer, vocab_size, val_fraction, num_proc, shard_tokens, tokenizer_sample_bytes,
                dedup, quality)
    settings = _settings(specs, tokenizer, vocab_size, val_fraction, shard_tokens, tokenizer_sample_bytes, dedup,
                         quality)
    work, state = _open_work(out, settings)
    try:
        tok = _tokenizer(work, state, specs, tokenizer, vocab_size, tokenizer_sample_bytes, progress)
        qfilter = _quality_filter(work, specs, quality) if quality else None
        meta = _encode(work, state, specs, tok, qfilter, quality, dedup, val_fraction, shard_tokens, num_proc,
                       progress)
        meta["source"] = str(mixture) if mixture else os.fspath(corpus)
        if dedup_report:
            write_report(Path(dedup_report), specs, state, dedup or DedupConfig())
        atomic_write_json(work / META_FILE, meta)
        install(work, out, meta)
    except BaseException as exc:
        # Bad input fails the same way again: leave no trace. An interruption keeps what can be resumed.
        if isinstance(exc, GptforgeError) or not (work / STATE_FILE).exists():
            shutil.rmtree(work, ignore_errors=True)
        raise
    total = meta["bytes"]
    replaced = meta["replaced_bytes"]
    if replaced > 0.01 * max(1, total):
        print(f"warning: {replaced:,} of {total:,} input bytes were not valid UTF-8 and became U+FFFD; is the "
              "corpus binary or in another encoding?", file=sys.stderr)
    return meta


def _sources(corpus, mixture, documents: str, text_field: str, quality: QualityConfig | None
             ) -> tuple[list[SourceSpec], str | None]:
    if (corpus is None) == (mixture is None):
        raise GptforgeError("give exactly one of --corpus CORPUS or --mixture MIX.yaml")
    if mixture is not None:
        specs, note = load_mixture(mixture)
        if quality and not any(s.quality_filter for s in specs):
            raise GptforgeError(f"quality filtering was asked for but no source of {mixture} has "
                                "`quality_filter: true`")
        return specs, note
    return single_source(os.fspath(corpus), documents=documents, text_field=text_field,
                         quality_filter=quality is not None), None


def _check_args(out: Path, specs: list[SourceSpec], tokenizer: str, vocab_size: int, val_fraction: float,
                num_proc: int, shard_tokens: int, sample_bytes: int, dedup: DedupConfig | None,
                quality: QualityConfig | None) -> None:
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"out_dir {out} exists and is not a directory; give a directory path")
    if tokenizer not in ("bpe", "char") and not Path(tokenizer).exists():
        raise GptforgeError(
            f"tokenizer must be 'bpe', 'char', or the path of an existing tokenizer; got {tokenizer!r} (not found)")
    if tokenizer == "bpe" and (
            isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB_SIZE):
        raise GptforgeError(
            f"vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} (256 bytes + <|endoftext|>), got {vocab_size!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)):
        raise GptforgeError(f"val_fraction must be a number in [0, {MAX_VAL_FRACTION}], got {val_fraction!r}")
    if not 0.0 <= val_fraction <= MAX_VAL_FRACTION:
        raise GptforgeError(f"val_fraction must be in [0, {MAX_VAL_FRACTION}], got {val_fraction}")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise GptforgeError(f"num_proc must be an integer >= 1, got {num_proc!r}")
    if not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise GptforgeError(f"shard_tokens must be an integer >= 1, got {shard_tokens!r}")
    if not isinstance(sample_bytes, int) or sample_bytes < 1:
        raise GptforgeError(f"tokenizer_sample_bytes must be an integer >= 1, got {sample_bytes!r}")
    if dedup:
        dedup.check()
    if quality:
        quality.check()
    for spec in specs:
        list_files(spec.corpus)  # raises "corpus not found"
        if Path(spec.corpus).is_dir() and out.resolve().is_relative_to(Path(spec.corpus).resolve()):
            raise GptforgeError(f"--out {out} is inside the corpus folder {spec.corpus}; its outputs would become "
                                "corpus documents next time (choose an --out outside it)")


def _fingerprint(corpus: str) -> list:
    """What identifies a corpus's current content cheaply: its files' paths, sizes and modification times."""
    try:
        files = list_files(corpus)
    except GptforgeError:
        return []
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files or []]


def _settings(specs, tokenizer, vocab_size, val_fraction, shard_tokens, sample_bytes, dedup, quality) -> dict:
    """Everything the output depends on; a work directory is resumed only when these match."""
    return {"version": META_VERSION, "sources": [vars(s) | {"files": _fingerprint(s.corpus)} for s in specs],
            "tokenizer": tokenizer, "vocab_size": vocab_size, "val_fraction": val_fraction,
            "shard_tokens": shard_tokens, "tokenizer_sample_bytes": sample_bytes,
            "dedup": vars(dedup) if dedup else None, "quality": vars(quality) if quality else None}


def _open_work(out: Path, settings: dict) -> tuple[Path, dict]:
    """The work directory beside `out`: resumed when its settings match, else made afresh."""
    work = out.parent / f".{out.name}.prepare"
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    if work.is_dir():
        try:
            same = json.loads((work / SETTINGS_FILE).read_text())["digest"] == digest
            state = json.loads((work / STATE_FILE).read_text())
        except (OSError, ValueError, KeyError):
            same, state = False, {}
        if same:
            state = {"done": [], "current": None, **state}
            done = len(state["done"])
            print(f"resuming the interrupted preparation in {work} ({done} of {len(settings['sources'])} sources "
                  "done)", file=sys.stderr)
            return work, state
        print(f"note: discarding an interrupted preparation with other settings in {work}", file=sys.stderr)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    atomic_write_json(work / SETTINGS_FILE, {"digest": digest, "settings": settings})
    return work, {"done": [], "current": None}


def _save_state(work: Path, state: dict) -> None:
    atomic_write_json(work / STATE_FILE, state)


def _bar(desc: str, total: int | None, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr, disable=not enabled)


def _sample(specs: list[SourceSpec], budget: int, bar: tqdm):
    """The texts of the weighted tokenizer sample: source i gives weight_i x B bytes, B the largest total for
    which no source must repeat (and at most `budget`); a known-size source is sampled evenly throughout."""
    sizes = [estimate_bytes(s.corpus) for s in specs]
    known = [size / s.weight for s, size in zip(specs, sizes) if size]
    total = min([budget, *known])
    for spec, size in zip(specs, sizes):
        want = spec.weight * total
        rate = want / size if size else 1.0
        rng, taken = random.Random(f"tokenizer-sample:{spec.name}"), 0
        for unit in iter_units(spec.corpus, text_field=spec.text_field, documents=spec.documents):
            if taken >= want:
                break
            if rate >= 1.0 or rng.random() < rate:
                taken += unit.num_bytes
                bar.update(unit.num_bytes)
                yield unit.text


def _tokenizer(work: Path, state: dict, specs: list[SourceSpec], tokenizer: str, vocab_size: int,
               sample_bytes: int, progress: bool):
    """Pass 1: the tokenizer saved in the work directory, else loaded from a path, else trained."""
    if state.get("tokenizer_file") and (work / state["tokenizer_file"]).is_file():
        return load_tokenizer(work / state["tokenizer_file"])
    if tokenizer not in ("bpe", "char"):
        tok = load_tokenizer(tokenizer)
    elif tokenizer == "char":  # every character must be seen: all the text, no sampling
        tok = train_char(u.text for s in specs for u in iter_units(s.corpus, text_field=s.text_field))
    else:
        with _bar("train bpe tokenizer", None, progress) as bar:
            tok = train_bpe(_sample(specs, sample_bytes, bar), vocab_size)
    state["tokenizer_file"] = tok.save(work).name
    _save_state(work, state)
    return tok


def _quality_filter(work: Path, specs: list[SourceSpec], cfg: QualityConfig) -> QualityFilter:
    """Pass 2: the quality filter saved in the work directory, else loaded, else trained and saved."""
    path = work / FILTER_FILE
    if path.is_file():
        return QualityFilter.load(path)
    if cfg.filter_path:
        qfilter = QualityFilter.load(cfg.filter_path)
    else:
        try:
            positives = sample_texts((u.text for u in iter_units(cfg.reference, text_field=cfg.text_field,
                                                                   documents=cfg.documents)),
                                     cfg.max_train_docs, cfg.seed)
        except GptforgeError as exc:
            raise GptforgeError(f"quality reference: {exc}") from None
        raw = (u.text for s in specs if s.quality_filter
               for u in iter_units(s.corpus, text_field=s.text_field, documents=s.documents))
        qfilter = train_filter(positives, sample_texts(raw, cfg.max_train_docs, cfg.seed + 1), seed=cfg.seed)
        print(f"quality filter: trained on {qfilter.info['positives']} reference and {qfilter.info['negatives']} "
              f"raw documents (training accuracy {qfilter.info['train_accuracy']:.3f})", file=sys.stderr)
    qfilter.save(path)
    return qfilter


def _encode(work: Path, state: dict, specs: list[SourceSpec], tok, qfilter, quality: QualityConfig | None,
            dedup: DedupConfig | None, val_fraction: float, shard_tokens: int, num_proc: int, progress: bool) -> dict:
    """Pass 3: every source through the pipeline; returns meta.json's content."""
    dtype = choose_dtype(tok.vocab_size)
    spec = WorkerSpec(str(work / state["tokenizer_file"]), dtype, dedup,
                      str(work / FILTER_FILE) if qfilter else None)
    executor = Executor(spec, num_proc)
    try:
        for i, src in enumerate(specs):
            if i < len(state["done"]):
                continue
            st = SourceState(**state["current"]) if state.get("current") else SourceState()
            with _bar(f"encode {src.name}", estimate_bytes(src.corpus), progress) as bar:
                def checkpoint(s: SourceState) -> None:
                    state["current"] = vars(s)
                    _save_state(work, state)

                written = [st.tokens]

                def advance(n_bytes: int, n_tokens: int, bar=bar, written=written) -> None:
                    bar.update(n_bytes)
                    written[0] += n_tokens
                    bar.set_postfix_str(f"{tqdm.format_sizeof(written[0])} tokens", refresh=False)

                ctx = PassContext(work, dtype, tok.eot_id, shard_tokens, dedup, qfilter, quality.seed if quality
                                  else 0, quality.alpha if quality else 0.0, executor, checkpoint, advance)
                st, shards = run_source(src, i, ctx, st)
            state["done"].append(_source_meta(src, st, shards, val_fraction))
            state["current"] = None
            _save_state(work, state)
    finally:
        executor.close()
    return _meta(state, tok, dtype, shard_tokens, val_fraction, dedup, qfilter, quality)


def _source_meta(src: SourceSpec, st: SourceState, shards: list[dict], val_fraction: float) -> dict:
    n_train = int(st.tokens * (1.0 - val_fraction))
    n_val = st.tokens - n_train
    if st.kept == 0 and st.documents:
        raise GptforgeError(f"source {src.name!r}: all {st.documents} documents were removed ({st.removed}); "
                            "loosen the dedup/quality settings or drop the source")
    if n_train < 1 or (val_fraction > 0 and n_val < 1):
        raise GptforgeError(f"source {src.name!r} is too small: {st.tokens} tokens cannot give a non-empty train "
                            f"split and, with val_fraction={val_fraction}, a non-empty val split; use more text "
                            "or val_fraction=0")
    return {"name": src.name, "corpus": src.corpus, "weight": src.weight, "units": src.documents,
            "text_field": src.text_field, "quality_filter": src.quality_filter,
            "documents": st.documents, "kept": st.kept, "removed": st.removed,
            "keep_rate": round(st.kept / max(1, st.documents), 6), "bytes": st.bytes,
            "replaced_bytes": st.replaced_bytes, "tokens": {"train": n_train, "val": n_val},
            "shards": shards, "dedup_examples": st.examples}


def _meta(state: dict, tok, dtype: str, shard_tokens: int, val_fraction: float, dedup, qfilter, quality) -> dict:
    sources = [{k: v for k, v in s.items() if k != "dedup_examples"} for s in state["done"]]
    return {
        "format_version": META_VERSION, "source": None, "tokenizer": tok.kind, "tokenizer_file": state["tokenizer_file"],
        "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "dtype": dtype, "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "documents": sum(s["documents"] for s in sources), "bytes": sum(s["bytes"] for s in sources),
        "replaced_bytes": sum(s["replaced_bytes"] for s in sources),
        "tokens": {k: sum(s["tokens"][k] for s in sources) for k in ("train", "val")},
        "sources": sources,
        "dedup": vars(dedup) if dedup else None,
        "quality": ({"filter_file": FILTER_FILE, "alpha": quality.alpha, "seed": quality.seed,
                     "reference": quality.reference, **qfilter.info} if qfilter else None),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
