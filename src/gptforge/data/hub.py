"""Hugging Face hub datasets as corpus sources: `hf:NAME[:CONFIG][:SPLIT]`, streamed with `datasets`.

Before streaming, the hub endpoint ($HF_ENDPOINT or huggingface.co) is probed with a short timeout, so an
offline machine gets one clear line instead of minutes of retries; with HF_HUB_OFFLINE=1 the probe is
skipped and `datasets` reads its local cache. Depends on `gptforge.errors` and `data.sources.Document`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from gptforge.data.sources import HF_PREFIX, Document
from gptforge.errors import GptforgeError

_HF_PROBE_TIMEOUT_S = 5.0


def parse_hf(source: str) -> tuple[str, str | None, str]:
    parts = source[len(HF_PREFIX):].split(":")
    if not parts[0] or len(parts) > 3 or any(not p for p in parts):
        raise GptforgeError(f"bad Hugging Face source {source!r}; expected hf:NAME, hf:NAME:CONFIG or "
                            "hf:NAME:CONFIG:SPLIT (e.g. hf:wikitext:wikitext-103-raw-v1:train)")
    return parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached (a short reason), or None when it answers; skipped in offline mode."""
    import socket
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or \
            os.environ.get("HF_DATASETS_OFFLINE", "").lower() in ("1", "true", "yes"):
        return None  # the user asked for the local cache: let `datasets` look there
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=_HF_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return f"{url.hostname}:{port}: {exc.strerror or exc}"
    return None


def iter_hf(source: str, text_field: str) -> Iterator[Document]:
    """Stream a hub dataset's records (`datasets.load_dataset(..., streaming=True)`), one document each."""
    name, config, split = parse_hf(source)
    reason = _hub_unreachable()
    if reason:
        raise GptforgeError(f"cannot reach the Hugging Face hub for {source} ({reason}); connect to the network, "
                            "or set HF_HUB_OFFLINE=1 to read a copy from the local datasets cache")
    import datasets  # lazy: heavy import

    try:
        dataset = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, record in enumerate(dataset):
            if text_field not in record:
                fields = ", ".join(sorted(record)) or "(none)"
                raise GptforgeError(f"{source} has no field {text_field!r}; available fields: {fields}")
            text = record[text_field]
            if isinstance(text, str):
                yield Document(f"{source}#{i}", text, True, len(text.encode("utf-8", errors="surrogatepass")), 0)
    except GptforgeError:
        raise
    except Exception as exc:  # hub, network and format errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GptforgeError(f"cannot load {source} from the Hugging Face hub: {first}") from None
