"""The last steps of `prepare`: the dedup report, and moving finished files into the data directory.

`install` moves shards, tokenizer and filter from the work directory into `out_dir`, removing the old
`meta.json` first and writing the new one last, so the directory looks complete only once it is; it replaces
only files an earlier `prepare` listed (or gptforge's fixed file names), never a user's other files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from gptforge.data.dedup import DedupConfig, jaccard
from gptforge.data.mixture import SourceSpec
from gptforge.data.quality import FILTER_FILE
from gptforge.data.shards import META_FILE, SHARD_DIR, V1_FILES
from gptforge.data.units import iter_units
from gptforge.tokenizer import BPE_FILE, CHAR_FILE
from gptforge.utils.io import atomic_write_text

WORK_ONLY = ("state.json", "settings.json")  # prepare.STATE_FILE, prepare.SETTINGS_FILE


def write_report(path: Path, specs: list[SourceSpec], state: dict, cfg: DedupConfig) -> None:
    """Example duplicate pairs as JSON lines: source, kind, both documents' names and excerpts, similarity."""
    lines = []
    for spec, done in zip(specs, state["done"]):
        examples = done.get("dedup_examples") or []
        wanted = {i for e in examples for i in (e["removed"], e["kept"])}
        found: dict[int, tuple[str, str]] = {}
        for k, unit in enumerate(iter_units(spec.corpus, text_field=spec.text_field, documents=spec.documents)):
            if k in wanted:
                found[k] = (unit.name, unit.text)
                if len(found) == len(wanted):
                    break
        for e in examples:
            kept, removed = found.get(e["kept"], ("?", "")), found.get(e["removed"], ("?", ""))
            lines.append(json.dumps({
                "source": spec.name, "kind": e["kind"], "estimated_jaccard": e["estimated_jaccard"],
                "jaccard": round(jaccard(kept[1], removed[1], cfg.shingle), 4),
                "kept": {"index": e["kept"], "name": kept[0], "text": kept[1][:300]},
                "removed": {"index": e["removed"], "name": removed[0], "text": removed[1][:300]}}))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def _own_files(meta: dict) -> list[str]:
    """The files an earlier prepare wrote into a data directory (relative paths), from its meta.json."""
    files = [*V1_FILES, BPE_FILE, CHAR_FILE, FILTER_FILE]
    for src in meta.get("sources") or []:
        files += [s["file"] for s in src.get("shards", []) if isinstance(s, dict) and isinstance(s.get("file"), str)]
    return files


def install(work: Path, out: Path, meta: dict) -> None:
    """Move the finished files from `work` into `out`, removing the old `meta.json` first and writing the new
    one last, so `out` looks complete only once it is; then remove the work directory."""
    for name in WORK_ONLY:
        (work / name).unlink(missing_ok=True)
    for rows in work.glob("dedup_*.rows"):
        rows.unlink()
    if not out.exists():
        os.chmod(work, 0o755)
        try:
            os.rename(work, out)  # one atomic step when out_dir is new
            return
        except OSError:
            pass  # created meanwhile: fall back to moving file by file
    out.mkdir(parents=True, exist_ok=True)
    old = {}
    if (out / META_FILE).is_file():
        try:
            old = json.loads((out / META_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = {}
    (out / META_FILE).unlink(missing_ok=True)
    for rel in _own_files(old if isinstance(old, dict) else {}):
        (out / rel).unlink(missing_ok=True)
    for folder in sorted((out / SHARD_DIR).glob("*"), reverse=True) if (out / SHARD_DIR).is_dir() else []:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    new = [meta["tokenizer_file"], *([FILTER_FILE] if meta.get("quality") else []),
           *(s["file"] for src in meta["sources"] for s in src["shards"])]
    for rel in new:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(work / rel, out / rel)
    os.replace(work / META_FILE, out / META_FILE)
    shutil.rmtree(work, ignore_errors=True)
