"""`gptforge plan`, `plot`, `export` and `import`: sizing, curves and Hugging Face interop."""

from __future__ import annotations

import argparse

from gptforge.cli.train import PRESET_HELP
from gptforge.errors import GptforgeError


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    """Estimate training FLOPs, PF-days, per-GPU memory (DDP, FSDP, FSDP + activation checkpointing) and, given a
    GPU or its peak, wall-clock days of a config, without training; `--field value` overrides any config field."""
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
        peak, source = 0.0, "unknown"  # compute and memory do not depend on the GPU; days do
    memory = (parse_number("--gpu-memory-gb", args.gpu_memory_gb) if args.gpu_memory_gb is not None
              else spec.memory_gb if spec is not None else 80.0)
    t = cfg.train
    tokens = (parse_number("--tokens", args.tokens) if args.tokens is not None else
              t.max_steps * (t.global_batch_tokens or t.micro_batch_size * cfg.model.context_length))
    if args.device not in ("cuda", "cpu"):
        raise GptforgeError(f"--device must be cuda or cpu, got {args.device!r}")
    plan = make_plan(cfg.model, tokens=tokens, gpus=parse_number("--gpus", args.gpus, integer=True), peak_flops=peak,
                     mfu=parse_number("--mfu", args.mfu), micro_batch_size=t.micro_batch_size,
                     gpu_memory_gib=memory, device=args.device)
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
    out = export_hf(args.run_dir, args.out, merged=args.merged)
    note = " (LoRA adapter in PEFT format in adapter/)" if (out / "adapter").is_dir() else ""
    print(f"exported {args.run_dir} as a GPT-2 model to {out}{note}")
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


def register(sub) -> None:
    p = sub.add_parser("plan", help=cmd_plan.__doc__, description=cmd_plan.__doc__ + " Example: gptforge plan "
                       "--preset gpt3-175b --gpus 1024 --peak-tflops 312 --mfu 0.4 --tokens 300e9",
                       allow_abbrev=False)
    p.add_argument("--preset", help=PRESET_HELP)
    p.add_argument("--config", help="YAML config file (sections model, optim, train)")
    p.add_argument("--gpus", default="1", help="number of GPUs (1)")
    p.add_argument("--peak-tflops", "--peak_tflops", dest="peak_tflops", help="per-GPU peak, TFLOP/s")
    p.add_argument("--gpu", help="known GPU for the peak and memory: h100, h200, a100, l4, ... (see utils/gpus.py)")
    p.add_argument("--mfu", default="0.4", help="model FLOPs utilisation in (0, 1] (0.4)")
    p.add_argument("--tokens", help="training tokens, e.g. 300e9 (default: max_steps x global batch tokens)")
    p.add_argument("--gpu-memory-gb", "--gpu_memory_gb", dest="gpu_memory_gb",
                   help="memory per GPU in GiB (default: the --gpu's, else 80)")
    p.add_argument("--device", default="cuda", help="cuda: GPU memory per GPU (default); cpu: host memory (RSS) "
                   "per CPU rank, with --gpus as the number of ranks and --gpu-memory-gb as each rank's memory")
    p.set_defaults(handler=cmd_plan, overrides=True)

    p = sub.add_parser("plot", help=cmd_plot.__doc__, description=cmd_plot.__doc__)
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", help="PNG file to write (RUN_DIR/metrics.png)")
    p.set_defaults(handler=cmd_plot, overrides=False)

    p = sub.add_parser("export", help=cmd_export.__doc__, description=cmd_export.__doc__)
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--format", default="hf", help="hf: Hugging Face GPT-2 (the only format; default)")
    p.add_argument("--out", required=True, help="new output directory")
    p.add_argument("--merged", action="store_true", help="LoRA runs: export the weights with the adapters folded "
                   "in (default: the base weights plus the adapter in PEFT format in OUT/adapter)")
    p.set_defaults(handler=cmd_export, overrides=False)

    p = sub.add_parser("import", help=cmd_import.__doc__, description=cmd_import.__doc__)
    p.add_argument("src_dir", help="local GPT-2 checkpoint directory, e.g. one written by save_pretrained")
    p.add_argument("--out", required=True, help="new run directory")
    p.set_defaults(handler=cmd_import, overrides=False)
