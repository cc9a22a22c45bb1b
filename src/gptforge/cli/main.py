"""The `gptforge` command: one subcommand per verb, each defined in its own module of this package.

A command module exposes `register(sub)`, which adds its subparsers and sets two defaults on each:
`handler` (the function to run, whose docstring is its help text) and `overrides` (True when the command
accepts `--field value` config overrides beyond its own flags; they reach the handler as a second argument).
Bad input of any kind ends with a one-line `error: ...` message and exit status 2, never a traceback.
Nothing imports this package.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from gptforge.errors import GptforgeError

# Order is the order of `gptforge --help`.
COMMAND_MODULES = ("data", "train", "finetune", "eval", "generate", "serve", "tools", "adapters")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptforge", description="Pretrain, evaluate, fine-tune, generate from "
                                     "and serve GPT-3-architecture language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"gptforge.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gptforge` console script; returns the exit status.

    Under torchrun (WORLD_SIZE > 1) the process ends here with `os._exit` once the command has finished and its
    process group is destroyed, skipping the interpreter's finalization. Reason (seen in a core dump): after the
    last barrier, a gloo worker thread (`ProcessGroupGloo::runLoop`) still frees the finished collectives' tensors,
    which needs the GIL; if Python is finalizing by then, the thread is terminated inside a noexcept C++ frame and
    the whole process aborts ("terminate called without an active exception", SIGABRT; about once in 40 two-rank
    runs on a loaded machine), failing a run that had completed. Every file is written and closed, and stdout and
    stderr are flushed, before this point.
    """
    code = _dispatch(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.overrides:
            return args.handler(args, extra)
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.handler(args)
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
        hint = " (continue with the same command plus --resume)" if args.command in ("pretrain", "finetune") else ""
        print(f"interrupted{hint}", file=sys.stderr)
        return 130
