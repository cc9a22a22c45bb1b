"""Wall-clock time of a whole training command: `gptforge pretrain` vs nanoGPT's `train.py`, same run.

What a user waits for: start-up, data, every step, validation and the checkpoint. Both train the
shakespeare-char shape (4 layers, 4 heads, d_model 128, context 64, 12 sequences per step, AdamW lr 1e-3 -> 1e-4,
100 warm-up steps, beta2 0.99, dropout 0, biases on, fp32, no torch.compile) on the same character-level Tiny
Shakespeare token files for `--steps` steps, validating every 250 steps on 38,400 validation tokens (nanoGPT's
`estimate_loss` also scores as many training tokens, and also at step 0: that is how it works, so it is timed
as it is). Rounds alternate between the two, so machine noise hits both alike; the table gives every round and
the ratio of the medians.

nanoGPT is cloned into a temporary folder at run time (never vendored): `--reference_repo` is any git URL or
local clone (default the GitHub repository). Offline, point it at a local copy.

    python benchmarks/bench_train_wall.py [--steps 500] [--rounds 3] [--reference_repo PATH_OR_URL]
                                          [--threads N] [--busy]

`--busy` runs a competing CPU-bound process (one core spinning) during the timing, to see how each behaves
under contention.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

NANOGPT = "https://github.com/karpathy/nanoGPT.git"
NANOGPT_CONFIG = """\
out_dir = {out!r}
dataset = 'gptforge_char'
eval_interval = 250
eval_iters = 50
log_interval = 50
always_save_checkpoint = False
gradient_accumulation_steps = 1
batch_size = 12
block_size = 64
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = True
learning_rate = 1e-3
max_iters = {steps}
lr_decay_iters = {steps}
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
device = 'cpu'
dtype = 'float32'
compile = False
"""


def _spin() -> None:  # a competing CPU-bound process
    while True:
        pass


def _timed(cmd: list[str], cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference_repo", default=NANOGPT, help="nanoGPT git URL or local clone")
    parser.add_argument("--corpus", default="shakespeare", help="corpus for `gptforge prepare` (shakespeare)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both (0: torch's default)")
    parser.add_argument("--busy", action="store_true", help="time under a competing CPU-bound process")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_wall_"))
    ref = root / "nanoGPT"
    clone = subprocess.run(["git", "clone", "-q", "--depth", "1", args.reference_repo, str(ref)],
                           capture_output=True, text=True)
    if clone.returncode != 0:
        raise SystemExit(f"could not clone the reference from {args.reference_repo}: {clone.stderr.strip()[:300]} "
                         "(offline? pass --reference_repo /path/to/a/nanoGPT/clone)")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ref, capture_output=True, text=True).stdout
    env = {**os.environ}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    gptforge = [sys.executable, "-m", "gptforge"]
    data = root / "data"
    subprocess.run([*gptforge, "prepare", "--corpus", args.corpus, "--tokenizer", "char", "--out", str(data),
                    "--quiet"], check=True, env=env, capture_output=True)
    ref_data = ref / "data" / "gptforge_char"
    ref_data.mkdir(parents=True, exist_ok=True)
    # nanoGPT reads train.bin / val.bin: the same tokens, cut from gptforge's one shard at its train/val boundary
    meta = __import__("json").loads((data / "meta.json").read_text())
    (source,) = meta["sources"]
    tokens = np.concatenate([np.fromfile(data / shard["file"], dtype=meta["dtype"]) for shard in source["shards"]])
    n_train = source["tokens"]["train"]
    tokens[:n_train].tofile(ref_data / "train.bin")
    tokens[n_train:].tofile(ref_data / "val.bin")
    vocab_size = int(meta["vocab_size"])
    (ref_data / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": vocab_size}))
    # Warm-ups: file caches, the peak-FLOP/s cache, Python bytecode of both.
    subprocess.run([*gptforge, "pretrain", "--preset", "shakespeare-char", "--data", str(data), "--out",
                    str(root / "warm"), "--max_steps", "2", "--quiet"], check=True, env=env, capture_output=True)

    spinner = multiprocessing.Process(target=_spin, daemon=True) if args.busy else None
    if spinner:
        spinner.start()
    times: dict[str, list[float]] = {"gptforge": [], "nanoGPT": []}
    try:
        for r in range(args.rounds):
            cfg = ref / f"bench_{r}.py"
            cfg.write_text(NANOGPT_CONFIG.format(out=str(root / f"ref_out_{r}"), steps=args.steps))
            times["nanoGPT"].append(_timed([sys.executable, "train.py", str(cfg)], ref, env))
            times["gptforge"].append(_timed([*gptforge, "pretrain", "--preset", "shakespeare-char", "--data",
                                             str(data), "--out", str(root / f"run_{r}"), "--max_steps",
                                             str(args.steps), "--quiet"], root, env))
    finally:
        if spinner:
            spinner.terminate()
    import torch

    print(f"torch {torch.__version__}, {env.get('OMP_NUM_THREADS', torch.get_num_threads())} threads, "
          f"nanoGPT {commit.strip()}, {args.steps} steps of the shakespeare-char shape"
          f"{', under a competing busy process' if args.busy else ''}\n")
    print(f"{'implementation':<12} " + " ".join(f"{'round ' + str(i + 1):>9}" for i in range(args.rounds))
          + f" {'median':>9}")
    for name, values in times.items():
        print(f"{name:<12} " + " ".join(f"{v:>8.1f}s" for v in values) + f" {statistics.median(values):>8.1f}s")
    ratio = statistics.median(times["nanoGPT"]) / statistics.median(times["gptforge"])
    print(f"\nwall-time ratio (nanoGPT / gptforge, medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
