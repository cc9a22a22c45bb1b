"""Measured per-rank host memory of FSDP2 training on CPU ranks, next to `gptforge plan --device cpu` and to the
unsharded (single-process) run; plus sharded checkpoint save/load time and memory.

    python benchmarks/bench_memory.py                              # gpt3-xl (1.3B), 2 ranks, context 128
    python benchmarks/bench_memory.py --preset gpt3-medium --unsharded measure   # validate the model where it fits

Each rank (torchrun, gloo) builds the preset the way `gptforge pretrain` does (meta device, FSDP2 per block and
root, seeded init into the shards), runs `--steps` AdamW steps on random tokens (micro-batch 1, float32), writes a
sharded checkpoint (`checkpoint/sharded.py`) and loads it back. Memory is the resident set (RSS) of each rank's
process: its peak (VmHWM) over each phase, reset between phases through /proc/self/clear_refs (Linux). The
unsharded figure is the same program in one process without FSDP (`--unsharded measure`), or, by default for
models whose unsharded run would not fit this machine, the planner's single-process prediction
(`--unsharded plan`). Targets (issue 12): per-rank training peak <= 60% of the unsharded one and within 15% of
the plan; no rank's memory during a save grows by the full (unsharded) state.

Prints one table; `--json FILE` also writes the numbers. Refuses to start a run whose planned total over all ranks
exceeds 90% of the memory available now (pass --force to try anyway): on a shared machine an out-of-memory kill
can hit someone else's process.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30


def rss_bytes() -> tuple[int, int]:
    """(current, peak since the last reset) resident set size of this process, bytes (/proc/self/status)."""
    status = Path("/proc/self/status").read_text()
    field = lambda name: int(re.search(rf"{name}:\s+(\d+) kB", status).group(1)) * 1024  # noqa: E731
    return field("VmRSS"), field("VmHWM")


def reset_peak() -> None:
    """Make the peak RSS start again from the current RSS (Linux: "5" to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def bench_config(args):
    from gptforge.config import load_config

    return load_config(preset=args.preset, overrides=[
        ("context_length", args.context), ("micro_batch_size", 1), ("dtype", "float32"), ("seed", 1),
        ("data_parallel", "fsdp"), ("attention_pattern", "dense"), ("global_batch_tokens", 0)])


def worker(args) -> None:
    """One rank: build, train `args.steps` steps, save and load a sharded checkpoint; rank 0 writes the JSON."""
    import torch

    from gptforge.checkpoint.sharded import load_model, load_optimizer, save_sharded
    from gptforge.data.batches import Batch
    from gptforge.distributed.env import all_gather_object, init_distributed, teardown
    from gptforge.tokenizer import CharTokenizer
    from gptforge.train.loop import Task, _build_model
    from gptforge.train.optim import build_optimizer
    from gptforge.train.step import train_step

    info = init_distributed(torch.device("cpu"))
    cfg = bench_config(args)
    result: dict = {"rank": info.rank, "baseline_bytes": rss_bytes()[0]}

    def phase(name: str, fn) -> None:
        reset_peak()
        start = time.perf_counter()
        fn()
        result[f"{name}_s"] = time.perf_counter() - start
        result[f"{name}_peak_bytes"], result[f"{name}_end_bytes"] = rss_bytes()[1], rss_bytes()[0]

    built: dict = {}
    phase("build", lambda: built.update(zip(("model", "train_model"), _build_model(
        cfg, Task(name="bench", tokenizer=None, train=None), None, info))))
    model, optimizer = built["model"], build_optimizer(built["model"], cfg.optim, "cpu")
    gen = torch.Generator().manual_seed(info.rank)

    def steps() -> None:
        for _ in range(args.steps):
            x = torch.randint(0, cfg.model.vocab_size, (1, cfg.model.context_length + 1), generator=gen)
            train_step(built["train_model"], optimizer, [Batch(x[:, :-1], x[:, 1:])], grad_clip=1.0, dist_info=info)

    phase("train", steps)
    out = Path(args.out_dir)
    phase("save", lambda: save_sharded(out, step=args.steps, model=model, optimizer=optimizer, cfg=cfg,
                                       tokenizer=CharTokenizer("ab"), trainer_state={}, state={},
                                       info=info).finish(info))
    ckpt = out / "checkpoints" / f"step_{args.steps:08d}"
    phase("load", lambda: (load_model(model, ckpt), load_optimizer(model, optimizer, ckpt, info)))
    result["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    results = all_gather_object(result, info)
    if info.is_main_process:
        Path(args.result).write_text(json.dumps(results))
    teardown(info)


def planned(args, world_size: int, strategy: str):
    from gptforge.plan import memory_per_rank

    return memory_per_rank(bench_config(args).model, micro_batch_size=1, world_size=world_size, strategy=strategy,
                           device="cpu")


def run_workers(args, ranks: int, out_dir: Path) -> list[dict]:
    result = out_dir / "result.json"
    cmd = [sys.executable, *(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
                             if ranks > 1 else []),
           __file__, "--worker", "--preset", args.preset, "--context", str(args.context), "--steps",
           str(args.steps), "--out-dir", str(out_dir / "run"), "--result", str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.mmap_threshold:  # fixed threshold: freed blocks >= it go back to the system at once (see --help)
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    if ranks == 1:
        env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"error: the {ranks}-rank run failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        raise SystemExit(1)
    return json.loads(result.read_text())


def available_bytes() -> int:
    return int(re.search(r"MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1)) * 1024


def check_fits(args, what: str, total_bytes: float) -> None:
    if total_bytes > 0.9 * available_bytes() and not args.force:
        print(f"error: the {what} run is planned to need {total_bytes / GIB:.1f} GiB; {available_bytes() / GIB:.1f} "
              "GiB are available now (use a smaller --preset, or --force)", file=sys.stderr)
        raise SystemExit(2)


def _g(value: float) -> str:
    return f"{value / GIB:.2f}"


def report(args, sharded: list[dict], unsharded: list[dict] | None) -> dict:
    from gptforge.model.gpt import count_parameters

    cfg = bench_config(args)
    n = count_parameters(cfg.model)
    plan, single = planned(args, args.ranks, "fsdp"), planned(args, 1, "single")
    unsharded_peak = unsharded[0]["train_peak_bytes"] if unsharded else single.total_bytes
    source = "measured" if unsharded else "planned"
    allocator = f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold else "glibc default"
    print(f"{args.preset}: {n / 1e9:.2f}B parameters, context {args.context}, micro-batch 1, {args.steps} AdamW "
          f"steps, float32 on CPU; {args.ranks} ranks (gloo, FSDP2); {args.threads} thread(s) per rank; "
          f"allocator {allocator}; GiB")
    print(f"{'':<34}" + "".join(f"{'rank ' + str(r['rank']):>10}" for r in sharded) +
          f"{'planned':>10}{'unsharded':>11} ({source})")
    for name, key in (("baseline RSS (after import)", "baseline_bytes"), ("peak RSS, build (meta + init)",
                      "build_peak_bytes"), ("peak RSS, training", "train_peak_bytes"),
                      ("peak RSS, save", "save_peak_bytes"), ("peak RSS, load", "load_peak_bytes")):
        plan_col = _g(plan.total_bytes) if key == "train_peak_bytes" else ""
        un = _g(unsharded[0][key]) if unsharded else (_g(single.total_bytes) if key == "train_peak_bytes" else "")
        print(f"{name:<34}" + "".join(f"{_g(r[key]):>10}" for r in sharded) + f"{plan_col:>10}{un:>11}")
    worst = max(r["train_peak_bytes"] for r in sharded)
    ratio, error = worst / unsharded_peak, worst / plan.total_bytes - 1
    grow = max(r["save_peak_bytes"] - r["train_end_bytes"] for r in sharded)
    print(f"{'training peak / unsharded':<34}{ratio:>10.1%}   (target <= 60%)")
    print(f"{'training peak vs plan':<34}{error:>+10.1%}   (target within 15%)")
    print(f"{'save: growth over training RSS':<34}{_g(grow):>10}   (full state {_g(16 * n)} GiB; none holds it)")
    for name in ("build", "train", "save", "load"):
        print(f"{name + ' time, s':<34}" + "".join(f"{r[name + '_s']:>10.1f}" for r in sharded) +
              (f"{'':>10}{unsharded[0][name + '_s']:>11.1f}" if unsharded else ""))
    print(f"{'checkpoint size':<34}{_g(sharded[0]['checkpoint_bytes']):>10}")
    print(f"plan per rank: weights {_g(plan.weights_bytes)}, grads {_g(plan.grads_bytes)}, optimizer "
          f"{_g(plan.optimizer_bytes)}, activations {_g(plan.activations_bytes)}, working {_g(plan.working_bytes)}, "
          f"runtime {_g(plan.runtime_bytes)}")
    return {"preset": args.preset, "ranks": args.ranks, "mmap_threshold": args.mmap_threshold, "context": args.context, "steps": args.steps,
            "params": n, "sharded": sharded, "unsharded": unsharded, "unsharded_source": source,
            "plan_total_bytes": plan.total_bytes, "unsharded_bytes": unsharded_peak, "ratio_to_unsharded": ratio,
            "plan_error": error, "save_growth_bytes": grow}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt3-xl")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--context", type=int, default=128, help="context_length, tokens (128)")
    parser.add_argument("--steps", type=int, default=2, help="AdamW steps (2)")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank (1)")
    parser.add_argument("--unsharded", choices=("plan", "measure"), default="plan",
                        help="the unsharded figure: the planner's (default) or a real single-process run")
    parser.add_argument("--mmap-threshold", type=int, default=1 << 20,
                        help="glibc MALLOC_MMAP_THRESHOLD_ for the ranks, bytes (1 MiB); 0 keeps glibc's dynamic "
                        "threshold, under which freed tensors are kept in the heap and RSS overstates live memory")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument("--force", action="store_true", help="run even if the plan says memory is short")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    if args.worker:
        worker(args)
        return 0
    check_fits(args, f"{args.ranks}-rank", args.ranks * planned(args, args.ranks, "fsdp").total_bytes)
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        sharded = run_workers(args, args.ranks, Path(tmp) / "sharded")
        unsharded = None
        if args.unsharded == "measure":
            check_fits(args, "unsharded", planned(args, 1, "single").total_bytes)
            unsharded = run_workers(args, 1, Path(tmp) / "unsharded")
    numbers = report(args, sharded, unsharded)
    if args.json:
        Path(args.json).write_text(json.dumps(numbers, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
