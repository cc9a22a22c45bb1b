"""Prompt formats: a task item -> the (context, continuation) strings to score, for both protocols.

`gpt3` follows the GPT-3 paper (Brown et al. 2020, section 2.4 and the example figures of Appendix G):
the item's natural text as context and each candidate completion as continuation, with these choices where
the paper is silent: HellaSwag and PIQA contexts are the bare text (no "Question:"), ARC is
"Question: ...\\nAnswer:" with the unconditional "Answer:" context for normalisation, BoolQ and SST-2 use the
label words "True"/"False" and "positive"/"negative", LAMBADA few-shot uses the paper's fill-in-the-blank
form ("... ____. -> word"), WinoGrande uses partial scoring (each option fills the blank; the rest of the
sentence is scored).
`lm-eval` reproduces lm-evaluation-harness 0.4's prompts for the tasks it ships (hellaswag, piqa,
arc_easy, arc_challenge, winogrande, boolq as super_glue, lambada_openai, sst2 as glue): the same
doc_to_text, choices and " " target delimiter. A demonstration is always the context plus the gold
continuation; demonstrations are joined by a blank line ("\\n\\n") in both protocols.
This module depends only on `eval.tasks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptforge.errors import GptforgeError
from gptforge.eval.tasks import Doc

PROTOCOLS = ("gpt3", "lm-eval")
SHOT_SEPARATOR = "\n\n"  # "demonstrations separated by a blank line" (GPT-3 section 2.4; lm-eval's default)
ANSWER_CONTEXT = "Answer:"  # GPT-3 section 2.4: P(completion | context) / P(completion | "Answer: ")


@dataclass(frozen=True)
class Prompt:
    """What to score for one item (before few-shot demonstrations are prepended).

    Attributes:
        contexts: one context per choice (the same string repeated unless partial scoring).
        continuations: one continuation per choice; its leading space is part of it.
        gold: index of the correct choice.
        choice_texts: the choices without delimiter, whose character lengths lm-eval's acc_norm divides by.
        demo: this item as a demonstration (context plus gold continuation).
        unconditional: for ARC under gpt3, the (context, continuation) pairs P(completion | "Answer:").
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    choice_texts: tuple[str, ...]
    demo: str
    unconditional: tuple[tuple[str, str], ...] = ()


def _mc(context: str, choices: list[str], gold: int, *, unconditional: bool = False) -> Prompt:
    conts = tuple(" " + c for c in choices)
    uncond = tuple((ANSWER_CONTEXT, c) for c in conts) if unconditional else ()
    return Prompt((context,) * len(choices), conts, gold, tuple(choices), context + conts[gold], uncond)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: WikiHow bracket markers out, " [title]" to ". ", double spaces once."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _winogrande(doc: Doc) -> Prompt:
    f = doc.fields
    blank = f["sentence"].index("_")
    options = [f["option1"], f["option2"]]
    rest = " " + f["sentence"][blank + 1:].strip()
    contexts = tuple(f["sentence"][:blank] + o for o in options)
    return Prompt(contexts, (rest, rest), f["label"], tuple(options), contexts[f["label"]] + rest)


def _lambada(doc: Doc, protocol: str, few_shot: bool) -> Prompt:
    f = doc.fields
    if protocol == "gpt3" and few_shot:  # GPT-3 section 3.1.2: the fill-in-the-blank format
        context = f"{f['context']} ____. ->"
    else:
        context = f["context"]
    cont = " " + f["word"]
    return Prompt((context,), (cont,), 0, (f["word"],), context + cont)


def format_item(task: str, doc: Doc, protocol: str, *, few_shot: bool = False) -> Prompt:
    """The prompt of `doc` of `task` under `protocol` ("gpt3" or "lm-eval").

    Args:
        few_shot: whether demonstrations will be prepended (only LAMBADA's gpt3 format depends on it).

    Raises:
        GptforgeError: an unknown protocol or task.
    """
    if protocol not in PROTOCOLS:
        raise GptforgeError(f"unknown protocol {protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    f, gpt3 = doc.fields, protocol == "gpt3"
    if task == "lambada":
        return _lambada(doc, protocol, few_shot)
    if task == "winogrande":
        return _winogrande(doc)
    if task == "hellaswag":
        if gpt3:
            return _mc(f["context"], list(f["endings"]), f["label"])
        return _mc(_hellaswag_clean(f["context"]), [_hellaswag_clean(e) for e in f["endings"]], f["label"])
    if task == "piqa":
        context = f["goal"] if gpt3 else f"Question: {f['goal']}\nAnswer:"
        return _mc(context, [f["sol1"], f["sol2"]], f["label"])
    if task in ("arc_easy", "arc_challenge"):
        return _mc(f"Question: {f['question']}\nAnswer:", list(f["choices"]), f["label"], unconditional=gpt3)
    if task == "boolq":
        if gpt3:
            return _mc(f"{f['passage']}\nquestion: {f['question']}?\nanswer:", ["False", "True"], f["label"])
        return _mc(f"{f['passage']}\nQuestion: {f['question']}?\nAnswer:", ["no", "yes"], f["label"])
    if task == "sst2":
        if gpt3:
            return _mc(f"Review: {f['sentence']}\nSentiment:", ["negative", "positive"], f["label"])
        return _mc(f"{f['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",
                   ["negative", "positive"], f["label"])
    raise GptforgeError(f"no prompt format for task {task!r}")
