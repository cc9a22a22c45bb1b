"""`gptforge merge`: fold a LoRA run's adapters into its weights as a new, plain run directory."""

from __future__ import annotations

import argparse


def cmd_merge(args: argparse.Namespace) -> int:
    """Fold the LoRA adapters of a run's latest checkpoint (or of a checkpoint directory) into the weights, writing
    a new run directory with a plain model (lora_r 0) that generate, eval, serve and export load as any other. The
    merged model's logits equal the adapted model's up to float32 rounding (W + alpha / r * B A)."""
    from gptforge.checkpoint.adapters import merge_run

    out, src = merge_run(args.run_dir, args.out)
    print(f"merged the LoRA adapters of {src} into {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("merge", help=cmd_merge.__doc__, description=cmd_merge.__doc__ + " Example: gptforge merge "
                       "runs/lora --out runs/lora-merged")
    p.add_argument("run_dir", help="LoRA run directory or checkpoint directory (e.g. RUN/checkpoints/step_N for "
                   "the best one)")
    p.add_argument("--out", required=True, help="new run directory (must not exist or be empty)")
    p.set_defaults(handler=cmd_merge, overrides=False)
