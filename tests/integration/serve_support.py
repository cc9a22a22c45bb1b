"""Shared pieces of the server tests: a tiny trained-tokenizer run on disk, and a live server on 127.0.0.1.

The run is a 2-layer GPT with random weights and a byte-level BPE trained on a generated English-like text
(no shared data needed). Servers run in a background thread on a free port and are always torn down.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

WORDS = ("the king queen lord good night day love heart sweet fair death life time blood hand eyes speak "
         "come go make know think well now here there what which would should shall will must may never "
         "ever again away against before after under over upon within without").split()


def corpus(n_words: int = 20_000, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 10):
        words = [rng.choice(WORDS) for _ in range(10)]
        lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ":"]))
    return "\n".join(lines) + "\n"


def make_run(root: Path, *, context_length: int = 64, vocab_size: int = 320, seed: int = 0,
             never_eot: bool = True) -> Path:
    """Write a run directory (one checkpoint) with a tiny random GPT and a BPE tokenizer; return its path.
    With `never_eot`, end-of-text always scores about -100 below the rest (streams run until stopped): the
    final LayerNorm's dimension 0 is the constant 1 and only end-of-text's (tied) embedding reads it."""
    from gptforge.checkpoint.io import save_checkpoint
    from gptforge.config import Config, ModelConfig
    from gptforge.model.gpt import GPT
    from gptforge.tokenizer import train_bpe

    tok = train_bpe([corpus()], vocab_size)
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=64,
                                   context_length=context_length))
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    with torch.no_grad():  # larger logits than the 0.02 init: greedy choices far from ties
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
        if never_eot:
            model.ln_f.weight[0], model.ln_f.bias[0] = 0.0, 1.0
            model.wte.weight[:, 0] = 0.0
            model.wte.weight[tok.eot_id, 0] = -100.0
    run = root / "run"
    save_checkpoint(run, step=0, cfg=cfg, tokenizer=tok, model=model, state={"tokens_seen": 0})
    return run


@contextlib.contextmanager
def one_thread():
    """Tiny models decode fastest on one thread, and a loaded machine does not stall OpenMP barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def live_server(run: Path, **settings):
    """Serve `run` on 127.0.0.1 (a free port); yields (base_url, app). ServeSettings fields as keywords."""
    import gptforge
    from gptforge.serve.app import create_app
    from gptforge.serve.context import ServeSettings
    from gptforge.serve.server import ServerThread

    lm = gptforge.load(run)
    settings.setdefault("served_model_name", "tiny")
    app = create_app(lm, ServeSettings(**settings))
    with one_thread():
        server = ServerThread(app).start()
        try:
            assert app.state.ctx.runner.ready.wait(120), "the engine did not warm up"
            yield server.url, app
        finally:
            server.stop()


def wait_until(predicate, timeout_s: float = 120.0, what: str = "condition") -> None:
    """Poll `predicate` every 50 ms (no timing assertion: only a generous upper bound)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
