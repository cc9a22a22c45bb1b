"""`gptforge prepare`: corpus -> tokenizer + token files."""

from __future__ import annotations

import argparse


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize a corpus into train/val token files plus the tokenizer and meta.json."""
    from gptforge.data.prepare import prepare

    meta = prepare(args.corpus, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, text_field=args.text_field, progress=not args.quiet)
    print(f"prepared {meta['documents']} documents, {meta['bytes']:,} bytes -> {meta['tokens']['train']:,} train "
          f"+ {meta['tokens']['val']:,} val tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}, "
          f"{meta['dtype']}) in {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help=cmd_prepare.__doc__, description=cmd_prepare.__doc__)
    p.add_argument("--corpus", required=True, help="text file, folder, glob, .jsonl/.parquet file, "
                   "'shakespeare' or 'python-stdlib'")
    p.add_argument("--tokenizer", default="bpe", help="bpe, char, or a path to an existing tokenizer (default bpe)")
    p.add_argument("--vocab_size", type=int, default=8192, help="BPE vocabulary size incl. <|endoftext|> (8192)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of tokens held out (0.1)")
    p.add_argument("--text_field", default="text", help="record field holding the text, for .jsonl/.parquet")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_prepare, overrides=False)
