"""`gptforge pretrain` and `gptforge demo` (prepare -> pretrain -> samples in one command)."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.utils.logging import is_main_process

PRESET_HELP = "named config: gpt3-small ... gpt3-175b, debug, shakespeare-char, demo"


def cmd_pretrain(args: argparse.Namespace, extra: list[str]) -> int:
    """Pretrain a GPT on prepared data; `--field value` overrides any config field."""
    from gptforge.config import load_config, parse_overrides
    from gptforge.train.pretrain import pretrain

    if args.preset is not None and args.config is not None:
        raise GptforgeError("pretrain takes one of --preset NAME or --config FILE, not both")
    overrides = parse_overrides(extra)
    if args.preset is None and args.config is None:
        if args.resume is None:
            raise GptforgeError("pretrain needs exactly one of --preset NAME or --config FILE (or --resume)")
        cfg = resume_config(args.out if args.resume == "latest" else args.resume, overrides)
    else:
        cfg = load_config(preset=args.preset, path=args.config, overrides=overrides)
    result = pretrain(cfg, args.data, args.out, progress=not args.quiet, resume=args.resume)
    if not is_main_process():
        return 0
    print(f"trained {result.steps} steps ({result.tokens_seen:,} tokens) in {result.elapsed_s:.0f} s; "
          f"val loss {result.val_loss:.4f}; checkpoint in {result.run_dir}")
    return 0


def resume_config(path: str, overrides):
    """The config stored in the checkpoint to resume from, with command-line overrides on top."""
    from gptforge.checkpoint.io import find_resume_checkpoint, read_json
    from gptforge.config import config_from_dict

    return config_from_dict(read_json(find_resume_checkpoint(path) / "config.json"), overrides)


DEMO_PROMPTS = {"python-stdlib": ["def get_", "class Test", "    def __init__(self"],
                "shakespeare": ["ROMEO:\n", "KING HENRY:\n", "\n"]}


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    """Prepare a corpus, pretrain the `demo` preset for a bounded time, then print val loss and samples."""
    import gptforge
    from gptforge.config import load_config, parse_overrides
    from gptforge.data.prepare import prepare
    from gptforge.train.pretrain import pretrain

    out, data = Path(args.out), Path(args.out) / "data"
    overrides = parse_overrides(extra)
    if args.max_time_s is not None:
        overrides.append(("max_time_s", args.max_time_s))
    cfg = load_config(preset="demo", overrides=overrides)  # validate before the slow steps
    _claim_demo_dir(out)
    kind = f"byte-level BPE, vocab {args.vocab_size}" if args.tokenizer == "bpe" else f"tokenizer {args.tokenizer}"
    print(f"[1/3] preparing corpus '{args.corpus}' ({kind}) into {data}")
    meta = prepare(args.corpus, data, tokenizer=args.tokenizer, vocab_size=args.vocab_size, progress=True)
    print(f"      {meta['documents']} documents, {meta['tokens']['train']:,} train / {meta['tokens']['val']:,} "
          f"val tokens")
    print(f"[2/3] pretraining the demo model (at most {cfg.train.max_steps} steps / {cfg.train.max_time_s:g} s)")
    result = pretrain(cfg, data, out)
    print(f"      {result.steps} steps, {result.tokens_seen:,} tokens in {result.elapsed_s:.0f} s; "
          f"val loss {result.val_loss:.4f} nats/token")
    print("[3/3] samples (temperature 0.8, top-k 50):")
    lm = gptforge.load(out)
    prompts = DEMO_PROMPTS.get(args.corpus, ["", "", ""])
    for prompt, text in zip(prompts, lm.generate(prompts, max_new_tokens=80, temperature=0.8, top_k=50, seed=0)):
        print("-" * 60 + "\n" + prompt + text)
    print("-" * 60 + f"\nrun directory: {out}\ntry: gptforge generate {out} --prompt {shlex.quote(prompts[0].strip())} --stream"
          f"\nserve it (OpenAI-compatible API and a playground on http://127.0.0.1:8000): gptforge serve {out}"
          f"\nthen: curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' "
          f"-d '{json.dumps({'prompt': prompts[0], 'max_tokens': 40})}'")
    return 0


DEMO_MARKER = ".gptforge-demo"
# What a demo run writes into its directory; anything else there means the directory is not (only) a demo run's.
DEMO_ENTRIES = {DEMO_MARKER, "data", "checkpoints", "config.yaml", "metrics.jsonl", "tensorboard", "latest", "best",
                "tokenizer.json", "char_tokenizer.json", "metrics.png"}


def _claim_demo_dir(out: Path) -> None:
    """Make `out` the demo's run directory: create it (with a marker file), or replace a previous demo run there.

    A directory is replaced only when it is unmistakably a previous demo run's own output: it carries the marker
    file that `gptforge demo` writes first and holds nothing but what a demo run writes. Anything else (a training
    run, a user's files) is refused and left untouched.

    Raises:
        GptforgeError: `out` exists, is not empty and is not a previous demo run.
    """
    if out.exists() and not out.is_dir():
        raise GptforgeError(f"--out {out} is a file, not a directory (nothing was changed)")
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if entries:
        if DEMO_MARKER not in entries:
            raise GptforgeError(f"--out {out} already exists and is not a run made by `gptforge demo`; choose a new "
                                "or empty directory (nothing was changed)")
        foreign = sorted(entries - DEMO_ENTRIES)
        if foreign:
            raise GptforgeError(f"--out {out} holds a previous demo run plus files the demo did not write "
                                f"({', '.join(foreign[:3])}); move them or choose another --out (nothing was changed)")
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `gptforge demo`: this directory may be replaced by the next demo run\n",
                                   encoding="utf-8")


def register(sub) -> None:
    p = sub.add_parser("pretrain", help=cmd_pretrain.__doc__, description=cmd_pretrain.__doc__ +
                       " Example: gptforge pretrain --preset shakespeare-char --data data/sc --out runs/sc --max_steps 500")
    p.add_argument("--preset", help=PRESET_HELP)
    p.add_argument("--config", help="YAML config file (sections model, optim, train)")
    p.add_argument("--data", required=True, help="data directory written by `gptforge prepare`")
    p.add_argument("--out", required=True, help="run directory for checkpoints and metrics")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the newest intact checkpoint in --out, or from checkpoint PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_pretrain, overrides=True)

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--corpus", default="python-stdlib", help="corpus as for prepare (python-stdlib)")
    p.add_argument("--tokenizer", default="bpe", help="bpe or char (bpe)")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--out", default="runs/demo", help="run directory (runs/demo)")
    p.add_argument("--max_time_s", type=float, default=None, help="training time limit in seconds (300)")
    p.set_defaults(handler=cmd_demo, overrides=True)
