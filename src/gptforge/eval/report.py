"""The printed results table, with published reference values beside each metric for context.

References (fractions; the paper prints percent):
- GPT-3 Small (125M): Brown et al. 2020, Table H.1 (zero-shot, one-shot, few-shot columns; the paper's own
  K per task, e.g. LAMBADA K=15, HellaSwag K=20). Its numbers come from the paper's prompts and full
  splits; gptforge's data folder holds about 80% of each eval split, so they are context, not targets.
- GPT-2 124M under lm-evaluation-harness (zero-shot, `hf` backend) as commonly reported for
  `--model hf --model_args pretrained=gpt2`.
Both sets were transcribed by hand: check them against the sources before citing them.
"""

from __future__ import annotations

from typing import Any

# task -> metric -> (zero-shot, one-shot, few-shot), Table H.1, GPT-3 Small.
GPT3_SMALL = {
    "lambada": {"acc": (0.427, 0.220, 0.220), "perplexity": (18.6, 165.0, 165.0)},
    "hellaswag": {"acc_token_norm": (0.337, 0.330, 0.335)},
    "piqa": {"acc_token_norm": (0.646, 0.643, 0.643)},
    "arc_easy": {"acc_uncond": (0.436, 0.427, 0.427)},
    "arc_challenge": {"acc_uncond": (0.266, 0.255, 0.255)},
    "winogrande": {"acc": (0.520, 0.513, 0.513)},
}
# task -> metric -> zero-shot value, GPT-2 124M under lm-eval's hf backend.
GPT2_LM_EVAL = {
    "lambada": {"acc": 0.3256, "perplexity": 40.06},
    "hellaswag": {"acc": 0.2892, "acc_norm": 0.3114},
    "piqa": {"acc": 0.6289, "acc_norm": 0.6251},
    "arc_easy": {"acc": 0.4381, "acc_norm": 0.3948},
    "arc_challenge": {"acc": 0.1903, "acc_norm": 0.2270},
    "winogrande": {"acc": 0.5162},
    "boolq": {"acc": 0.4872},
}


def reference(task: str, metric: str, k: int) -> tuple[float | None, float | None]:
    """(GPT-3 Small value for this K's setting, GPT-2 124M lm-eval zero-shot value, K = 0 only)."""
    gpt3 = GPT3_SMALL.get(task, {}).get(metric)
    gpt2 = GPT2_LM_EVAL.get(task, {}).get(metric) if k == 0 else None
    return (gpt3[min(k, 2)] if gpt3 else None), gpt2


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric == "perplexity":
        return f"{value:.2f}" if value < 1e6 else f"{value:.3g}"
    return f"{value:.4f}"


def format_table(report: dict[str, Any]) -> str:
    """The results of `evaluate` as a fixed-width table: one line per (task, K, metric), the primary metric
    marked with '*'."""
    head = ("task", "K", "K_eff", "n", "metric", "value", "± se", "chance", "GPT-3 Small", "GPT-2 124M", "items/s")
    rows = [head]
    for r in report["results"]:
        for metric, m in r["metrics"].items():
            gpt3, gpt2 = reference(r["task"], metric, r["k"])
            chance = r["chance"] if metric.startswith("acc") else None
            rows.append((r["task"], str(r["k"]), f"{r['k_effective_mean']:.2f}", str(r["n"]),
                         metric + ("*" if metric == r["primary"] else ""), _fmt(m["value"], metric),
                         _fmt(m["stderr"], metric), _fmt(chance, metric), _fmt(gpt3, metric), _fmt(gpt2, metric),
                         f"{r['items_per_s']:.1f}" if r["items_per_s"] else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    notes = [f"protocol {report['protocol']}, seed {report['seed']}, model sha256 {report['model']['sha256'][:16]}"]
    if report.get("clean_only"):
        notes.append(f"clean_only: {report['clean_only']} (only the items listed there)")
    for r in report["results"]:
        if r["n_skipped"] or r["n_truncated"]:
            why = "; ".join(f"{n}: {reason}" for reason, n in r["skipped"].items())
            notes.append(f"{r['task']} K={r['k']}: {r['n_skipped']} items skipped{f' ({why})' if why else ''}, "
                         f"{r['n_truncated']} with the context cut from the left to fit the window")
    return "\n".join(lines + [""] + notes)


def format_perplexity(name: str, result: dict[str, Any]) -> str:
    """One line: tokens, perplexity, bits per byte, window/stride and speed."""
    return (f"{name}: {result['tokens']:,} tokens, {result['bytes']:,} bytes, perplexity {result['perplexity']:.3f}, "
            f"bits/byte {result['bits_per_byte']:.4f} (window {result['window']}, stride {result['stride']}, "
            f"{result['elapsed_s']:.1f} s, {result['tokens_per_s']:,.0f} tokens/s)")
