"""Tokenizers: byte-level BPE (Hugging Face `tokenizers`) and a character-level tokenizer.

Both map any text to token ids and back with an exact round trip (`decode(encode(s)) == s`): no
normalizer, no prefix space, no cleanup on decode. `<|endoftext|>` is the one special token (the
end-of-text separator that `data.prepare` appends after each document); the same literal text inside
user text is ordinary text, encoded byte by byte, so only code that appends `eot_id` produces it.

`decode_bytes` returns the raw UTF-8 bytes of a token sequence, so a streaming printer can hold back
an incomplete multi-byte character instead of printing a replacement character.

This module depends only on `gptforge.errors`, `numpy` and `tokenizers`; nothing about models or data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from gptforge.errors import GptforgeError
from gptforge.utils.io import atomic_write_text

EOT_TEXT = "<|endoftext|>"
BPE_FILE = "tokenizer.json"
CHAR_FILE = "char_tokenizer.json"
MIN_BPE_VOCAB_SIZE = 257  # 256 byte tokens + <|endoftext|>

# Long texts are cut into pieces of at most this many characters before encoding, so one huge
# document still spreads over all cores and the trainer's input buffer stays small.
_PIECE_CHARS = 32_768


def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: each byte 0..255 maps to one printable Unicode character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _byte_to_unicode().items()}


def _split_text(text: str, max_chars: int = _PIECE_CHARS) -> list[str]:
    """Cut `text` into pieces of at most about `max_chars` characters at pre-token boundaries.

    A cut goes just before a space or newline that follows a non-whitespace character. The GPT-2
    pre-tokenizer regex never joins such a pair into one pre-token, so encoding the pieces gives
    exactly the ids of encoding the whole text. Only text with no such position in a half-window
    (e.g. one 16k-character word) is cut blindly, which still round-trips exactly.
    """
    if len(text) <= max_chars:
        return [text]
    pieces: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        lo, hi = start + max_chars // 2, start + max_chars
        cut = hi
        while hi > lo:
            j = max(text.rfind(" ", lo, hi), text.rfind("\n", lo, hi))
            if j <= lo:
                break
            if not text[j - 1].isspace():
                cut = j
                break
            hi = j
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


class BPETokenizer:
    """Byte-level BPE over the full 256-byte alphabet, with `<|endoftext|>` as its special token.

    Attributes:
        kind: "bpe".
        vocab_size: number of token ids (max id + 1), including `<|endoftext|>`.
        eot_id: id of `<|endoftext|>`.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap a byte-level BPE `tokenizers.Tokenizer` (use `train_bpe` or `load_tokenizer` instead).

        Raises:
            GptforgeError: the tokenizer lacks `<|endoftext|>` or has tokens outside the byte alphabet.
        """
        eot_id = tokenizer.token_to_id(EOT_TEXT)
        if eot_id is None:
            raise GptforgeError(f"tokenizer has no {EOT_TEXT!r} token; gptforge needs it as the end-of-text separator")
        tokenizer.encode_special_tokens = True  # literal "<|endoftext|>" in text stays ordinary text
        self._tok = tokenizer
        self.eot_id: int = eot_id
        added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1
        table: list[bytes | None] = [None] * self.vocab_size
        for token, i in vocab.items():
            if i in added:
                table[i] = added[i].encode("utf-8")
                continue
            try:
                table[i] = bytes(_UNICODE_TO_BYTE[c] for c in token)
            except KeyError:
                raise GptforgeError(
                    f"token {token!r} (id {i}) is not in the byte-level alphabet; only byte-level BPE is supported"
                ) from None
        self._bytes = table

    def encode(self, text: str) -> list[int]:
        """Encode text to token ids; `<|endoftext|>` in `text` is ordinary text, never `eot_id`."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts in parallel on all cores (the library's thread pool).

        Args:
            texts: the texts; long ones are cut at pre-token boundaries first (same ids, more parallelism).

        Returns:
            One list of token ids per text.
        """
        pieces: list[str] = []
        counts: list[int] = []
        for text in texts:
            parts = _split_text(text)
            pieces.extend(parts)
            counts.append(len(parts))
        encodings = self._tok.encode_batch_fast(pieces, add_special_tokens=False)
        out: list[list[int]] = []
        k = 0
        for n in counts:
            if n == 1:
                out.append(encodings[k].ids)
            else:
                out.append([i for e in encodings[k : k + n] for i in e.ids])
            k += n
        return out

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (`<|endoftext|>`'s are the UTF-8 bytes of its text).

        Raises:
            GptforgeError: `token_id` is not in [0, vocab_size).
        """
        if not 0 <= token_id < self.vocab_size or self._bytes[token_id] is None:
            raise GptforgeError(f"token id {token_id} is out of range; allowed: 0..{self.vocab_size - 1}")
        return self._bytes[token_id]  # type: ignore[return-value]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenate the raw bytes of `ids` (may end inside a multi-byte UTF-8 character)."""
        table = self._bytes
        try:
            return b"".join([table[i] for i in ids])  # type: ignore[misc]
        except (IndexError, TypeError):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size or table[i] is None)
            raise GptforgeError(f"token id {bad} is out of range; allowed: 0..{self.vocab_size - 1}") from None

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text; bytes that do not form valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` (Hugging Face format) into `directory` atomically; return its path."""
        return atomic_write_text(Path(directory) / BPE_FILE, self._tok.to_str(pretty=True))


class CharTokenizer:
    """Character-level tokenizer: ids are the sorted training characters, then `<|endoftext|>`.

    Attributes:
        kind: "char".
        chars: the vocabulary characters in id order (without `<|endoftext|>`).
        vocab_size: len(chars) + 1.
        eot_id: len(chars), the last id.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        """Build from a set of single characters (sorted and de-duplicated here)."""
        self.chars: list[str] = sorted(set(chars))
        if any(len(c) != 1 for c in self.chars):
            raise GptforgeError("char tokenizer vocabulary entries must be single characters")
        self.eot_id: int = len(self.chars)
        self.vocab_size: int = len(self.chars) + 1
        self._bytes = [c.encode("utf-8", errors="surrogatepass") for c in self.chars] + [EOT_TEXT.encode()]
        codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)
        size = int(codepoints.max()) + 1 if len(codepoints) else 1
        self._lookup = np.full(size, -1, dtype=np.int32)  # codepoint -> id, -1 if unknown
        self._lookup[codepoints] = np.arange(len(codepoints), dtype=np.int32)

    def encode_array(self, text: str) -> np.ndarray:
        """Encode `text` to an int32 numpy array of ids (the fast path for data preparation).

        Raises:
            GptforgeError: `text` contains a character outside the vocabulary.
        """
        cps = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        in_range = cps < len(self._lookup)
        ids = np.where(in_range, self._lookup[np.where(in_range, cps, 0)], -1)
        if len(ids) and ids.min() < 0:
            bad = chr(int(cps[int(np.argmax(ids < 0))]))
            raise GptforgeError(
                f"character {bad!r} is not in the vocabulary; this tokenizer is character-level, "
                f"trained on a set of {len(self.chars)} chars"
            )
        return ids

    def encode(self, text: str) -> list[int]:
        """Encode text to ids, one per character; raises GptforgeError for an unknown character."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts (same ids as `encode` on each)."""
        return [self.encode(t) for t in texts]

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes of one token; raises GptforgeError if `token_id` is out of range."""
        if not 0 <= token_id < self.vocab_size:
            raise GptforgeError(f"token id {token_id} is out of range; allowed: 0..{self.vocab_size - 1}")
        return self._bytes[token_id]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Concatenate the UTF-8 bytes of `ids`."""
        return b"".join([self.token_bytes(i) for i in ids])

    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids to text."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `char_tokenizer.json` ({"type": "char", "chars": [...]}) atomically; return its path."""
        return atomic_write_text(Path(directory) / CHAR_FILE, json.dumps({"type": "char", "chars": self.chars}))


def _new_bpe(model: models.BPE) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    # The trainer buffers a few hundred items at a time, so feed it small pieces, not 1 MB chunks.
    for text in texts:
        yield from _split_text(text)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE tokenizer, streaming over `texts` (the corpus is never held in memory).

    Args:
        texts: an iterable of texts (documents or chunks of them), consumed once.
        vocab_size: target number of tokens including the 256 byte tokens and `<|endoftext|>`;
            a corpus too small to learn that many merges gives a smaller real `vocab_size`.

    Returns:
        The trained tokenizer.

    Raises:
        GptforgeError: `vocab_size` < 257.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_BPE_VOCAB_SIZE:
        raise GptforgeError(
            f"vocab_size must be an integer >= {MIN_BPE_VOCAB_SIZE} (256 bytes + {EOT_TEXT}), got {vocab_size!r}"
        )
    tok = _new_bpe(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[AddedToken(EOT_TEXT, special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_pieces(texts), trainer=trainer)
    return BPETokenizer(tok)


def train_char(texts: Iterable[str]) -> CharTokenizer:
    """Build a character-level tokenizer from every character seen in `texts` (streamed once).

    Raises:
        GptforgeError: the texts contain no characters.
    """
    chars: set[str] = set()
    for text in texts:
        chars.update(text)
    if not chars:
        raise GptforgeError("cannot train a char tokenizer on empty text; give a corpus with at least one character")
    return CharTokenizer(chars)


def load_tokenizer(path: str | os.PathLike) -> BPETokenizer | CharTokenizer:
    """Load a tokenizer saved by gptforge (or a GPT-2 style `vocab.json` + `merges.txt`).

    Args:
        path: a directory holding `tokenizer.json`, `char_tokenizer.json`, or `vocab.json` + `merges.txt`
            (looked for in that order), or the path of a tokenizer JSON file itself.

    Returns:
        A `BPETokenizer` or `CharTokenizer`.

    Raises:
        GptforgeError: nothing loadable at `path`, a corrupt file, or a tokenizer without `<|endoftext|>`.
    """
    p = Path(path)
    if p.is_dir():
        if (p / BPE_FILE).is_file():
            p = p / BPE_FILE
        elif (p / CHAR_FILE).is_file():
            p = p / CHAR_FILE
        elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            return _load_gpt2_pair(p / "vocab.json", p / "merges.txt")
        else:
            raise GptforgeError(
                f"no tokenizer in {p} (expected {BPE_FILE}, {CHAR_FILE}, or vocab.json + merges.txt)"
            )
    elif not p.is_file():
        raise GptforgeError(f"tokenizer not found: {p} (expected a directory or a tokenizer JSON file)")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptforgeError(f"cannot read tokenizer file {p}: {str(exc).splitlines()[0]}") from None
    if isinstance(data, dict) and data.get("type") == "char":
        chars = data.get("chars")
        if not isinstance(chars, list) or not chars or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise GptforgeError(f"corrupt char tokenizer file {p}: 'chars' must be a non-empty list of characters")
        return CharTokenizer(chars)
    if not isinstance(data, dict) or "model" not in data:
        raise GptforgeError(f"{p} is not a tokenizer file (expected Hugging Face tokenizer.json or gptforge char JSON)")
    if (data.get("decoder") or {}).get("type") != "ByteLevel" or data["model"].get("type") != "BPE":
        raise GptforgeError(f"{p}: only byte-level BPE tokenizers (ByteLevel decoder, BPE model) are supported")
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises plain Exception for malformed files
        raise GptforgeError(f"corrupt tokenizer file {p}: {str(exc).splitlines()[0]}") from None
    if tok.token_to_id(EOT_TEXT) is None:
        raise GptforgeError(f"tokenizer file {p} has no {EOT_TEXT!r} token; gptforge needs it as end-of-text")
    return BPETokenizer(tok)


def _load_gpt2_pair(vocab: Path, merges: Path) -> BPETokenizer:
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as exc:
        raise GptforgeError(f"cannot read {vocab} + {merges}: {str(exc).splitlines()[0]}") from None
    tok = _new_bpe(model)
    tok.add_special_tokens([AddedToken(EOT_TEXT, special=True, normalized=False)])
    return BPETokenizer(tok)


