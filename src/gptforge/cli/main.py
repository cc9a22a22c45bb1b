"""The `gptforge` command: prepare, pretrain, generate, demo.

Each subcommand maps to one function whose docstring is its help text. Bad input of any kind ends with a
one-line `error: ...` message and exit status 2, never a traceback. Nothing imports this module.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from gptforge.errors import GptforgeError
from gptforge.utils.logging import is_main_process


def cmd_prepare(args: argparse.Namespace) -> int:
    """Tokenize a corpus into train/val token files plus the tokenizer and meta.json."""
    from gptforge.data.prepare import prepare

    meta = prepare(args.corpus, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                   val_fraction=args.val_fraction, text_field=args.text_field, progress=not args.quiet)
    print(f"prepared {meta['documents']} documents, {meta['bytes']:,} bytes -> {meta['tokens']['train']:,} train "
          f"+ {meta['tokens']['val']:,} val tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}, "
          f"{meta['dtype']}) in {args.out}")
    return 0


def cmd_pretrain(args: argparse.Namespace, extra: list[str]) -> int:
    """Pretrain a GPT on prepared data; `--field value` overrides any config field."""
    from gptforge.config import load_config, parse_overrides
    from gptforge.train.loop import pretrain

    if args.preset is not None and args.config is not None:
        raise GptforgeError("pretrain takes one of --preset NAME or --config FILE, not both")
    overrides = parse_overrides(extra)
    if args.preset is None and args.config is None:
        if args.resume is None:
            raise GptforgeError("pretrain needs exactly one of --preset NAME or --config FILE (or --resume)")
        cfg = _resume_config(args.out if args.resume == "latest" else args.resume, overrides)
    else:
        cfg = load_config(preset=args.preset, path=args.config, overrides=overrides)
    result = pretrain(cfg, args.data, args.out, progress=not args.quiet, resume=args.resume)
    if not is_main_process():
        return 0
    print(f"trained {result.steps} steps ({result.tokens_seen:,} tokens) in {result.elapsed_s:.0f} s; "
          f"val loss {result.val_loss:.4f}; checkpoint in {result.run_dir}")
    return 0


def _resume_config(path: str, overrides):
    """The config stored in the checkpoint to resume from, with command-line overrides on top."""
    from gptforge.checkpoint.io import find_resume_checkpoint, read_json
    from gptforge.config import config_from_dict

    return config_from_dict(read_json(find_resume_checkpoint(path) / "config.json"), overrides)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate text from a run directory (its latest checkpoint) or a checkpoint directory."""
    import gptforge
    from gptforge.utils.device import resolve_device

    lm = gptforge.load(args.run_dir, device=str(resolve_device(args.device)))
    kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop or ()),
                  seed=args.seed)
    prompts = args.prompt or [""]
    if args.stream:
        for i, prompt in enumerate(prompts):
            if i:
                print("\n" + "-" * 40)
            sys.stdout.write(prompt)
            for piece in lm.generate(prompt, stream=True, **kwargs):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, lm.generate(prompts, **kwargs))):
        if i:
            print("-" * 40)
        print(prompt + text)
    return 0


DEMO_PROMPTS = {"python-stdlib": ["def get_", "class Test", "    def __init__(self"], "shakespeare": ["ROMEO:\n", "KING HENRY:\n", "\n"]}


def cmd_demo(args: argparse.Namespace, extra: list[str]) -> int:
    """Prepare a corpus, pretrain the `demo` preset for a bounded time, then print val loss and samples."""
    import gptforge
    from gptforge.config import load_config, parse_overrides
    from gptforge.data.prepare import prepare
    from gptforge.train.loop import pretrain

    out, data = Path(args.out), Path(args.out) / "data"
    overrides = parse_overrides(extra)
    if args.max_time_s is not None:
        overrides.append(("max_time_s", args.max_time_s))
    cfg = load_config(preset="demo", overrides=overrides)  # validate before the slow steps
    if (out / "checkpoints").is_dir() and (out / "config.yaml").is_file() and data.is_dir():
        print(f"replacing the previous demo run in {out}")
        shutil.rmtree(out)
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
    print("-" * 60 + f"\nrun directory: {out}\ntry: gptforge generate {out} --prompt \"{prompts[0]}\" --stream")
    return 0


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    """Estimate training FLOPs, PF-days, wall-clock days and per-GPU memory (DDP, FSDP, FSDP + activation
    checkpointing) of a config, without training; `--field value` overrides any config field."""
    from gptforge.config import load_config, parse_overrides
    from gptforge.plan import format_plan, make_plan, parse_number
    from gptforge.utils.gpus import gpu_spec

    if (args.preset is None) == (args.config is None):
        raise GptforgeError("plan needs exactly one of --preset NAME or --config FILE")
    cfg = load_config(preset=args.preset, path=args.config, overrides=parse_overrides(extra))
    spec = gpu_spec(args.gpu) if args.gpu else None
    if args.peak_tflops is not None:
        peak, source = parse_number("--peak-tflops", args.peak_tflops) * 1e12, "given"
    elif spec is not None:
        peak, source = spec.bf16_tflops * 1e12, f"{spec.label} datasheet, dense bf16"
    elif cfg.train.peak_flops > 0:
        peak, source = cfg.train.peak_flops, "train.peak_flops"
    else:
        raise GptforgeError("plan needs the per-GPU peak: --peak-tflops X or --gpu NAME (e.g. --gpu h100)")
    memory = (parse_number("--gpu-memory-gb", args.gpu_memory_gb) if args.gpu_memory_gb is not None
              else spec.memory_gb if spec is not None else 80.0)
    t = cfg.train
    tokens = (parse_number("--tokens", args.tokens) if args.tokens is not None else
              t.max_steps * (t.global_batch_tokens or t.micro_batch_size * cfg.model.context_length))
    plan = make_plan(cfg.model, tokens=tokens, gpus=parse_number("--gpus", args.gpus, integer=True), peak_flops=peak,
                     mfu=parse_number("--mfu", args.mfu), micro_batch_size=t.micro_batch_size,
                     gpu_memory_gib=memory)
    print(format_plan(plan, cfg.model, name=args.preset or args.config, peak_source=source))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """Plot train/val loss, learning rate, gradient norm and tokens/s from RUN_DIR/metrics.jsonl to a PNG."""
    from gptforge.utils.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Export a run's latest checkpoint as a Hugging Face GPT-2 directory (config.json, model.safetensors,
    tokenizer files) that transformers' AutoModelForCausalLM / AutoTokenizer load offline."""
    from gptforge.checkpoint.convert import export_hf

    if args.format != "hf":
        raise GptforgeError(f"--format must be hf (Hugging Face GPT-2), got {args.format!r}")
    print(f"exported {args.run_dir} as a GPT-2 model to {export_hf(args.run_dir, args.out)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Import a local GPT-2-family checkpoint directory (config.json, model.safetensors or pytorch_model.bin,
    tokenizer.json or vocab.json + merges.txt) as a gptforge run directory. Nothing is downloaded."""
    from gptforge.checkpoint.convert import describe, import_hf

    report = import_hf(args.src_dir, args.out)
    for note in report.notes:
        print(f"note: {note}")
    print(describe(report))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Pretrain and generate from GPT-3-architecture "
                                     "language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help=cmd_prepare.__doc__, description=cmd_prepare.__doc__)
    p.add_argument("--corpus", required=True, help="text file, folder, glob, .jsonl/.parquet file, "
                   "'shakespeare' or 'python-stdlib'")
    p.add_argument("--tokenizer", default="bpe", help="bpe, char, or a path to an existing tokenizer (default bpe)")
    p.add_argument("--vocab_size", type=int, default=8192, help="BPE vocabulary size incl. <|endoftext|> (8192)")
    p.add_argument("--val_fraction", type=float, default=0.1, help="last fraction of tokens held out (0.1)")
    p.add_argument("--text_field", default="text", help="record field holding the text, for .jsonl/.parquet")
    p.add_argument("--out", required=True, help="output data directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("pretrain", help=cmd_pretrain.__doc__, description=cmd_pretrain.__doc__ +
                       " Example: gptforge pretrain --preset shakespeare-char --data data/sc --out runs/sc --max_steps 500")
    p.add_argument("--preset", help="named config: gpt3-small ... gpt3-175b, debug, shakespeare-char, demo")
    p.add_argument("--config", help="YAML config file (sections model, optim, train)")
    p.add_argument("--data", required=True, help="data directory written by `gptforge prepare`")
    p.add_argument("--out", required=True, help="run directory for checkpoints and metrics")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="PATH",
                   help="continue from the newest intact checkpoint in --out, or from checkpoint PATH")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several prompts (batched)")
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (0.8)")
    p.add_argument("--top_k", type=int, default=0, help="0 means off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 means off")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0 means off")
    p.add_argument("--stop", action="append", help="stop string (repeatable); not included in the output")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (cpu)")

    p = sub.add_parser("demo", help=cmd_demo.__doc__, description=cmd_demo.__doc__)
    p.add_argument("--corpus", default="python-stdlib", help="corpus as for prepare (python-stdlib)")
    p.add_argument("--tokenizer", default="bpe", help="bpe or char (bpe)")
    p.add_argument("--vocab_size", type=int, default=4096)
    p.add_argument("--out", default="runs/demo", help="run directory (runs/demo)")
    p.add_argument("--max_time_s", type=float, default=None, help="training time limit in seconds (300)")

    p = sub.add_parser("plan", help=cmd_plan.__doc__, description=cmd_plan.__doc__ + " Example: gptforge plan "
                       "--preset gpt3-175b --gpus 1024 --peak-tflops 312 --mfu 0.4 --tokens 300e9",
                       allow_abbrev=False)
    p.add_argument("--preset", help="named config: gpt3-small ... gpt3-175b, debug, shakespeare-char, demo")
    p.add_argument("--config", help="YAML config file (sections model, optim, train)")
    p.add_argument("--gpus", default="1", help="number of GPUs (1)")
    p.add_argument("--peak-tflops", "--peak_tflops", dest="peak_tflops", help="per-GPU peak, TFLOP/s")
    p.add_argument("--gpu", help="known GPU for the peak and memory: h100, h200, a100, l4, ... (see utils/gpus.py)")
    p.add_argument("--mfu", default="0.4", help="model FLOPs utilisation in (0, 1] (0.4)")
    p.add_argument("--tokens", help="training tokens, e.g. 300e9 (default: max_steps x global batch tokens)")
    p.add_argument("--gpu-memory-gb", "--gpu_memory_gb", dest="gpu_memory_gb",
                   help="memory per GPU in GiB (default: the --gpu's, else 80)")

    p = sub.add_parser("plot", help=cmd_plot.__doc__, description=cmd_plot.__doc__)
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", help="PNG file to write (RUN_DIR/metrics.png)")

    p = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--format", default="hf", help="hf: Hugging Face GPT-2 (the only format; default)")
    p.add_argument("--out", required=True, help="new output directory")

    p = sub.add_parser("import", help=cmd_import.__doc__, description=cmd_import.__doc__)
    p.add_argument("src_dir", help="local GPT-2 checkpoint directory, e.g. one written by save_pretrained")
    p.add_argument("--out", required=True, help="new run directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gptforge` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command in ("pretrain", "demo", "plan"):
            return {"pretrain": cmd_pretrain, "demo": cmd_demo, "plan": cmd_plan}[args.command](args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return {"prepare": cmd_prepare, "generate": cmd_generate, "plot": cmd_plot, "export": cmd_export,
                "import": cmd_import}[args.command](args)
    except GptforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `gptforge generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename}", file=sys.stderr)
        return 2
    except PermissionError as exc:
        print(f"error: permission denied: {exc.filename}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (continue with the same command plus --resume)" if args.command == "pretrain" else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
