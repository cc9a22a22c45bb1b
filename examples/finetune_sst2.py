"""The value of pretraining, measured on SST-2 (issue 9's acceptance recipe; under 15 minutes on 2 CPU cores).

1. Pretrain a small BPE GPT on unlabeled text: the SST-2 training sentences without their labels (`--corpus
   ptb+sst2` adds PTB train).
2. Fine-tune it as a classifier (GPT-1's recipe, Radford et al. 2018 sections 3.2 and 4.1: a head on the last
   token, the auxiliary LM loss at weight 0.5, with the CPU-budget settings below) on SST-2 train; report dev
   accuracy. Then the same fine-tune from random initialisation with the same budget (the difference is what
   pretraining buys), and LoRA (r = 8 on every block linear layer and the token embedding, base frozen) on the
   pretrained model with the same budget.
3. SFT variant: SST-2 as "Review: ...\\nSentiment:" -> " positive" / " negative"; greedy generation on dev with
   the generation engine; report label accuracy and the fraction of generations that stop right after the label.

Budgets are optimizer steps, so that a run means the same on any machine: `--pretrain_steps` (the cosine schedule
anneals over them), `--finetune_steps` for every classifier arm (the same budget for each), `--sft_steps` (capped at
`--sft_s` seconds). `--seeds N` repeats the pretrained-vs-random classifier pair with N fine-tuning seeds and
reports the mean and spread of the difference (one pair moves by 1-2 points from seed to seed on 872 dev reviews).

Usage: PYTHONPATH=src python examples/finetune_sst2.py [--sst2 DIR] [--corpus sst2|ptb+sst2] [--ptb DIR]
       [--out DIR] [--pretrain_steps N] [--finetune_steps N] [--sft_steps N] [--sft_s S] [--seeds N]
Needs the SST-2 files (sentence\\tlabel TSVs; with ptb+sst2 also PTB's ptb.train.txt.gz); see
../shared/data/README.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch

import gptforge
from gptforge.checkpoint.io import save_checkpoint
from gptforge.config import load_config
from gptforge.data.prepare import prepare
from gptforge.finetune.predict import Classifier
from gptforge.model.gpt import GPT
from gptforge.model.lora import freeze_base
from gptforge.train.pretrain import pretrain

MODEL = dict(n_layer=4, n_head=4, d_model=128, context_length=64)
# GPT-1's recipe scaled to a CPU budget: a tiny model takes a larger lr (5e-4, FINETUNE's) than GPT-1's 6.25e-5 and
# fewer steps than 3 epochs; the auxiliary LM loss stays at GPT-1's weight 0.5. Measured from the pretrained model
# (1000 steps, dev accuracy, seeds 1337 / 1): lr 1e-3 without the LM loss 0.791; lr 1e-3 with it 0.813 / 0.796;
# lr 5e-4 with it 0.821 / 0.807.
CLASSIFY = ["lm_loss_weight", 0.5]
FINETUNE = ["lr", 5e-4, "micro_batch_size", 32, "global_batch_size", 32, "epochs", 0, "warmup_fraction", 0.02,
            "eval_interval", 10_000, "checkpoint_interval", 10_000, "dropout", 0.1]


# LoRA (Hu et al. 2021) r = 8 on every linear layer of the blocks and on the token embedding (wte); the
# classification head stays trainable. Without wte the adapters cannot move word embeddings, where most of a small
# model's SST-2 gain lies (0.577 vs 0.786 dev accuracy measured; docs/lora.md). Adapters take a larger step than
# full fine-tuning (one factor of each update starts at zero): lr 1e-3 / 1.5e-3 / 2e-3 / 3e-3 / 5e-3 gave 0.802 /
# 0.804 / 0.801 / 0.794 / 0.791 (1000 steps, LM loss 0.5; full fine-tuning 0.821).
LORA = ["lora_r", 8, "lora_alpha", 16, "lora_targets", "qkv,attn_proj,mlp_fc,mlp_proj,wte", "lr", 1.5e-3]


def trainable_counts(run: Path) -> tuple[int, int]:
    """(trainable, total) parameters of a LoRA classification run: adapters + score head vs everything."""
    model = GPT(gptforge.load(run).config.model)
    return freeze_base(model, ("score",))


def overrides(pairs):
    return [(str(pairs[i]), pairs[i + 1]) for i in range(0, len(pairs), 2)]


def pretraining_gain(report: dict, seeds: int) -> dict:
    """Dev accuracy of pretrained minus random initialisation, per fine-tuning seed (the default seed first)."""
    names = [("base", "random")] + [(f"base_seed{s}", f"random_seed{s}") for s in range(1, seeds)]
    gains = [report[f"classify_{b}"]["dev_accuracy"] - report[f"classify_{r}"]["dev_accuracy"] for b, r in names]
    mean = sum(gains) / len(gains)
    spread = (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5 if len(gains) > 1 else None
    return {"per_seed": [round(g, 4) for g in gains], "mean": round(mean, 4),
            "std": None if spread is None else round(spread, 4)}


def dev_rows(sst2: Path):
    lines = (sst2 / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    return [(s.strip(), int(y)) for s, y in (line.rsplit("\t", 1) for line in lines)]


def sft_eval(run: Path, rows, max_new_tokens: int = 4) -> dict:
    """Greedy generations for every dev review: label accuracy and the fraction that stop right after the label.
    A review too long for the context loses its first words (as training truncated the prompt's start)."""
    lm = gptforge.load(run)
    room = lm.config.model.context_length - max_new_tokens
    prompts = []
    for s, _ in rows:
        words = s.split()
        while len(lm.tokenizer.encode(f"Review: {' '.join(words)}\nSentiment:")) > room:
            words = words[1:]
        prompts.append(f"Review: {' '.join(words)}\nSentiment:")
    texts = lm.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    names = {0: " negative", 1: " positive"}
    correct = sum(t.strip() == names[y].strip() for t, (_, y) in zip(texts, rows))
    stopped = sum(t in (" negative", " positive") for t in texts)
    return {"dev_label_accuracy": round(correct / len(rows), 4), "stopped_after_label": round(stopped / len(rows), 4),
            "examples": texts[:3]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sst2", default="../shared/data/sst2")
    ap.add_argument("--corpus", choices=("sst2", "ptb+sst2"), default="sst2")
    ap.add_argument("--ptb", default="../shared/data/ptb")
    ap.add_argument("--out", default="runs/sst2_example")
    ap.add_argument("--pretrain_steps", type=int, default=700)
    ap.add_argument("--finetune_steps", type=int, default=1000)
    ap.add_argument("--sft_steps", type=int, default=1000)
    ap.add_argument("--sft_s", type=float, default=150.0)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    sst2, out, t0 = Path(args.sst2), Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    report = {}

    # 1. unlabeled corpus -> BPE tokens -> pretraining
    corpus = out / "unlabeled.txt"
    ptb = gzip.open(Path(args.ptb) / "ptb.train.txt.gz", "rt", encoding="utf-8").read() if "ptb" in args.corpus else ""
    sentences = [line.rsplit("\t", 1)[0].strip() for line in
                 (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    corpus.write_text(ptb + "\n".join(sentences) + "\n", encoding="utf-8")
    prepare(str(corpus), out / "data", tokenizer="bpe", vocab_size=4096, val_fraction=0.02, progress=False)
    cfg = load_config(preset="demo", overrides=overrides([
        *sum(([k, v] for k, v in MODEL.items()), []), "lr", 2e-3, "warmup_steps", 50,
        "max_steps", args.pretrain_steps, "max_time_s", 0, "micro_batch_size", 32, "eval_interval", 100_000,
        "eval_tokens", 32_768, "checkpoint_interval", 100_000, "dropout", 0.0]))
    base = pretrain(cfg, out / "data", out / "base", progress=False)
    report["pretrain"] = {"steps": base.steps, "tokens": base.tokens_seen, "val_loss": round(base.val_loss, 4)}
    print(f"pretrained {base.steps} steps, val loss {base.val_loss:.3f} ({time.time() - t0:.0f} s so far)")

    # the same architecture and tokenizer, randomly initialised (the no-pretraining baseline)
    base_cfg = gptforge.load(out / "base").config
    torch.manual_seed(0)
    from gptforge.tokenizer import load_tokenizer
    save_checkpoint(out / "random", step=0, cfg=base_cfg, tokenizer=load_tokenizer(out / "base"),
                    model=GPT(base_cfg.model), state={"tokens_seen": 0, "val_loss": None})

    # 2. classification fine-tuning, pretrained vs random, then LoRA on the pretrained model; the same step budget
    arms = {"base": ("base", []), "random": ("random", []), "lora": ("base", LORA)}
    arms |= {f"{kind}_seed{seed}": (kind, ["seed", seed]) for seed in range(1, args.seeds) for kind in ("base", "random")}
    for name, (init, extra) in arms.items():
        ft = load_config(preset="finetune-classify", overrides=overrides(FINETUNE + CLASSIFY + extra + [
            "max_steps", args.finetune_steps]))
        result = gptforge.finetune(ft, sst2 / "train.tsv", out / f"cls_{name}", init=out / init,
                                   val_data=sst2 / "dev.tsv", progress=False)
        arm = {"steps": result.steps, "dev_accuracy": round(result.val_metrics["val_accuracy"], 4),
               "dev_macro_f1": round(result.val_metrics["val_macro_f1"], 4)}
        if name == "lora":
            arm["trainable_params"], arm["total_params"] = trainable_counts(out / f"cls_{name}")
        report[f"classify_{name}"] = arm
        print(f"classify ({name}): {arm} ({time.time() - t0:.0f} s so far)")
    report["pretraining_gain"] = pretraining_gain(report, args.seeds)
    rows = dev_rows(sst2)
    clf = Classifier(out / "cls_base")
    predicted = [int(p.label) for p in clf.predict([s for s, _ in rows])]
    report["classify_cli_path_dev_accuracy"] = round(sum(p == y for p, (_, y) in zip(predicted, rows)) / len(rows), 4)

    # 3. SFT: the label as generated text
    words = {0: " negative", 1: " positive"}
    sft_file = out / "sst2_sft.jsonl"
    train_lines = (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]
    with open(sft_file, "w", encoding="utf-8") as f:
        for line in train_lines:
            s, y = line.rsplit("\t", 1)
            f.write(json.dumps({"prompt": f"Review: {s.strip()}\nSentiment:", "completion": words[int(y)]}) + "\n")
    ft = load_config(preset="finetune-sft", overrides=overrides(FINETUNE + [
        "max_steps", args.sft_steps, "max_time_s", args.sft_s, "val_fraction", 0.01]))
    sft = gptforge.finetune(ft, sft_file, out / "sft", init=out / "base", progress=False)
    report["sft"] = {"steps": sft.steps, **sft_eval(out / "sft", rows)}
    report["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
