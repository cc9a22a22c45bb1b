"""`evaluate`: run tasks zero- and few-shot on a model and compute the metrics with standard errors.

For each (task, K): read the items (`eval.tasks`), draw and fit the demonstrations (`eval.protocol`), score
every continuation in length-sorted batches with the context shared by an item's choices (`eval.scoring`),
then compute per-item predictions and the task's metrics:
- `acc`: the choice with the highest total log-likelihood;
- `acc_token_norm`: the highest log-likelihood per continuation token (GPT-3 section 2.4's normalisation);
- `acc_norm`: the highest log-likelihood per character of the choice (lm-evaluation-harness's `acc_norm`);
- `acc_uncond` (ARC, gpt3): the highest log P(completion | context) - log P(completion | "Answer:") (the paper's
  ARC normalisation);
- LAMBADA: `acc` (every token of the last word greedy) and `perplexity` = exp(-mean log-likelihood of the word).
Standard errors: sample standard deviation / sqrt(n) for means; for perplexity the delta method
(perplexity x standard error of the mean log-likelihood). Ties go to the first choice (numpy's argmax).
This module must not import `gptforge.train`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptforge.errors import GptforgeError
from gptforge.eval.prompts import PROTOCOLS
from gptforge.eval.protocol import ItemPlan, check_shots, draw_shots, plan_item
from gptforge.eval.scoring import Group, score_groups
from gptforge.eval.tasks import Doc, data_dir_from, read_split, task_spec

# The headline metric of each task: the paper's normalisation under gpt3, lm-eval's reported metric otherwise.
PRIMARY = {"gpt3": {"lambada": "acc", "arc_easy": "acc_uncond", "arc_challenge": "acc_uncond",
                    "winogrande": "acc"},
           "lm-eval": {"hellaswag": "acc_norm", "piqa": "acc_norm", "arc_easy": "acc_norm",
                       "arc_challenge": "acc_norm"}}
LM_EVAL_METRICS = {"hellaswag": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm"), "arc_easy": ("acc", "acc_norm"),
                   "arc_challenge": ("acc", "acc_norm"), "winogrande": ("acc",), "boolq": ("acc",),
                   "sst2": ("acc",), "lambada": ("acc", "perplexity")}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _mean_stderr(values: list[float]) -> tuple[float | None, float | None]:
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def model_checksum(model: torch.nn.Module) -> str:
    """sha256 of the model's parameters and buffers (names, shapes, dtypes and bytes), hex."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_checksum(lm) -> tuple[str, str]:
    """(sha256 hex, what it is of): the checkpoint's model.safetensors as recorded in its state.json (verified
    when the checkpoint was loaded, so free here), else the in-memory parameters (`model_checksum`)."""
    ckpt = getattr(lm, "checkpoint", None)
    try:
        digest = json.loads((Path(ckpt) / "state.json").read_text(encoding="utf-8"))["files"]["model.safetensors"]
        return digest, f"{Path(ckpt) / 'model.safetensors'}"
    except (TypeError, OSError, KeyError, ValueError):
        return model_checksum(lm.model), "parameters in memory"


def model_info(lm) -> dict[str, Any]:
    """The "model" entry of the JSON report: checkpoint path, sha256 (and of what), config."""
    digest, source = checkpoint_checksum(lm)
    return {"checkpoint": str(getattr(lm, "checkpoint", "")), "sha256": digest, "sha256_of": source,
            "config": lm.config.to_dict() if hasattr(lm.config, "to_dict") else None}


def read_clean_ids(path: str | Path) -> dict[str, set[str]]:
    """The `{"task": [clean item ids...]}` JSON of `--clean_only`; raises GptforgeError if malformed."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptforgeError(f"--clean_only file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GptforgeError(f"--clean_only file {path} is not JSON: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise GptforgeError(f"--clean_only file {path} must be a JSON object {{\"task\": [item ids...]}}")
    return {task: {str(i) for i in ids} for task, ids in data.items()}


class _Progress:
    """A tqdm bar in items (items/s and ETA), fed with finished groups."""

    def __init__(self, desc: str, n_items: int, n_groups: int, enabled: bool) -> None:
        self.bar = None
        self.n_items, self.n_groups, self.groups_done, self.items_shown = n_items, max(n_groups, 1), 0, 0
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=n_items, desc=desc, unit="item", leave=False, dynamic_ncols=True)

    def __call__(self, n_groups: int) -> None:
        self.groups_done += n_groups
        items = min(self.n_items, round(self.groups_done * self.n_items / self.n_groups))  # whole items, <= total
        if self.bar is not None and items > self.items_shown:
            self.bar.update(items - self.items_shown)
        self.items_shown = max(items, self.items_shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _groups_of(plan: ItemPlan, groups: list[Group]) -> list[tuple[int, int]]:
    """Append the item's groups (choices sharing a context share a group); return (group, slot) per pair,
    choices first, then the unconditional pairs."""
    where, local = [], {}
    for pairs in (plan.pairs, plan.unconditional):
        for ctx, cont in pairs:
            if ctx not in local:
                local[ctx] = len(groups)
                groups.append(Group(ctx, ()))
            g = local[ctx]
            groups[g] = Group(ctx, groups[g].continuations + (cont,))
            where.append((g, len(groups[g].continuations) - 1))
    return where


def _item_record(task: str, plan: ItemPlan, scores: list[tuple[float, bool]]) -> dict[str, Any]:
    """Per-item predictions under every metric, and what `--samples` writes."""
    prompt, n = plan.prompt, len(plan.pairs)
    lls = [s[0] for s in scores[:n]]
    n_tokens = [len(cont) for _, cont in plan.pairs]
    rec: dict[str, Any] = {"task": task, "id": plan.doc.id, "k": plan.k,
                           "prompt": [plan.prefix + c for c in prompt.contexts] if len(set(prompt.contexts)) > 1
                           else plan.prefix + prompt.contexts[0],
                           "choices": list(prompt.continuations), "loglikelihoods": lls, "n_tokens": n_tokens,
                           "gold": prompt.gold, "truncated": plan.truncated}
    if task == "lambada":
        rec["greedy"] = scores[0][1]
        rec["correct"] = {"acc": float(scores[0][1]), "loglikelihood": lls[0]}
        return rec
    preds = {"acc": _argmax(lls),
             "acc_token_norm": _argmax([ll / t for ll, t in zip(lls, n_tokens)]),
             "acc_norm": _argmax([ll / max(len(c), 1) for ll, c in zip(lls, prompt.choice_texts)])}
    if plan.unconditional:
        uncond = [s[0] for s in scores[n:]]
        rec["unconditional_loglikelihoods"] = uncond
        preds["acc_uncond"] = _argmax([a - b for a, b in zip(lls, uncond)])
    rec["predictions"] = preds
    rec["correct"] = {m: float(p == prompt.gold) for m, p in preds.items()}
    return rec


def _aggregate(task: str, protocol: str, records: list[dict]) -> dict[str, dict[str, float | None]]:
    metrics: dict[str, dict[str, float | None]] = {}
    if protocol == "lm-eval":
        names = list(LM_EVAL_METRICS[task])
    elif task in ("lambada", "winogrande"):  # winogrande: partial scoring, one shared continuation
        names = ["acc"]
    else:
        names = ["acc", "acc_token_norm", "acc_norm"] + (["acc_uncond"] if task.startswith("arc") and
                                                          protocol == "gpt3" else [])
    for name in names:
        if name == "perplexity":
            continue
        value, se = _mean_stderr([r["correct"][name] for r in records])
        metrics[name] = {"value": value, "stderr": se}
    if task == "lambada":
        mean_ll, se = _mean_stderr([r["correct"]["loglikelihood"] for r in records])
        ppl = None if mean_ll is None else math.exp(-mean_ll)
        metrics["perplexity"] = {"value": ppl, "stderr": None if se is None else ppl * se}
    return metrics


def _demo_lengths(task: str, shots: list[Doc], tokenizer, protocol: str, window: int,
                  cache: dict[str, int]) -> list[int]:
    """Token count of each demonstration alone (cached by id; an unencodable one counts as too long)."""
    from gptforge.eval.prompts import format_item

    for s in shots:
        if s.id not in cache:
            try:
                cache[s.id] = len(tokenizer.encode(format_item(task, s, protocol, few_shot=True).demo))
            except GptforgeError:
                cache[s.id] = window + 1
    return [cache[s.id] for s in shots]


def run_task(lm, task: str, k: int, *, root: Path, protocol: str, seed: int, batch_size: int,
             limit: int | None, clean_ids: set[str] | None, progress: bool) -> dict[str, Any]:
    """Evaluate one task at K shots; returns its result dict, with per-item records under "samples"."""
    spec = task_spec(task)
    started = time.perf_counter()
    docs: list[Doc] = read_split(task, "eval", root)
    if clean_ids is not None:
        docs = [d for d in docs if d.id in clean_ids]
    if limit is not None:
        docs = docs[:limit]
    same_split = spec.train_paths is None
    pool = read_split(task, "train", root) if k else []
    if k:
        check_shots(task, k, len(pool), same_split=same_split, note=spec.shots_note)
    window = lm.config.model.context_length
    cache: dict[str, int] = {}
    plans = []
    for doc in docs:
        shots = draw_shots(task, doc, pool, k, seed, same_split=same_split)
        plans.append(plan_item(task, doc, shots, lm.tokenizer, protocol=protocol, window=window,
                               demo_lengths=_demo_lengths(task, shots, lm.tokenizer, protocol, window, cache)))
    scored = [p for p in plans if p.skipped is None]
    groups: list[Group] = []
    where = [_groups_of(p, groups) for p in scored]
    bar = _Progress(f"{task} {k}-shot", len(scored), len(groups), progress)
    try:
        results = score_groups(lm.model, groups, batch_size=batch_size, progress=bar)
    finally:
        bar.close()
    records = [_item_record(task, p, [results[g][s] for g, s in w]) for p, w in zip(scored, where)]
    elapsed = time.perf_counter() - started
    skipped: dict[str, int] = {}
    for p in plans:
        if p.skipped is not None:
            reason = p.skipped.split(":")[0]
            skipped[reason] = skipped.get(reason, 0) + 1
    primary = PRIMARY.get(protocol, {}).get(task, "acc_token_norm" if protocol == "gpt3" else "acc")
    return {
        "task": task, "k": k, "n": len(records), "n_skipped": sum(skipped.values()), "skipped": skipped,
        "n_truncated": sum(p.truncated for p in scored),
        "k_effective_mean": sum(p.k for p in scored) / len(scored) if scored else 0.0,
        "k_effective_min": min((p.k for p in scored), default=0),
        "shots_from": spec.shots_note if k else None,
        "metrics": _aggregate(task, protocol, records), "primary": primary,
        "chance": None if task == "lambada" else
        (sum(1 / len(r["choices"]) for r in records) / len(records) if records else None),
        "elapsed_s": elapsed, "items_per_s": len(records) / elapsed if elapsed > 0 else None,
        "samples": records,
    }


def _parse_shots(shots: int | str | Sequence[int]) -> list[int]:
    if isinstance(shots, int):
        values = [shots]
    elif isinstance(shots, str):
        try:
            values = [int(s) for s in shots.split(",") if s.strip()]
        except ValueError:
            raise GptforgeError(f"--shots must be integers like 0 or 0,1,5, got {shots!r}") from None
    else:
        values = [int(s) for s in shots]
    if not values or any(v < 0 for v in values):
        raise GptforgeError(f"--shots must be integers >= 0, got {shots!r}")
    return values


def evaluate(model_or_run_dir, tasks: str | Sequence[str], shots: int | str | Sequence[int] = 0, *,
             limit: int | None = None, seed: int = 1234, batch_size: int = 32, data_dir: str | Path | None = None,
             protocol: str = "gpt3", clean_only: str | Path | None = None, device: str = "cpu",
             progress: bool = False) -> dict[str, Any]:
    """Zero- and few-shot evaluation of a model on the named tasks (GPT-3 section 2.4).

    Args:
        model_or_run_dir: a run or checkpoint directory, or a `gptforge.api.LanguageModel`.
        tasks: task names (a list or a comma-separated string); see `eval.tasks.TASKS`.
        shots: K, or several K (a list or "0,1,5"); each task runs once per K.
        limit: evaluate only the first `limit` items of each task (>= 1).
        seed: seed of the per-item demonstration draw.
        batch_size: continuations per forward pass (>= 1).
        data_dir: folder of the eval sets (default: $GPTFORGE_EVAL_DATA).
        protocol: "gpt3" (the paper's formats and normalisations) or "lm-eval" (lm-evaluation-harness's).
        clean_only: a JSON file {"task": [item ids]}: evaluate only those items of each task named in it.
        device: where a run directory's model is loaded.
        progress: show a progress bar (items/s, ETA) on stderr.

    Returns:
        A JSON-serialisable dict: protocol, seed, clean_only, model (checkpoint, sha256, config) and
        "results", one dict per (task, K) with n, metrics {name: {value, stderr}}, primary, chance, effective
        K, timings and the per-item "samples".

    Raises:
        GptforgeError: an unknown task or protocol, a bad K or limit, missing or malformed data files.
    """
    if protocol not in PROTOCOLS:
        raise GptforgeError(f"unknown --protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise GptforgeError("no tasks given; e.g. --tasks hellaswag,piqa")
    for name in names:
        task_spec(name)
    ks = _parse_shots(shots)
    if limit is not None and limit < 1:
        raise GptforgeError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise GptforgeError(f"--batch_size must be >= 1, got {batch_size}")
    root = data_dir_from(data_dir)
    clean = read_clean_ids(clean_only) if clean_only is not None else None
    lm = model_or_run_dir
    if isinstance(lm, (str, Path)):
        from gptforge.api import load

        lm = load(lm, device=device)
    results = []
    for name in names:
        ids = None if clean is None else clean.get(name, set())
        for k in ks:
            results.append(run_task(lm, name, k, root=root, protocol=protocol, seed=seed, batch_size=batch_size,
                                    limit=limit, clean_ids=ids, progress=progress))
    return {"protocol": protocol, "seed": seed, "clean_only": None if clean_only is None else str(clean_only),
            "data_dir": str(root), "batch_size": batch_size, "limit": limit,
            "model": model_info(lm),
            "results": results}
