"""`python -m gptforge ...` is the same as the `gptforge` console command (torchrun uses this form)."""

from gptforge.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
