"""Documents as units for deduplication, quality filtering and training: whole, lines, or paragraphs.

`iter_units(source, documents=...)`: `file` keeps each document of `sources.iter_documents` whole (a large
text file still comes in ~1 MB chunks), `lines` makes every non-blank line a unit, `paragraphs` every run of
non-blank lines (blank lines separate paragraphs, as in WikiText and Tiny Shakespeare). Each unit is followed
by `<|endoftext|>` in the token stream, so the choice also sets where documents end for training.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from gptforge.data.sources import CHUNK_BYTES, Document, iter_documents
from gptforge.errors import GptforgeError

DOCUMENT_UNITS = ("file", "lines", "paragraphs")


def iter_units(source: str | os.PathLike, *, text_field: str = "text", documents: str = "file") -> Iterator[Document]:
    """The documents of a source cut into units (`DOCUMENT_UNITS`): whole documents, lines, or paragraphs.

    A `lines`/`paragraphs` unit is one `Document` (is_last_chunk=True) without its trailing newline, named
    `name#k` for the k-th unit of a document; blank units are skipped. A paragraph longer than 4 MB with no
    blank line is emitted in pieces (is_last_chunk=False until its end). `num_bytes` of the input is
    attributed to units as they are cut, so the sum over units equals the input size.

    Raises:
        GptforgeError: `documents` is not one of DOCUMENT_UNITS, or as `iter_documents`.
    """
    if documents not in DOCUMENT_UNITS:
        raise GptforgeError(f"documents must be one of {', '.join(DOCUMENT_UNITS)}; got {documents!r}")
    docs = iter_documents(source, text_field=text_field)
    if documents == "file":
        yield from docs
        return
    pending, pending_bytes, pending_replaced, k = "", 0, 0, 0
    for doc in docs:
        pending += doc.text
        pending_bytes += doc.num_bytes
        pending_replaced += doc.replaced_bytes
        units, pending = _cut_units(pending, documents, final=doc.is_last_chunk)
        for text in units:
            yield Document(f"{doc.name}#{k}", text, True, pending_bytes, pending_replaced)
            pending_bytes = pending_replaced = 0
            k += 1
        if not doc.is_last_chunk and len(pending) > 4 * CHUNK_BYTES:  # one endless paragraph: pass it on in pieces
            yield Document(f"{doc.name}#{k}", pending, False, pending_bytes, pending_replaced)
            pending, pending_bytes, pending_replaced = "", 0, 0
        if doc.is_last_chunk:
            if pending_bytes:  # the bytes of blank lines after the last unit, on an empty marker unit
                yield Document(f"{doc.name}#end", "", True, pending_bytes, pending_replaced)
            pending, pending_bytes, pending_replaced, k = "", 0, 0, 0


def _cut_units(text: str, documents: str, *, final: bool) -> tuple[list[str], str]:
    """Complete units in `text` and the unfinished rest (everything, if `final`, is complete)."""
    lines = text.split("\n")
    rest = "" if final else lines.pop()  # the text after the last newline may continue in the next chunk
    if documents == "lines":
        return [line for line in lines if line.strip()], rest
    units, block = [], []
    for line in lines:
        if line.strip():
            block.append(line)
        elif block:
            units.append("\n".join(block))
            block = []
    if block:
        if final:
            units.append("\n".join(block))
        else:
            rest = "\n".join(block) + "\n" + rest
    return units, rest
