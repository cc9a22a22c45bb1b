"""`gptforge eval`: zero/few-shot tasks (table + JSON + per-item JSONL) and sliding-window perplexity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptforge.errors import GptforgeError


def _fresh_path(path: str | None, flag: str) -> Path | None:
    """An output path that does not exist yet (eval never overwrites a file it did not create)."""
    if path is None:
        return None
    p = Path(path)
    if p.exists():
        raise GptforgeError(f"{flag} {p} already exists; choose a new path (eval does not overwrite files)")
    if not p.parent.is_dir():
        raise GptforgeError(f"{flag} {p}: directory {p.parent} does not exist")
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a run directory zero- and few-shot on tasks (GPT-3 protocol or lm-eval's), or the
    perplexity of a text file."""
    import gptforge
    from gptforge.eval.report import format_perplexity, format_table
    from gptforge.utils.device import resolve_device
    from gptforge.utils.io import atomic_write_text

    if not args.tasks and not args.perplexity:
        raise GptforgeError("nothing to do: give --tasks (e.g. --tasks hellaswag,piqa) and/or --perplexity FILE")
    if args.limit is not None and args.limit < 1:
        raise GptforgeError(f"--limit must be >= 1, got {args.limit}")
    out, samples = _fresh_path(args.out, "--out"), _fresh_path(args.samples, "--samples")
    if args.perplexity:
        from gptforge.eval.perplexity import read_text

        texts = {f: read_text(f) for f in args.perplexity}  # fail on a bad path before loading the model
    lm = gptforge.load(args.run_dir, device=str(resolve_device(args.device)))
    report = {"results": []}
    if args.tasks:
        report = gptforge.evaluate(lm, args.tasks, args.shots, limit=args.limit, seed=args.seed,
                                   batch_size=args.batch_size, data_dir=args.data_dir, protocol=args.protocol,
                                   clean_only=args.clean_only, progress=not args.quiet)
        print(format_table(report))
    if args.perplexity:
        from gptforge.eval.harness import model_info
        from gptforge.eval.perplexity import perplexity

        report.setdefault("model", model_info(lm))
        report["perplexity"] = {}
        for name, text in texts.items():
            result = perplexity(lm.model, lm.tokenizer, text, stride=args.stride, batch_size=args.batch_size,
                                progress=not args.quiet)
            report["perplexity"][name] = result
            print(format_perplexity(name, result))
    if samples is not None:
        lines = [json.dumps(s, ensure_ascii=False) for r in report["results"] for s in r["samples"]]
        atomic_write_text(samples, "\n".join(lines) + ("\n" if lines else ""))
    if out is not None:
        slim = {**report, "results": [{k: v for k, v in r.items() if k != "samples"} for r in report["results"]]}
        atomic_write_text(out, json.dumps(slim, indent=2, ensure_ascii=False) + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help=cmd_eval.__doc__, description=cmd_eval.__doc__)
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--tasks", help="comma-separated: lambada,hellaswag,piqa,arc_easy,arc_challenge,winogrande,"
                   "boolq,sst2")
    p.add_argument("--shots", default="0", help="K demonstrations, or several: 0,1,5 (default 0)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items of each task")
    p.add_argument("--seed", type=int, default=1234, help="seed of the demonstration draw (1234)")
    p.add_argument("--batch_size", type=int, default=32, help="continuations (or perplexity windows) per "
                   "forward pass (32)")
    p.add_argument("--data_dir", default=None, help="folder of the eval sets (default: $GPTFORGE_EVAL_DATA)")
    p.add_argument("--protocol", default="gpt3",
                   help="gpt3: the paper's formats and normalisations; lm-eval: lm-evaluation-harness's (gpt3)")
    p.add_argument("--clean_only", default=None, help='JSON {"task": [item ids]}: evaluate only those items')
    p.add_argument("--out", default=None, help="write the results as JSON here (a new file)")
    p.add_argument("--samples", default=None, help="write one JSON line per item here (a new file)")
    p.add_argument("--perplexity", action="append", help="text file to measure perplexity on (repeatable)")
    p.add_argument("--stride", type=int, default=None, help="perplexity window stride in tokens "
                   "(default: context_length // 2)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_eval, overrides=False)
