"""GPT-2 tokenizer files: write a gptforge BPE tokenizer for transformers, read a GPT-2 tokenizer for gptforge.

A gptforge BPE tokenizer is GPT-2's tokenizer with another vocabulary: byte-level BPE, GPT-2's pre-tokenizer
regex, no normalizer, no prefix space, `<|endoftext|>` as the special token. Exporting writes the files
transformers reads (`tokenizer.json` for the fast tokenizer, `vocab.json` + `merges.txt` for the classic
format, `tokenizer_config.json`, `special_tokens_map.json`), so `AutoTokenizer.from_pretrained` gives the same
ids. One documented difference: transformers treats the literal text `<|endoftext|>` as the special token,
gptforge as ordinary text (see `gptforge.tokenizer`). A character-level tokenizer has no GPT-2 form.

Depends on `gptforge.tokenizer` and `gptforge.utils.io`; never imports transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOT_TEXT, BPETokenizer, load_tokenizer
from gptforge.utils.io import atomic_write_json, atomic_write_text


def export_tokenizer(tokenizer: BPETokenizer, out_dir: Path, *, context_length: int) -> None:
    """Write the GPT-2 tokenizer files for `tokenizer` into `out_dir`.

    Raises:
        GptforgeError: `tokenizer` is not byte-level BPE.
    """
    if getattr(tokenizer, "kind", None) != "bpe":
        raise GptforgeError(f"a {getattr(tokenizer, 'kind', '?')}-level tokenizer has no GPT-2 form (GPT-2 "
                            f"tokenizers are byte-level BPE)")
    out_dir = Path(out_dir)
    data = json.loads(tokenizer.save(out_dir).read_text(encoding="utf-8"))  # tokenizer.json
    vocab = dict(data["model"]["vocab"])
    for added in data.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    atomic_write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    atomic_write_json(out_dir / "special_tokens_map.json", special)
    atomic_write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer",
        **special,
        "add_prefix_space": False,
        "add_bos_token": False,
        # Exact round trips: no " ," -> "," style clean-up when decoding.
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": context_length,
        "added_tokens_decoder": {
            str(added["id"]): {key: added[key] for key in ("content", "lstrip", "normalized", "rstrip",
                                                          "single_word", "special")}
            for added in data.get("added_tokens", [])
        },
    })


def import_tokenizer(src: Path) -> tuple[BPETokenizer, Path]:
    """Load the tokenizer of a GPT-2 checkpoint directory: `tokenizer.json`, else `vocab.json` + `merges.txt`.

    Returns:
        The tokenizer and the file it came from (for error messages).

    Raises:
        GptforgeError: no tokenizer, half of the vocab.json/merges.txt pair, a corrupt file, or settings that
            break gptforge's exact round trip (a normalizer, a prefix space, a pre-tokenizer other than GPT-2's).
    """
    src = Path(src)
    _check_tokenizer_config(src / "tokenizer_config.json")
    if (src / "tokenizer.json").is_file():
        path = src / "tokenizer.json"
        _check_tokenizer_json(path)
    else:
        pair = [src / "vocab.json", src / "merges.txt"]
        present = [p for p in pair if p.is_file()]
        if not present:
            raise GptforgeError(f"no tokenizer in {src} (expected tokenizer.json, or vocab.json + merges.txt)")
        if len(present) == 1:
            missing = next(p for p in pair if not p.is_file())
            raise GptforgeError(f"missing tokenizer file {missing} ({present[0].name} needs it)")
        path = pair[0]
    tokenizer = load_tokenizer(path if path.name == "tokenizer.json" else src)
    if not isinstance(tokenizer, BPETokenizer):
        raise GptforgeError(f"{path} is not a byte-level BPE tokenizer")
    return tokenizer, path


def _check_tokenizer_json(path: Path) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptforgeError(f"corrupt tokenizer file {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise GptforgeError(f"{path} is not a Hugging Face tokenizer.json")
    pre = data.get("pre_tokenizer") or {}
    problems = []
    if data.get("normalizer") is not None:
        problems.append(f"a normalizer ({data['normalizer'].get('type')})")
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True):
        problems.append(f"pre-tokenizer {pre.get('type')!r} (GPT-2's is ByteLevel with its regex)")
    elif pre.get("add_prefix_space"):
        problems.append("add_prefix_space true")
    if problems:
        raise GptforgeError(f"{path}: unsupported tokenizer settings: {'; '.join(problems)} (gptforge needs GPT-2's "
                            f"byte-level BPE with exact round trips)")


def _check_tokenizer_config(path: Path) -> None:
    if not path.is_file():
        return
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptforgeError(f"corrupt tokenizer config {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and data.get("add_prefix_space"):
        raise GptforgeError(f"{path}: add_prefix_space true is not supported (gptforge encodes text exactly as "
                            f"given)")
