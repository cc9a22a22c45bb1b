"""Weighted corpus mixtures (Brown et al. 2020, Table 2.2): the `--mixture MIX.yaml` file and its sources.

A mixture file names each source, the corpus it reads (anything `prepare --corpus` accepts) and its weight,
the fraction of training windows drawn from it (not its share of the tokens):

    sources:
      ptb:
        corpus: ptb.train.txt          # relative paths are relative to this file's folder
        weight: 0.4
        documents: lines               # optional: file (default), lines, paragraphs
      wikitext:
        corpus: "wikitext-2/wiki.*.tokens"
        weight: 0.3
        documents: paragraphs
        quality_filter: true           # optional: apply the quality filter to this source (default false)
      shakespeare: {corpus: shakespeare, weight: 0.2}
      code: {corpus: python-stdlib, weight: 0.1, text_field: text}

Weights must be positive; weights that do not sum to 1 are normalised (and a note says so). Depends on
`data.sources`/`data.units` and PyYAML only.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from gptforge.data.sources import HF_PREFIX, NAMED_CORPORA, check_source
from gptforge.data.units import DOCUMENT_UNITS
from gptforge.errors import GptforgeError

SOURCE_KEYS = ("corpus", "weight", "documents", "text_field", "quality_filter")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class SourceSpec:
    """One source of a corpus mixture.

    Attributes:
        name: identifies the source in meta.json, shard folders and logs ([A-Za-z0-9_.-], at most 64 chars).
        corpus: a corpus as `prepare --corpus` takes it (path, glob, named corpus, hf:NAME...).
        weight: fraction of training windows drawn from this source (the weights sum to 1).
        documents: units: "file", "lines" or "paragraphs" (see `data.units`).
        text_field: the record field holding the text, for .jsonl/.parquet/hf: sources.
        quality_filter: apply the quality filter to this source.
    """

    name: str
    corpus: str
    weight: float
    documents: str = "file"
    text_field: str = "text"
    quality_filter: bool = False


def _fail(where: str, what: str) -> GptforgeError:
    return GptforgeError(f"{where}: {what}")


def _resolve(corpus: str, base: Path) -> str:
    if corpus in NAMED_CORPORA or corpus.startswith(HF_PREFIX) or os.path.isabs(corpus):
        return corpus
    return str(base / corpus)


def _source(name, entry, base: Path, where: str) -> SourceSpec:
    at = f"{where}: source {name!r}"
    if not isinstance(name, str) or not _NAME.match(name):
        raise _fail(where, f"source name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ . - "
                           "(it names the shard folder)")
    if not isinstance(entry, dict):
        raise _fail(at, "must be a mapping with keys corpus and weight")
    for key in entry:
        if key not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _fail(at, f"unknown key {key!r}{hint}; allowed: {', '.join(SOURCE_KEYS)}")
    corpus = entry.get("corpus")
    if not isinstance(corpus, str) or not corpus:
        raise _fail(at, "needs `corpus:` (a file, folder, glob, .jsonl/.parquet, hf:NAME, or "
                        f"{' / '.join(NAMED_CORPORA)})")
    weight = entry.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise _fail(at, f"weight must be a positive number, got {weight!r}")
    documents = entry.get("documents", "file")
    if documents not in DOCUMENT_UNITS:
        raise _fail(at, f"documents must be one of {', '.join(DOCUMENT_UNITS)}, got {documents!r}")
    text_field = entry.get("text_field", "text")
    quality = entry.get("quality_filter", False)
    if not isinstance(text_field, str) or not isinstance(quality, bool):
        raise _fail(at, "text_field must be a string and quality_filter true or false")
    corpus = _resolve(corpus, base)
    try:
        check_source(corpus)
    except GptforgeError as exc:
        raise _fail(at, str(exc)) from None
    return SourceSpec(name, corpus, float(weight), documents, text_field, quality)


def load_mixture(path: str | os.PathLike) -> tuple[list[SourceSpec], str | None]:
    """Read and check a mixture file.

    Returns:
        (the sources in file order with weights normalised to sum to 1, a note when they had to be
        normalised, else None).

    Raises:
        GptforgeError: the file is missing or not YAML; no sources; a source with an unknown key, no corpus,
            a corpus that does not exist, a zero, negative or non-numeric weight, or bad documents.
    """
    import yaml

    path = Path(path)
    where = f"mixture file {path}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"{where} not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise _fail(where, f"not readable YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or set(data) != {"sources"} or not isinstance(data["sources"], dict) \
            or not data["sources"]:
        raise _fail(where, "expected one top-level key `sources:` mapping each source name to "
                           "{corpus: ..., weight: ...}")
    specs = [_source(name, entry, path.parent, where) for name, entry in data["sources"].items()]
    total = sum(s.weight for s in specs)
    note = None
    if abs(total - 1.0) > 1e-9:
        specs = [SourceSpec(s.name, s.corpus, s.weight / total, s.documents, s.text_field, s.quality_filter)
                 for s in specs]
        note = (f"mixture weights sum to {total:g}, not 1; normalised to "
                + ", ".join(f"{s.name} {s.weight:.4g}" for s in specs))
    return specs, note


def single_source(corpus: str, *, documents: str = "file", text_field: str = "text",
                  quality_filter: bool = False) -> list[SourceSpec]:
    """The one-source "mixture" of a plain `prepare --corpus` (named `corpus`, weight 1)."""
    if documents not in DOCUMENT_UNITS:
        raise GptforgeError(f"documents must be one of {', '.join(DOCUMENT_UNITS)}, got {documents!r}")
    return [SourceSpec("corpus", corpus, 1.0, documents, text_field, quality_filter)]
