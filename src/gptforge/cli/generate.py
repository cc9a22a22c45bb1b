"""`gptforge generate`: text from a run directory, printed or streamed."""

from __future__ import annotations

import argparse
import sys


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


def register(sub) -> None:
    p = sub.add_parser("generate", help=cmd_generate.__doc__, description=cmd_generate.__doc__)
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several prompts (batched); none: start from end-of-text")
    p.add_argument("--max_new_tokens", type=int, default=200, help="tokens to generate per prompt (200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy (0.8)")
    p.add_argument("--top_k", type=int, default=0, help="keep the K most likely tokens; 0 means off (0)")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 means off")
    p.add_argument("--repetition_penalty", type=float, default=1.0, help="1.0 means off")
    p.add_argument("--stop", action="extend", nargs="+", metavar="TEXT",
                   help="stop strings (--stop A B, or --stop A --stop B); not included in the output")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--stream", action="store_true", help="print text as it is produced")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (cpu)")
    p.set_defaults(handler=cmd_generate, overrides=False)
