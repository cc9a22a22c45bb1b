"""Benchmark `gptforge prepare`: throughput with 1 and N processes, flat peak memory, exact resume, dedup speed.

Corpora come from `benchmarks/gen_corpus.py` (fixed seed). Every run is `prepare` in a fresh child process;
the parent samples the resident memory of the child and all its workers (summed) every 50 ms for the peak.
The tokenizer is trained once (on a 20 MB weighted sample of the smallest corpus) and reused, so the rows
measure the encoding pass, the part that scales with the corpus. Printed tables:

1. throughput: MB/s and tokens/s with 1 and N worker processes on the smallest corpus (1 process runs the
   tokenizer single-threaded, TOKENIZERS_PARALLELISM=false);
2. memory: peak RSS (MB) on each corpus size with N processes, and the largest/smallest ratio;
3. resume: the smallest corpus killed (SIGKILL, whole process group) halfway and run again: shards identical
   to the uninterrupted run's or not;
4. dedup: documents/s of `--dedup fuzzy` on `--dedup-mb` of paragraphs (with N processes), and of the dedup work
   alone (time with dedup minus time without).

Usage: python benchmarks/bench_prepare.py [--sizes-mb 100 1000] [--num-proc 2] [--dedup-mb 20] [--workdir DIR]
The CPU must be quiet for the numbers to mean anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_corpus import generate  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
_CHILD = """
import json, sys, time
from gptforge.data.dedup import DedupConfig
from gptforge.data.prepare import prepare
a = json.loads(sys.argv[1])
t0 = time.perf_counter()
meta = prepare(a["corpus"], a["out"], tokenizer=a["tokenizer"], vocab_size=a["vocab_size"], num_proc=a["num_proc"],
               shard_tokens=a["shard_tokens"], documents=a["documents"], tokenizer_sample_bytes=20_000_000,
               dedup=DedupConfig() if a["dedup"] else None, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": meta["bytes"], "documents": meta["documents"],
                  "tokens": meta["tokens"]["train"] + meta["tokens"]["val"],
                  "removed": meta["sources"][0]["removed"]}))
"""


def launch(args: dict, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)


def tree_rss(pid: int) -> int:
    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.Error:
        return 0


def run(args: dict, env_extra: dict | None = None) -> dict:
    """Run prepare in a child; returns its report plus `peak_rss_mb` of the child and its workers together."""
    proc = launch(args, env_extra)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.05)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mb": peak / 2**20}


def shard_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "shards").rglob("*.bin"))}


def kill_halfway(args: dict, n_shards: int) -> None:
    """Start prepare and SIGKILL its whole process group once about half the shards are written."""
    out = Path(args["out"])
    work = out.parent / f".{out.name}.prepare"
    proc = launch(args)
    target = max(1, n_shards // 2)
    while proc.poll() is None:
        if (work / "state.json").is_file() and len(list(work.glob("shards/*/*.bin"))) >= target:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        raise SystemExit("prepare finished before it could be killed; use a larger corpus or smaller shards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[100, 1000], help="corpus sizes in MB")
    parser.add_argument("--num-proc", type=int, default=2, help="worker processes of the parallel runs")
    parser.add_argument("--dedup-mb", type=float, default=20, help="corpus size for the dedup rows (0: skip)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size in tokens")
    parser.add_argument("--shard-tokens", type=int, default=5_000_000, help="tokens per shard")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir)")
    a = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        root = Path(tmp)
        corpora = {}
        for size in sorted(a.sizes_mb):
            corpora[size] = root / f"corpus_{size:g}mb.txt"
            generate(corpora[size], int(size * 1e6))
            print(f"generated {size:g} MB", file=sys.stderr)
        small = corpora[min(corpora)]
        base = {"vocab_size": a.vocab_size, "shard_tokens": a.shard_tokens, "documents": "file", "dedup": False}
        ref = run({**base, "corpus": str(small), "out": str(root / "tok"), "tokenizer": "bpe", "num_proc": a.num_proc})
        common = {**base, "tokenizer": str(root / "tok")}

        speed = {}
        for n in sorted({1, a.num_proc}):
            env = {"TOKENIZERS_PARALLELISM": "false"} if n == 1 else None
            speed[n] = run({**common, "corpus": str(small), "out": str(root / f"speed{n}"), "num_proc": n}, env)
            print(f"done: {n} process(es)", file=sys.stderr)
        memory = {}
        for size, corpus in corpora.items():
            out = root / f"mem{size:g}"
            memory[size] = speed[a.num_proc] if corpus == small else run(
                {**common, "corpus": str(corpus), "out": str(out), "num_proc": a.num_proc})
            print(f"done: memory at {size:g} MB", file=sys.stderr)

        reference = root / f"speed{a.num_proc}"
        resumed = {**common, "corpus": str(small), "out": str(root / "resumed"), "num_proc": a.num_proc}
        kill_halfway(resumed, len(shard_digests(reference)))
        run(resumed)
        identical = shard_digests(root / "resumed") == shard_digests(reference)

        dedup_rows = {}
        if a.dedup_mb:
            corpus = root / "dedup.txt"
            generate(corpus, int(a.dedup_mb * 1e6), seed=1)
            para = {**common, "corpus": str(corpus), "documents": "paragraphs", "num_proc": a.num_proc}
            dedup_rows["without"] = run({**para, "out": str(root / "nodedup")})
            dedup_rows["with"] = run({**para, "out": str(root / "dedup"), "dedup": True})
        del ref

    cores = len(os.sched_getaffinity(0))
    print(f"\nprepare (encoding pass, BPE vocab {a.vocab_size} reused), generated text, {cores} cores")
    print(f"{'processes':>9} {'corpus MB':>9} {'tokens':>12} {'seconds':>8} {'MB/s':>7} {'Mtok/s':>7} {'peak RSS MB':>11}")
    for n, r in speed.items():
        print(f"{n:>9} {r['bytes'] / 1e6:>9.1f} {r['tokens']:>12,} {r['seconds']:>8.1f} "
              f"{r['bytes'] / 1e6 / r['seconds']:>7.2f} {r['tokens'] / 1e6 / r['seconds']:>7.2f} {r['peak_rss_mb']:>11.0f}")
    print(f"\npeak resident memory with {a.num_proc} processes (main + workers)")
    print(f"{'corpus MB':>9} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>11}")
    for r in memory.values():
        print(f"{r['bytes'] / 1e6:>9.1f} {r['seconds']:>8.1f} {r['bytes'] / 1e6 / r['seconds']:>7.2f} "
              f"{r['peak_rss_mb']:>11.0f}")
    peaks = [r["peak_rss_mb"] for r in memory.values()]
    print(f"peak RSS ratio, largest / smallest corpus: {peaks[-1] / peaks[0]:.3f}")
    print(f"\nSIGKILL halfway + rerun, shards identical to an uninterrupted run: {'yes' if identical else 'NO'}")
    if dedup_rows:
        w, wo = dedup_rows["with"], dedup_rows["without"]
        docs = w["documents"]
        print(f"\nfuzzy dedup on {w['bytes'] / 1e6:.0f} MB of paragraphs ({docs:,} documents, {a.num_proc} processes): "
              f"removed {w['removed']['exact_duplicate']:,} exact + {w['removed']['near_duplicate']:,} near")
        print(f"  prepare with dedup: {docs / w['seconds']:,.0f} documents/s ({w['seconds']:.1f} s; without: "
              f"{wo['seconds']:.1f} s); dedup work alone: {docs / max(w['seconds'] - wo['seconds'], 1e-9):,.0f} "
              "documents/s")


if __name__ == "__main__":
    main()
