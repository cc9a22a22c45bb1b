"""HellaSwag items/s: `gptforge eval --protocol lm-eval` vs lm-evaluation-harness's `hf` backend, side by side.

Same weights (a random GPT-2-shaped gptforge model, exported with `gptforge export --format hf`), the same
items (the first --items of HellaSwag), the same batch size, float32 on the CPU, lm-eval's zero-shot prompts.
Both models are loaded before the clock starts; each timing covers reading the items, building the requests,
tokenizing and scoring (lm-eval: `simple_evaluate` on an already built `HFLM`, task YAML pointed at a local
JSONL). The per-item predictions of both are compared too. On a shared machine, the speed-up in CPU time
(process time, all threads) is the steadier number; wall-clock items/s depend on the neighbours' load. Shapes: GPT-2 124M (12 layers, d_model 768,
vocab 50257, context 1024) and a 6-layer d_model 384 model with the same vocabulary.

    python benchmarks/bench_eval.py --data_dir ../shared/data [--items 200] [--batch_size 16] [--shapes 124m,6l384]

The tokenizer is a byte-level BPE of 8192 tokens trained here on the HellaSwag text (the model's vocabulary
stays 50257, so the output head costs what GPT-2's does). Needs `pip install gptforge[eval]`.
"""

from __future__ import annotations

import argparse
import bz2
import json
import os
import re
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import gptforge  # noqa: E402
from gptforge.checkpoint.convert import export_hf  # noqa: E402
from gptforge.checkpoint.io import save_checkpoint  # noqa: E402
from gptforge.config import Config, ModelConfig  # noqa: E402
from gptforge.eval.tasks import read_split  # noqa: E402
from gptforge.model.gpt import GPT  # noqa: E402
from gptforge.tokenizer import train_bpe  # noqa: E402

SHAPES = {"124m": dict(n_layer=12, n_head=12, d_model=768), "6l384": dict(n_layer=6, n_head=6, d_model=384)}


def make_models(work: Path, shape: str, tokenizer) -> tuple[Path, Path]:
    cfg = Config(model=ModelConfig(vocab_size=50257, context_length=1024, dropout=0.0, **SHAPES[shape]))
    torch.manual_seed(0)
    run = work / f"run-{shape}"
    save_checkpoint(run, step=0, cfg=cfg, tokenizer=tokenizer, model=GPT(cfg.model))
    return run, export_hf(run, work / f"hf-{shape}")


def write_task(work: Path, data_dir: Path, n_items: int) -> Path:
    """lm-eval's hellaswag YAML (its own preprocessing module re-exported) over a local JSONL of the items."""
    import lm_eval

    include = work / "tasks"
    include.mkdir(exist_ok=True)
    docs = read_split("hellaswag", "eval", data_dir)[:n_items]
    rows = []
    for d in docs:
        label, _, ctx = d.fields["context"].partition(": ")
        rows.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": d.fields["endings"],
                     "label": str(d.fields["label"])})
    (include / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    text = (Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "hellaswag.yaml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^task: .*$", "task: bench_hellaswag", text)
    text = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", text)
    text = re.sub(r"(?m)^dataset_path: .*$", "dataset_path: json", text)
    text = re.sub(r"(?m)^dataset_name: .*$", "dataset_name: null", text)
    text = re.sub(r"(?m)^(training|test)_split: .*$", r"\1_split: null", text)
    text += f"dataset_kwargs:\n  data_files:\n    validation: {include / 'hs.jsonl'}\n"
    (include / "bench_hellaswag.yaml").write_text(text, encoding="utf-8")
    (include / "utils.py").write_text("from lm_eval.tasks.hellaswag.utils import *  # noqa\n", encoding="utf-8")
    return include


def time_lm_eval(hf_dir: Path, include: Path, batch_size: int) -> tuple[tuple[float, float], list[int], float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=batch_size, device="cpu")
    started, cpu = time.perf_counter(), time.process_time()
    res = simple_evaluate(model=model, tasks=["bench_hellaswag"], num_fewshot=0, log_samples=True,
                          task_manager=TaskManager(include_path=str(include)))
    elapsed = (time.perf_counter() - started, time.process_time() - cpu)
    samples = sorted(res["samples"]["bench_hellaswag"], key=lambda s: s["doc_id"])
    preds = [max(range(4), key=lambda j: (float(s["resps"][j][0][0]), -j)) for s in samples]
    return elapsed, preds, res["results"]["bench_hellaswag"]["acc_norm,none"]


def time_gptforge(run: Path, data_dir: Path, n_items: int,
                  batch_size: int) -> tuple[tuple[float, float], list[int], float]:
    lm = gptforge.load(run)
    started, cpu = time.perf_counter(), time.process_time()
    report = gptforge.evaluate(lm, "hellaswag", 0, limit=n_items, data_dir=data_dir, protocol="lm-eval",
                               batch_size=batch_size)
    elapsed = (time.perf_counter() - started, time.process_time() - cpu)
    result = report["results"][0]
    return elapsed, [s["predictions"]["acc"] for s in result["samples"]], result["metrics"]["acc_norm"]["value"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=os.environ.get("GPTFORGE_EVAL_DATA"), help="eval data folder")
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=16, help="requests (continuations) per forward pass")
    parser.add_argument("--shapes", default="124m,6l384")
    args = parser.parse_args()
    if not args.data_dir:
        parser.error("--data_dir (or GPTFORGE_EVAL_DATA) is required")
    data_dir = Path(args.data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with bz2.open(data_dir / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
            tokenizer = train_bpe([f.read()], vocab_size=8192)
        include = write_task(work, data_dir, args.items)
        rows = []
        for shape in args.shapes.split(","):
            run, hf_dir = make_models(work, shape, tokenizer)
            t_ours, p_ours, a_ours = time_gptforge(run, data_dir, args.items, args.batch_size)
            t_ref, p_ref, a_ref = time_lm_eval(hf_dir, include, args.batch_size)
            same = sum(a == b for a, b in zip(p_ours, p_ref))
            rows.append((shape, args.items, args.batch_size, args.items / t_ref[0], args.items / t_ours[0],
                         t_ref[0] / t_ours[0], t_ref[1] / t_ours[1], f"{same}/{len(p_ref)}",
                         f"{a_ours:.4f} / {a_ref:.4f}"))
    print(f"HellaSwag zero-shot, float32, CPU ({torch.get_num_threads()} threads), lm-eval prompts")
    head = ("shape", "items", "batch", "lm-eval hf items/s", "gptforge items/s", "speed-up (wall)",
            "speed-up (CPU time)", "same preds", "acc_norm ours / lm-eval")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in rows:
        print(" | ".join([r[0], str(r[1]), str(r[2]), f"{r[3]:.2f}", f"{r[4]:.2f}", f"{r[5]:.2f}x", f"{r[6]:.2f}x",
                          r[7], r[8]]))


if __name__ == "__main__":
    main()
