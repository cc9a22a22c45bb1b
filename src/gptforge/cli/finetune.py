"""`gptforge finetune` (SFT or classification from an init checkpoint) and `gptforge classify` (predictions)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.utils.logging import is_main_process, print0


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    """Fine-tune a run (or a `gptforge import`ed GPT-2) on labeled data: --task sft (JSONL prompt/completion,
    Alpaca or chat; prompts masked from the loss) or --task classify (TSV/CSV/JSONL text + label; GPT-1 recipe).
    `--field value` overrides any config field (e.g. --mask_prompt false, --lm_loss_weight 0, --epochs 1); an
    explicit --max_steps replaces the recipe's epoch count."""
    from gptforge.cli.train import resume_config
    from gptforge.config import PRESETS, field_name, load_config, parse_overrides
    from gptforge.finetune import finetune

    overrides = parse_overrides(extra)
    if args.task is not None:
        overrides.insert(0, ("finetune.task", args.task))
    if args.resume is not None:
        if args.preset or args.config:
            raise GptforgeError("--resume continues with the run's saved config; drop --preset/--config")
        cfg = resume_config(args.out if args.resume == "latest" else args.resume, overrides)
    else:
        if args.init is None:
            raise GptforgeError("finetune needs --init RUN_DIR (a run directory, or one made by `gptforge import`)")
        if args.task is None:
            raise GptforgeError("finetune needs --task sft or --task classify")
        preset, path = args.preset, args.config
        if path is not None and not Path(path).is_file() and path in PRESETS:
            preset, path = path, None  # --config finetune-classify names the preset
        if preset is None and path is None:
            preset = f"finetune-{args.task}"
        names = {field_name(key) for key, _ in overrides}
        if "max_steps" in names and "epochs" not in names:  # the user's step count wins over the recipe's epochs
            overrides.append(("finetune.epochs", "0"))
            print0("note: --max_steps given, so finetune.epochs is 0 (the recipe's epoch count is not used)")
        cfg = load_config(preset=preset, path=path, overrides=overrides)
    result = finetune(cfg, args.data, args.out, init=args.init, val_data=args.val_data, progress=not args.quiet,
                      resume=args.resume)
    if not is_main_process():
        return 0
    metrics = "".join(f", {k.removeprefix('val_')} {v:.4f}" for k, v in result.val_metrics.items()
                      if k != "val_loss")
    print(f"fine-tuned {result.steps} steps ({result.tokens_seen:,} tokens) in {result.elapsed_s:.0f} s; "
          f"val loss {result.val_loss:.4f}{metrics}; checkpoint in {result.run_dir}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    """Classify texts with a fine-tuned classification run: the label and its probability per input (one line
    each, or JSON lines with --json). --file reads one text per line."""
    from gptforge.finetune.predict import Classifier
    from gptforge.utils.device import resolve_device

    texts = list(args.text or [])
    if args.file:
        from gptforge.finetune.formats import read_text

        if not Path(args.file).is_file():
            raise GptforgeError(f"--file {args.file} not found")
        texts += [line for line in read_text(Path(args.file)).splitlines() if line.strip()]
        if not texts:
            raise GptforgeError(f"--file {args.file} holds no texts (expected one text per line)")
    if not texts:
        raise GptforgeError("classify needs --text TEXT (repeatable) or --file FILE")
    classifier = Classifier(args.run_dir, device=str(resolve_device(args.device)))
    for text, p in zip(texts, classifier.predict(texts)):
        if args.json:
            print(json.dumps({"text": text, "label": p.label, "probability": round(p.probability, 6),
                              "probabilities": {k: round(v, 6) for k, v in p.probabilities.items()}}))
        else:
            print(f"{p.label}\t{p.probability:.4f}\t{text}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("finetune", help=cmd_finetune.__doc__, description=cmd_finetune.__doc__ +
                       " Example: gptforge finetune --init runs/base --data sst2/train.tsv --val_data sst2/dev.tsv "
                       "--task classify --out runs/sst2")
    p.add_argument("--init", help="run directory or checkpoint to start from (e.g. made by `gptforge import`)")
    p.add_argument("--data", required=True, help="training file (SFT: JSONL; classify: TSV, CSV or JSONL)")
    p.add_argument("--val_data", help="validation file (default: hold out finetune.val_fraction of --data)")
    p.add_argument("--task", choices=("sft", "classify"), help="what to fine-tune for")
    p.add_argument("--out", required=True, help="run directory for checkpoints and metrics")
    p.add_argument("--preset", help="named config (default: finetune-sft or finetune-classify)")
    p.add_argument("--config", help="YAML config file, or a preset name")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the newest intact checkpoint in --out, or from checkpoint PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_finetune, overrides=True)

    p = sub.add_parser("classify", help=cmd_classify.__doc__, description=cmd_classify.__doc__)
    p.add_argument("run_dir", help="classification run directory or checkpoint directory")
    p.add_argument("--text", action="append", help="text to classify (repeatable)")
    p.add_argument("--file", help="file with one text per line")
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (cpu)")
    p.set_defaults(handler=cmd_classify, overrides=False)
