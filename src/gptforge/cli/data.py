"""`gptforge prepare` (corpus or mixture -> tokenizer + token shards) and `gptforge contamination`."""

from __future__ import annotations

import argparse
import sys
import time

from gptforge.errors import GptforgeError


def _sample_bytes(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes (e.g. 1e9), got {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return int(value)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize a corpus, or a weighted mixture of corpora, into token shards plus the tokenizer and meta.json;
    optionally deduplicate and quality-filter the documents. Re-run the same command to resume an interrupted
    run; a finished one is replaced only with --overwrite."""
    from gptforge.data.dedup import DedupConfig
    from gptforge.data.prepare import prepare
    from gptforge.data.quality import QualityConfig

    if args.dedup_report and args.dedup == "none":
        raise GptforgeError("--dedup_report needs --dedup exact or --dedup fuzzy")
    dedup = None if args.dedup == "none" else DedupConfig(
        fuzzy=args.dedup == "fuzzy", threshold=args.dedup_threshold, num_perm=args.dedup_num_perm,
        shingle=args.dedup_shingle)
    quality = None
    if args.quality_reference or args.quality_filter:
        quality = QualityConfig(reference=args.quality_reference, documents=args.documents,
                                text_field=args.text_field, filter_path=args.quality_filter,
                                alpha=args.quality_alpha, seed=args.seed)
    start = time.perf_counter()
    meta = prepare(args.corpus, args.out, mixture=args.mixture, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, text_field=args.text_field, documents=args.documents,
                   num_proc=args.num_proc, shard_tokens=args.shard_tokens,
                   tokenizer_sample_bytes=args.tokenizer_sample_bytes, dedup=dedup, quality=quality,
                   dedup_report=args.dedup_report, progress=not args.quiet, overwrite=args.overwrite)
    seconds = time.perf_counter() - start
    _print_table(meta)
    print(f"prepared {meta['documents']} documents, {meta['bytes']:,} bytes -> {meta['tokens']['train']:,} train "
          f"+ {meta['tokens']['val']:,} val tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}, "
          f"{meta['dtype']}) in {args.out} ({seconds:.1f} s, {meta['bytes'] / 1e6 / max(seconds, 1e-9):.2f} MB/s)")
    if args.dedup_report:
        print(f"dedup report: {args.dedup_report}")
    return 0


def _print_table(meta: dict) -> None:
    sources = meta["sources"]
    if len(sources) == 1 and not meta.get("dedup") and not meta.get("quality"):
        return
    print(f"{'source':<16} {'weight':>6} {'documents':>10} {'kept':>10} {'keep %':>7} {'quality':>8} {'exact':>8} "
          f"{'near':>8} {'train tokens':>13} {'val tokens':>11} {'shards':>6}")
    for s in sources:
        r = s["removed"]
        print(f"{s['name']:<16} {s['weight']:>6.3f} {s['documents']:>10,} {s['kept']:>10,} {100 * s['keep_rate']:>7.2f} "
              f"{r['quality']:>8,} {r['exact_duplicate']:>8,} {r['near_duplicate']:>8,} {s['tokens']['train']:>13,} "
              f"{s['tokens']['val']:>11,} {len(s['shards']):>6}")


def cmd_contamination(args: argparse.Namespace) -> int:
    """Find the evaluation items that share a 13-gram with the training data (GPT-3 section 4 and Appendix C):
    report the dirty fraction per task and write the clean item ids for `gptforge eval --clean_only FILE`."""
    from gptforge.data.contamination import load_task_items, run_contamination
    from gptforge.data.shards import load_meta

    load_meta(args.data)  # a bad data directory fails before the benchmark files are read
    tasks = [t for t in (args.tasks or "").split(",") if t] or None
    items = load_task_items(tasks, args.data_dir)
    report = run_contamination(args.data, items, out=args.out, n=args.ngram, progress=not args.quiet,
                               report_path=args.report)
    print(f"{'task':<16} {'items':>7} {'dirty':>7} {'dirty %':>8} {'too short':>10}")
    for task, r in report["tasks"].items():
        print(f"{task:<16} {r['items']:>7,} {r['dirty']:>7,} {100 * r['dirty_fraction']:>8.2f} {r['too_short']:>10,}")
    print(f"scanned {report['training_tokens']:,} training tokens ({report['seconds']:.1f} s); clean item ids "
          f"written to {args.out}", file=sys.stdout)
    return 0


def register(sub) -> None:
    p = sub.add_parser("prepare", help=cmd_prepare.__doc__, description=cmd_prepare.__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--corpus", help="text file, folder, glob, .jsonl/.parquet file, hf:NAME[:CONFIG][:SPLIT], "
                      "'shakespeare' or 'python-stdlib'")
    what.add_argument("--mixture", help="YAML file of weighted sources (see docs/data.md)")
    p.add_argument("--tokenizer", default="bpe", help="bpe, char, or a path to an existing tokenizer (default bpe)")
    p.add_argument("--vocab_size", type=int, default=8192, help="BPE vocabulary size incl. <|endoftext|> (8192)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of each source's tokens held "
                   "out (0.1)")
    p.add_argument("--text_field", default="text", help="record field holding the text, for .jsonl/.parquet/hf:")
    p.add_argument("--documents", default="file", choices=("file", "lines", "paragraphs"),
                   help="document units of --corpus and of --quality_reference (file)")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--num_proc", type=int, default=None, help="worker processes (default: all usable cores)")
    p.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard file (100M)")
    p.add_argument("--tokenizer_sample_bytes", type=_sample_bytes, default=1_000_000_000,
                   help="at most this much text trains the BPE tokenizer, drawn from the sources by weight (1e9)")
    p.add_argument("--dedup", default="none", choices=("none", "exact", "fuzzy"),
                   help="remove duplicate documents within each source: exact (normalised text), fuzzy (exact "
                   "plus MinHash LSH near duplicates) (none)")
    p.add_argument("--dedup_threshold", type=float, default=0.8, help="Jaccard similarity of a near duplicate (0.8)")
    p.add_argument("--dedup_num_perm", type=int, default=128, help="MinHash permutations (128)")
    p.add_argument("--dedup_shingle", type=int, default=5, help="words per shingle (5)")
    p.add_argument("--dedup_report", default=None, metavar="FILE", help="write example duplicate pairs (JSON lines)")
    p.add_argument("--quality_reference", default=None, metavar="CORPUS",
                   help="curated corpus: train a quality classifier against the raw text and filter with it")
    p.add_argument("--quality_filter", default=None, metavar="FILE", help="reuse a saved quality_filter.npz")
    p.add_argument("--quality_alpha", type=float, default=9.0, help="Pareto shape of the keep rule (9, GPT-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the quality sample and keep draws (0)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the prepared data already in --out (refused without it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_prepare, overrides=False)

    p = sub.add_parser("contamination", help=cmd_contamination.__doc__, description=cmd_contamination.__doc__)
    p.add_argument("data", metavar="DATA_DIR", help="data directory written by `gptforge prepare`")
    p.add_argument("--tasks", default=None, help="comma-separated evaluation tasks (default: all)")
    p.add_argument("--data_dir", default=None, help="folder of the evaluation files (as for gptforge eval)")
    p.add_argument("--out", required=True, help='JSON file for the clean item ids {"task": [ids]}')
    p.add_argument("--report", default=None, help="also write the full report (dirty ids, fractions) as JSON")
    p.add_argument("--ngram", type=int, default=13, help="words per n-gram (13, GPT-3)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_contamination, overrides=False)
