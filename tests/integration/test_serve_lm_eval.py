"""lm-evaluation-harness's `local-completions` model scores ARC-Easy items through the server (echo + logprobs,
token-id prompts, the server's own tokenizer endpoints); every choice's log-likelihood and every item's chosen
answer must equal what the model itself gives, computed directly with `model/loss.py`."""

import json

import pytest

pytest.importorskip("fastapi")
lm_eval = pytest.importorskip("lm_eval")

import torch  # noqa: E402
from serve_support import live_server, make_run, one_thread  # noqa: E402

import gptforge  # noqa: E402
from conftest import shared_data_dir, skip_without_shared_data  # noqa: E402
from gptforge.model.loss import target_logprobs  # noqa: E402

TASK_YAML = """task: arc_easy_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def arc_items(n: int) -> list[dict]:
    """The first n ARC-Easy test items short enough for a 256-token context, flattened for the task YAML."""
    src = shared_data_dir() / "arc" / "ARC-Easy" / "ARC-Easy-Test.jsonl"
    if not src.is_file():
        skip_without_shared_data(shared_data_dir())
    items = []
    for line in src.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        q = rec["question"]
        labels = [c["label"] for c in q["choices"]]
        if len(q["stem"]) < 120 and rec["answerKey"] in labels:
            items.append({"question": q["stem"], "choices": [c["text"] for c in q["choices"]],
                          "gold": labels.index(rec["answerKey"])})
        if len(items) == n:
            return items
    raise AssertionError("not enough short ARC-Easy items")


def direct_loglikelihood(lm, context: str, continuation: str) -> float:
    """lm-eval's split of a (context, continuation) pair, scored by the model in one forward pass."""
    tok = lm.tokenizer
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    tokens = ctx + whole[len(ctx):]
    with torch.no_grad():
        logits = lm.model(torch.tensor([tokens[:-1]]))
    logprobs, _ = target_logprobs(logits, torch.tensor([tokens[1:]]))
    return float(logprobs[0, len(ctx) - 1:].sum())


def test_lm_eval_local_completions_matches_the_model(tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    items = arc_items(6)
    data = tmp_path / "arc_easy.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in items))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "arc_easy_local.yaml").write_text(TASK_YAML.format(data=data))
    run = make_run(tmp_path / "model", context_length=256)
    from lm_eval.tasks import TaskManager

    with live_server(run, max_tokens_cap=16) as (url, _):
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{url}/v1/completions", "model": "tiny", "tokenizer_backend": "remote",
                        "tokenized_requests": True, "max_length": 256, "num_concurrent": 1, "max_retries": 1},
            tasks=["arc_easy_local"], task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
            log_samples=True, bootstrap_iters=0)
    samples = sorted(results["samples"]["arc_easy_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(items)
    lm = gptforge.load(run)
    with one_thread():
        for sample, item in zip(samples, items):
            served = [float(ll) for ll, _ in sample["filtered_resps"]]
            direct = [direct_loglikelihood(lm, f"Question: {item['question']}\nAnswer:", " " + choice)
                      for choice in item["choices"]]
            assert served == pytest.approx(direct, abs=1e-3), item["question"]
            assert max(range(len(served)), key=served.__getitem__) == max(range(len(direct)), key=direct.__getitem__)
    accuracy = results["results"]["arc_easy_local"]["acc,none"]
    expected = sum(max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) == it["gold"]
                   for s, it in zip(samples, items)) / len(items)
    assert accuracy == pytest.approx(expected)
