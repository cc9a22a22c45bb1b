"""The value of pretraining, measured on SST-2 (issue 9's acceptance recipe; under 15 minutes on 2 CPU cores).

1. Pretrain a small BPE GPT on unlabeled text: PTB train + the SST-2 training sentences without their labels.
2. Fine-tune it as a classifier (GPT-1's last-token head, Radford et al. 2018 section 3.2, with the CPU-budget
   settings below) on SST-2 train; report dev accuracy. Then the same fine-tune from random initialisation with the
   same budget (the difference is what pretraining buys), and LoRA (r = 8 on every block linear layer, base frozen)
   on the pretrained model with the same budget.
3. SFT variant: SST-2 as "Review: ...\\nSentiment:" -> " positive" / " negative"; greedy generation on dev with
   the generation engine; report label accuracy and the fraction of generations that stop right after the label.

Usage: PYTHONPATH=src python examples/finetune_sst2.py [--sst2 DIR] [--ptb DIR] [--out DIR] [--pretrain_s S]
       [--finetune_steps N] [--finetune_s S]
Needs the SST-2 (sentence\\tlabel TSVs) and PTB (ptb.train.txt.gz) files; see ../shared/data/README.md.
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
# GPT-1's recipe scaled to a CPU budget: a tiny model needs a larger lr (1e-3) than GPT-1's 6.25e-5, and the
# auxiliary LM loss (GPT-1: weight 0.5) is off for the classifier because its 4096-way LM head doubles the cost of
# a step here; with a fixed time budget more steps bought more accuracy (0.757 vs 0.607 dev accuracy measured).
CLASSIFY = ["lm_loss_weight", 0.0, "lr", 1e-3]
FINETUNE = ["lr", 5e-4, "micro_batch_size", 32, "global_batch_size", 32, "epochs", 0, "warmup_fraction", 0.02,
            "eval_interval", 10_000, "checkpoint_interval", 10_000, "dropout", 0.1]


# LoRA (Hu et al. 2021) r = 8 on every linear layer of the blocks; the classification head stays trainable. Adapters
# learn with a larger step than full fine-tuning (their B matrix starts at zero).
LORA = ["lora_r", 8, "lora_alpha", 16, "lora_targets", "qkv,attn_proj,mlp_fc,mlp_proj", "lr", 3e-3]


def trainable_counts(run: Path) -> tuple[int, int]:
    """(trainable, total) parameters of a LoRA classification run: adapters + score head vs everything."""
    model = GPT(gptforge.load(run).config.model)
    return freeze_base(model, ("score",))


def overrides(pairs):
    return [(str(pairs[i]), pairs[i + 1]) for i in range(0, len(pairs), 2)]


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
    ap.add_argument("--ptb", default="../shared/data/ptb")
    ap.add_argument("--out", default="runs/sst2_example")
    ap.add_argument("--pretrain_s", type=float, default=240.0)
    ap.add_argument("--finetune_s", type=float, default=180.0)
    ap.add_argument("--finetune_steps", type=int, default=1200)
    args = ap.parse_args()
    sst2, out, t0 = Path(args.sst2), Path(args.out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    report = {}

    # 1. unlabeled corpus -> BPE tokens -> pretraining
    corpus = out / "unlabeled.txt"
    ptb = gzip.open(Path(args.ptb) / "ptb.train.txt.gz", "rt", encoding="utf-8").read()
    sentences = [line.rsplit("\t", 1)[0].strip() for line in
                 (sst2 / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    corpus.write_text(ptb + "\n".join(sentences) + "\n", encoding="utf-8")
    prepare(str(corpus), out / "data", tokenizer="bpe", vocab_size=4096, val_fraction=0.02, progress=False)
    cfg = load_config(preset="demo", overrides=overrides([
        *sum(([k, v] for k, v in MODEL.items()), []), "lr", 2e-3, "warmup_steps", 50, "max_steps", 3000,
        "max_time_s", args.pretrain_s, "micro_batch_size", 32, "eval_interval", 100_000, "eval_tokens", 32_768,
        "checkpoint_interval", 100_000, "dropout", 0.0]))
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
    for name, (init, extra) in arms.items():
        ft = load_config(preset="finetune-classify", overrides=overrides(FINETUNE + CLASSIFY + extra + [
            "max_steps", args.finetune_steps, "max_time_s", args.finetune_s]))
        result = gptforge.finetune(ft, sst2 / "train.tsv", out / f"cls_{name}", init=out / init,
                                   val_data=sst2 / "dev.tsv", progress=False)
        arm = {"steps": result.steps, "dev_accuracy": round(result.val_metrics["val_accuracy"], 4),
               "dev_macro_f1": round(result.val_metrics["val_macro_f1"], 4)}
        if extra:
            arm["trainable_params"], arm["total_params"] = trainable_counts(out / f"cls_{name}")
        report[f"classify_{name}"] = arm
        print(f"classify ({name}): {arm} ({time.time() - t0:.0f} s so far)")
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
        "max_steps", args.finetune_steps, "max_time_s", args.finetune_s, "val_fraction", 0.01]))
    sft = gptforge.finetune(ft, sft_file, out / "sft", init=out / "base", progress=False)
    report["sft"] = {"steps": sft.steps, **sft_eval(out / "sft", rows)}
    report["total_s"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
