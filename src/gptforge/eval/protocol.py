"""The few-shot protocol: demonstrations, fitting them into the context window, and the token boundary.

GPT-3 section 2.4: K demonstrations drawn at random from the task's training split (from the evaluated
split itself, the item excluded, where there is none), separated by a blank line, and K reduced per item to
what fits the context window. The rules here:
- Shots are drawn with `random.Random(f"{seed}:{task}:{item id}")`, so an item's shots do not depend on
  `--limit`, the batch size or the order of evaluation; from the evaluated split the item itself is never
  among its own shots (lm-evaluation-harness issue 4145).
- Fitting drops the last demonstrations first; the item is never truncated. If even K = 0 does not fit, the
  context is cut from the left for each continuation separately (every continuation keeps as much context
  as fits) and only continuation tokens are scored (lm-eval issue 942). A continuation longer than the
  window is a skipped item.
- The boundary: trailing whitespace of the context moves to the continuation. Under `gpt3` the input is the
  tokenization of the whole string `context + continuation`, the continuation being the tokens past the
  longest prefix shared with the context's own tokenization; under `lm-eval` it is lm-eval's rule (context
  tokens, then the whole string's tokens past the context's count). If that leaves no token the
  continuation is tokenized on its own (lm-eval issue 1297), so a continuation is never zero tokens. An
  empty context becomes the end-of-text token.
This module depends on `eval.tasks` and `eval.prompts` only; it knows nothing of models.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from gptforge.errors import GptforgeError
from gptforge.eval.prompts import SHOT_SEPARATOR, Prompt, format_item
from gptforge.eval.tasks import Doc

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (context ids, continuation ids)


@dataclass
class ItemPlan:
    """One item ready to score: `prompt`, the effective number of demonstrations `k`, the demonstrations
    text `prefix`, per choice the (context, continuation) token ids `pairs`, the unconditional pairs
    (ARC under gpt3), whether the context was cut, and `skipped` (a reason) when the item cannot be scored."""

    doc: Doc
    prompt: Prompt
    k: int = 0
    prefix: str = ""
    pairs: tuple[Pair, ...] = ()
    unconditional: tuple[Pair, ...] = ()
    truncated: bool = False
    skipped: str | None = None


def split_pair(tokenizer, context: str, continuation: str, protocol: str) -> Pair:
    """Token ids of (context, continuation) by the boundary rule above (`protocol` "gpt3" or "lm-eval").

    Raises:
        GptforgeError: the tokenizer cannot encode the text (a character-level vocabulary).
    """
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    if not context:
        return (tokenizer.eot_id,), tuple(tokenizer.encode(continuation))
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    k = len(ctx)
    if protocol == "gpt3":
        k = next((i for i, (a, b) in enumerate(zip(ctx, whole)) if a != b), min(len(ctx), len(whole)))
        ctx = whole[:k] if k else ctx
    cont = whole[k:] if k else whole[len(ctx):]
    if not cont:
        cont = tokenizer.encode(continuation)
    return tuple(ctx), tuple(cont)


def draw_shots(task: str, doc: Doc, pool: list[Doc], k: int, seed: int, *, same_split: bool) -> list[Doc]:
    """`k` demonstrations for `doc`, drawn from `pool` with the per-item seed; never `doc` itself when the
    pool is its own split."""
    if k == 0:
        return []
    rng = random.Random(f"{seed}:{task}:{doc.id}")
    picked = [pool[i] for i in rng.sample(range(len(pool)), min(k + 1, len(pool)))]
    if same_split:
        picked = [d for d in picked if d.id != doc.id]
    return picked[:k]


def check_shots(task: str, k: int, pool_size: int, *, same_split: bool, note: str) -> None:
    """Raise GptforgeError when K exceeds the demonstrations available (the item excluded on the same split)."""
    available = pool_size - 1 if same_split else pool_size
    if k < 0:
        raise GptforgeError(f"--shots must be >= 0, got {k}")
    if k > available:
        raise GptforgeError(f"{task}: K={k} exceeds the {available} demonstrations available ({note})")


def _fits(pairs: tuple[Pair, ...], window: int) -> bool:
    return all(len(c) + len(x) - 1 <= window for c, x in pairs)


def plan_item(task: str, doc: Doc, shots: list[Doc], tokenizer, *, protocol: str, window: int,
              demo_lengths: list[int] | None = None) -> ItemPlan:
    """Build the `ItemPlan` of `doc` with up to len(shots) demonstrations that fit `window` tokens.

    Args:
        shots: the drawn demonstrations, in order; the last ones are dropped first.
        demo_lengths: optional token counts of each demonstration alone, used to skip exact checks of K values
            that clearly cannot fit (the answer is the same, just faster).
    """
    prompt = format_item(task, doc, protocol, few_shot=bool(shots))
    plan = ItemPlan(doc, prompt)
    demos = [format_item(task, s, protocol, few_shot=True).demo for s in shots]
    try:
        zero = tuple(split_pair(tokenizer, c, x, protocol) for c, x in zip(prompt.contexts, prompt.continuations))
        uncond = tuple(split_pair(tokenizer, c, x, protocol) for c, x in prompt.unconditional)
        if any(len(x) > window for _, x in zero + uncond):
            plan.skipped = f"a continuation is longer than the {window}-token window"
            return plan
        plan.unconditional = tuple((c[-(window + 1 - len(x)):], x) for c, x in uncond)
        base = max(len(c) + len(x) - 1 for c, x in zero)
        for k in range(len(demos), -1, -1):
            if k and demo_lengths is not None and base + sum(demo_lengths[:k]) > window + 8 + 4 * k:
                continue
            prefix = SHOT_SEPARATOR.join(demos[:k]) + SHOT_SEPARATOR if k else ""
            pairs = zero if not k else tuple(split_pair(tokenizer, prefix + c, x, protocol)
                                             for c, x in zip(prompt.contexts, prompt.continuations))
            if k == 0 and not _fits(pairs, window):
                pairs = tuple((c[-(window + 1 - len(x)):], x) for c, x in pairs)
                plan.truncated = True
            if _fits(pairs, window):
                plan.k, plan.prefix, plan.pairs = k, prefix, pairs
                return plan
    except GptforgeError as exc:  # a character the (char-level) vocabulary lacks
        plan.skipped = f"not encodable: {exc}"
        return plan
    raise AssertionError("unreachable: K = 0 always fits after truncation")
