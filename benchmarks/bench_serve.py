"""Serving benchmark: `gptforge serve` vs Hugging Face `transformers serve --continuous-batching`, same weights.

The model is the 124M GPT-2 shape (12 layers, d_model 768, 12 heads, context 1024, vocab 50257) with random
weights, saved as a gptforge run and exported with `gptforge export --format hf` for transformers (its tokenizer:
byte-level BPE trained here on generated text, padded to GPT-2's 50257 ids with end-of-text last). Each server
runs in its own process on 127.0.0.1. Streaming clients (threads) send /v1/completions requests back to back at
each concurrency level for `--duration_s` seconds: a fixed-length prompt, `--output_tokens` new tokens, greedy.
Per level: aggregate output tokens/s, time to first token (TTFT) and time per output token (TPOT) p50/p99,
errors, and how many outputs equal the same prompt's output when it ran alone (a different prompt's output would
be a mixed-up stream). Then a soak of `--soak_minutes` against gptforge: random prompt and output lengths, a third
of the clients hanging up mid-stream, the server's resident memory sampled every few seconds.

    pip install 'transformers[serving]'   # for the side-by-side run (or pass --skip_transformers)
    python benchmarks/bench_serve.py [--concurrency 1 4 16 64] [--duration_s 30] [--soak_minutes 10]
        [--prompt_tokens 32] [--output_tokens 64] [--reference_prompts 16] [--work_dir bench_serve_work]
        [--skip_transformers]

Targets (issue 10): tokens/s at 16 streams >= 5x one stream; >= 2x transformers at 16 streams; 0 errors and
0 mixed-up outputs at 64 streams; resident memory flat over the soak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

WORDS = ("the of and to in is was for on that with as by at from his her which an be this are were not have had "
         "king queen lord night day love heart time life death world city river stone light water house").split()


def build_model(work: Path) -> tuple[Path, Path]:
    """The gptforge run and its Hugging Face export (reused when present)."""
    run, hf = work / "run", work / "hf"
    if (run / "latest").is_file() and (hf / "config.json").is_file():
        return run, hf
    import torch
    from tokenizers import ByteLevelBPETokenizer

    from gptforge.checkpoint.convert import export_hf
    from gptforge.checkpoint.io import save_checkpoint
    from gptforge.config import Config, ModelConfig
    from gptforge.model.gpt import GPT
    from gptforge.tokenizer import _byte_to_unicode, load_tokenizer

    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(20_000))
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([text], vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False)
    vocab_dir = work / "vocab"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(vocab_dir))
    vocab = json.loads((vocab_dir / "vocab.json").read_text())
    vocab.pop("<|endoftext|>")
    tokens = sorted(vocab, key=vocab.get)
    alphabet = sorted(_byte_to_unicode().values())
    known = set(tokens)
    for a in alphabet:  # filler ids no merge produces, up to GPT-2's 50256 + end-of-text
        for b in alphabet:
            if len(tokens) == 50256:
                break
            if a + b + "x" not in known:
                tokens.append(a + b + "x")
    (vocab_dir / "vocab.json").write_text(json.dumps({**{t: i for i, t in enumerate(tokens)},
                                                      "<|endoftext|>": 50256}))
    tokenizer = load_tokenizer(vocab_dir)
    cfg = Config(model=ModelConfig(vocab_size=50257, n_layer=12, n_head=12, d_model=768, context_length=1024))
    torch.manual_seed(0)
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(hf, ignore_errors=True)
    save_checkpoint(run, step=0, cfg=cfg, tokenizer=tokenizer, model=GPT(cfg.model), state={"tokens_seen": 0})
    export_hf(run, hf)
    return run, hf


class Server:
    """A server process on 127.0.0.1; `url`, `model` (the name requests use) and `pid`."""

    def __init__(self, kind: str, run: Path, hf: Path, max_running: int, kv_tokens: int = 16384) -> None:
        self.kind = kind
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        if kind == "gptforge":
            cmd = [sys.executable, "-m", "gptforge", "serve", str(run), "--port", "0", "--served_model_name",
                   "bench", "--max_running", str(max_running), "--max_queue", "4096", "--log_level", "warning",
                   "--max_tokens_cap", "100000"]
            self.model = "bench"
        else:
            port = _free_port()
            exe = Path(sys.executable).with_name("transformers")
            # A bounded paged KV cache: by default it takes a fraction of all memory (13 GB RSS here, then the
            # kernel's OOM killer); kv_tokens slots in blocks of 32 hold max_running requests with room to spare.
            cmd = [str(exe), "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
                   "--port", str(port), "--cb-block-size", "32", "--cb-num-blocks", str(-(-kv_tokens // 32)),
                   str(hf)]
            self.model, self.url = str(hf), f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        if kind == "gptforge":
            line = self.proc.stdout.readline()
            if " on http://" not in line:
                raise SystemExit(f"gptforge serve did not start: {line}{self.proc.stdout.read()}")
            self.url = line.split(" on ")[1].split()[0]
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()  # drain its log
        self.pid = self.proc.pid
        deadline = time.monotonic() + 600
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{kind} server did not come up")
            time.sleep(1)

    def _answers(self) -> bool:
        try:
            r = requests.post(self.url + "/v1/completions", json={"model": self.model, "prompt": "the king",
                                                                   "max_tokens": 2, "temperature": 0}, timeout=600)
            return r.status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    prompt: int
    text: str = ""
    tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None
    error: str | None = None


def stream_once(server: Server, prompt: str, max_tokens: int, *, temperature: float = 0.0,
                hang_up_after: int | None = None, index: int = 0) -> Result:
    """One streaming completion; tokens are counted from the usage chunk when the server sends one."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
            "stream": True, "stream_options": {"include_usage": True}}
    if server.kind == "gptforge":
        body["ignore_eos"] = True
    res, start, times = Result(index), time.perf_counter(), []
    try:
        with requests.post(server.url + "/v1/completions", json=body, stream=True, timeout=600) as r:
            if r.status_code != 200:
                return Result(index, error=f"HTTP {r.status_code}: {r.text[:200]}")
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    res.tokens = event["usage"]["completion_tokens"]
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        times.append(time.perf_counter())
                        res.text += choice["text"]
                if hang_up_after is not None and len(times) >= hang_up_after:
                    return res
    except requests.RequestException as exc:
        return Result(index, error=str(exc)[:200])
    res.tokens = res.tokens or len(times)
    if times:
        res.ttft_s = times[0] - start
        res.tpot_s = (times[-1] - times[0]) / max(res.tokens - 1, 1)
    return res


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


@dataclass
class Level:
    streams: int
    results: list[Result] = field(default_factory=list)
    seconds: float = 0.0


def run_level(server: Server, prompts: list[str], streams: int, duration_s: float, max_tokens: int) -> Level:
    level, lock, deadline = Level(streams), threading.Lock(), time.monotonic() + duration_s

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            k = (i + n * streams) % len(prompts)
            res = stream_once(server, prompts[k], max_tokens, index=k)
            with lock:
                level.results.append(res)
            n += 1

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    level.seconds = time.perf_counter() - start
    return level


def report(name: str, level: Level, alone: dict[int, str]) -> dict[str, float]:
    ok = [r for r in level.results if r.error is None]
    same = sum(r.text == alone.get(r.prompt) for r in ok)
    mixed = sum(r.text != alone.get(r.prompt) and r.text in alone.values() for r in ok)
    row = {"tok_s": sum(r.tokens for r in ok) / level.seconds,
           "ttft50": pct([r.ttft_s for r in ok if r.ttft_s is not None], 0.5),
           "ttft99": pct([r.ttft_s for r in ok if r.ttft_s is not None], 0.99),
           "tpot50": pct([r.tpot_s for r in ok if r.tpot_s is not None], 0.5),
           "tpot99": pct([r.tpot_s for r in ok if r.tpot_s is not None], 0.99),
           "errors": len(level.results) - len(ok)}
    print(f"{name:<13} {level.streams:>7} {len(level.results):>8} {row['tok_s']:>8.1f} {row['ttft50']:>9.2f} "
          f"{row['ttft99']:>9.2f} {row['tpot50'] * 1000:>9.0f} {row['tpot99'] * 1000:>9.0f} {row['errors']:>6} "
          f"{same:>5}/{len(ok):<5} {mixed:>5}", flush=True)
    for r in level.results:
        if r.error:
            print(f"  error: {r.error}")
            break
    return row


def soak(server: Server, prompts_by_len, minutes: float, streams: int) -> None:
    import psutil

    proc, stop_at, rng_lock = psutil.Process(server.pid), time.monotonic() + 60 * minutes, threading.Lock()
    rng, samples, counts = random.Random(1), [], {"requests": 0, "hung_up": 0, "errors": 0}

    def client() -> None:
        while time.monotonic() < stop_at:
            with rng_lock:
                prompt, max_tokens = prompts_by_len(rng.randint(8, 256)), rng.randint(1, 256)
                hang_up = rng.randint(1, 32) if rng.random() < 1 / 3 else None
            res = stream_once(server, prompt, max_tokens, temperature=0.8, hang_up_after=hang_up)
            with rng_lock:
                counts["requests"] += 1
                counts["hung_up"] += hang_up is not None
                counts["errors"] += res.error is not None

    threads = [threading.Thread(target=client) for _ in range(streams)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        samples.append((time.monotonic(), proc.memory_info().rss / 2**20))
        time.sleep(5)
    first_minute = [m for t, m in samples if t - samples[0][0] < 60] or [samples[0][1]]
    rest = [m for t, m in samples if t - samples[0][0] >= 60] or [samples[-1][1]]
    print(f"\nsoak: {minutes:g} min, {streams} streams, {counts['requests']} requests ({counts['hung_up']} hung up "
          f"mid-stream), {counts['errors']} errors; resident memory MiB: first minute max "
          f"{max(first_minute):.0f}, after it min {min(rest):.0f} / max {max(rest):.0f}, last {samples[-1][1]:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--duration_s", type=float, default=30.0, help="seconds of requests per level (30)")
    parser.add_argument("--prompt_tokens", type=int, default=32)
    parser.add_argument("--output_tokens", type=int, default=64)
    parser.add_argument("--soak_minutes", type=float, default=10.0, help="0 skips the soak (10)")
    parser.add_argument("--work_dir", default="bench_serve_work", help="model files (reused between runs)")
    parser.add_argument("--reference_prompts", type=int, default=16,
                        help="distinct prompts, each first run alone for the same-as-alone check (16)")
    parser.add_argument("--skip_transformers", action="store_true")
    args = parser.parse_args()
    run, hf = build_model(Path(args.work_dir))
    from gptforge.tokenizer import load_tokenizer

    tok, rng = load_tokenizer(run / "checkpoints" / (run / "latest").read_text().strip()), random.Random(0)
    prompt_of = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # about one token per word  # noqa: E731
    prompts = [prompt_of(args.prompt_tokens) for _ in range(64)]
    print(f"124M GPT-2 shape, random weights, fp32 CPU ({os.cpu_count()} cores), prompts of "
          f"~{statistics.mean(len(tok.encode(p)) for p in prompts):.0f} tokens, {args.output_tokens} new tokens, "
          f"greedy, {args.duration_s:g} s per level\n")
    print(f"{'server':<13} {'streams':>7} {'requests':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9} {'errors':>6} {'same-as-alone':>11} {'mixed':>5}\n"
          f"{'':<13} {'':>7} {'':>8} {'':>8} {'s':>9} {'s':>9} {'ms':>9} {'ms':>9}")
    rows = {}
    for kind in ["gptforge"] + ([] if args.skip_transformers else ["transformers"]):
        server = Server(kind, run, hf, max(args.concurrency))
        try:
            used = prompts[:args.reference_prompts]  # distinct prompts, each also run alone first
            alone = {i: stream_once(server, p, args.output_tokens).text for i, p in enumerate(used)}
            for streams in args.concurrency:
                rows[kind, streams] = report(kind, run_level(server, used, streams, args.duration_s,
                                                            args.output_tokens), alone)
            if kind == "gptforge" and args.soak_minutes > 0:
                soak(server, prompt_of, args.soak_minutes, streams=16)
        finally:
            server.stop()
    summarize(rows, args.concurrency)


def summarize(rows: dict, levels: list[int]) -> None:
    g = {s: rows[("gptforge", s)]["tok_s"] for s in levels if ("gptforge", s) in rows}
    if 1 in g and 16 in g:
        print(f"\ngptforge tokens/s at 16 streams / 1 stream: {g[16] / g[1]:.1f}x (target >= 5x)")
    if ("transformers", 16) in rows and 16 in g:
        print(f"gptforge / transformers at 16 streams: {g[16] / rows[('transformers', 16)]['tok_s']:.1f}x "
              "(target >= 2x)")


if __name__ == "__main__":
    main()
