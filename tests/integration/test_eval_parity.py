"""Parity of `gptforge eval` with references, offline and in float32:
- per-choice log-likelihoods equal those of the same weights in transformers, computed straightforwardly;
- `--protocol lm-eval` gives lm-evaluation-harness's own `hf` backend's per-item predictions and accuracy on
  the exported model (hellaswag, arc_easy, piqa, winogrande; lm-eval's task YAMLs pointed at local JSONL);
- the lm-eval adapter (`--model gptforge`) gives the same per-item log-likelihoods as `gptforge eval`.
The model is a small GPT trained here for a few dozen steps on Tiny Shakespeare with a BPE tokenizer."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers/lm-eval import: nothing may touch the network
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import gptforge  # noqa: E402
from gptforge.checkpoint.convert import export_hf  # noqa: E402
from gptforge.checkpoint.io import save_checkpoint  # noqa: E402
from gptforge.config import Config, ModelConfig  # noqa: E402
from gptforge.eval.protocol import split_pair  # noqa: E402
from gptforge.eval.tasks import read_split  # noqa: E402
from gptforge.model.gpt import GPT  # noqa: E402
from gptforge.tokenizer import train_bpe  # noqa: E402

transformers = pytest.importorskip("transformers")
lm_eval = pytest.importorskip("lm_eval")

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "eval"


pytestmark = pytest.mark.usefixtures("one_thread")
TASKS = ("hellaswag", "arc_easy", "piqa", "winogrande")


def train_tiny(run: Path) -> None:
    """2 layers, d_model 64, context 128, trained 40 AdamW steps on Tiny Shakespeare-like text."""
    text = (ASSETS / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")
    for p in sorted(ASSETS.rglob("*.jsonl")):
        text += p.read_text(encoding="utf-8")
    tok = train_bpe([text], vocab_size=512)
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, context_length=128,
                                   dropout=0.0))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    ids = torch.tensor(tok.encode(text))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 129, (8,), generator=gen)
        batch = torch.stack([ids[s:s + 129] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 6.0, loss.item()  # it learned something (ln 512 = 6.24)
    save_checkpoint(run, step=40, cfg=cfg, tokenizer=tok, model=model.eval())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("parity") / "run"
    train_tiny(run)
    return run


@pytest.fixture(scope="module")
def hf_dir(run_dir, tmp_path_factory) -> Path:
    return export_hf(run_dir, tmp_path_factory.mktemp("hf") / "model")


def lm_eval_docs(task: str) -> list[dict]:
    """The fixture items in the Hugging Face layouts lm-eval's task YAMLs read."""
    docs = read_split(task, "eval", ASSETS)
    out = []
    for d in docs:
        f = d.fields
        if task == "hellaswag":
            label, _, ctx = f["context"].partition(": ")
            out.append({"activity_label": label, "ctx_a": ctx, "ctx_b": "", "endings": f["endings"],
                        "label": str(f["label"])})
        elif task == "arc_easy":
            out.append({"id": d.id, "question": f["question"], "choices": {"text": f["choices"], "label": f["labels"]},
                        "answerKey": f["labels"][f["label"]]})
        elif task == "piqa":
            out.append({"goal": f["goal"], "sol1": f["sol1"], "sol2": f["sol2"], "label": f["label"]})
        else:
            out.append({"sentence": f["sentence"], "option1": f["option1"], "option2": f["option2"],
                        "answer": str(f["label"] + 1)})
    return out


@pytest.fixture(scope="module")
def include_dir(tmp_path_factory) -> Path:
    """lm-eval's own task YAMLs (and helper modules, re-exported) with the dataset swapped for local JSONL."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    tasks_root = Path(lm_eval.__file__).parent / "tasks"
    sources = {"hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag.utils", "utils"),
               "arc_easy": ("arc/arc_easy.yaml", None, None), "piqa": ("piqa/piqa.yaml", None, None),
               "winogrande": ("winogrande/default.yaml", "winogrande.preprocess_winogrande", "preprocess_winogrande")}
    for task, (yaml_rel, helper, helper_name) in sources.items():
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in lm_eval_docs(task)), encoding="utf-8")
        text = (tasks_root / yaml_rel).read_text(encoding="utf-8")
        text = re.sub(r"(?m)^task: .*$", f"task: local_{task}", text)
        text = re.sub(r"(?m)^tag:\n(  - .*\n)+", "", text)
        text = re.sub(r"(?m)^dataset_path: .*$", "dataset_path: json", text)
        text = re.sub(r"(?m)^dataset_name: .*$", "dataset_name: null", text)
        text = re.sub(r"(?m)^(training|test)_split: .*$", r"\1_split: null", text)
        text += f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        (out / f"local_{task}.yaml").write_text(text, encoding="utf-8")
        if helper:
            (out / f"{helper_name}.py").write_text(f"from lm_eval.tasks.{helper} import *  # noqa\n",
                                                   encoding="utf-8")
    return out


def run_lm_eval(model, include_dir: Path, **kwargs) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, tasks=[f"local_{t}" for t in TASKS], num_fewshot=0, batch_size=4,
                           device="cpu", log_samples=True, task_manager=TaskManager(include_path=str(include_dir)),
                           **kwargs)


def per_item_lls(results: dict, task: str) -> dict[int, list[float]]:
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in results["samples"][f"local_{task}"]}


@pytest.fixture(scope="module")
def ours(run_dir) -> dict:
    return gptforge.evaluate(run_dir, list(TASKS), 0, data_dir=ASSETS, protocol="lm-eval", batch_size=5)


def test_loglikelihoods_equal_transformers_computed_straightforwardly(run_dir, hf_dir):
    lm = gptforge.load(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), torch_dtype=torch.float32).eval()
    report = gptforge.evaluate(lm, ["hellaswag", "arc_easy", "winogrande", "lambada"], "0,2", data_dir=ASSETS,
                               limit=6, batch_size=7)
    worst, checked = 0.0, 0
    for result in report["results"]:
        for item in result["samples"]:
            prompts = item["prompt"] if isinstance(item["prompt"], list) else [item["prompt"]] * len(item["choices"])
            for prompt, choice, ll in zip(prompts, item["choices"], item["loglikelihoods"]):
                ctx, cont = split_pair(lm.tokenizer, prompt, choice, "gpt3")
                ctx = ctx[-(129 - len(cont)):]  # the harness keeps as much context as fits 128 inputs
                ids = torch.tensor([list(ctx) + list(cont)])
                with torch.no_grad():
                    logp = torch.log_softmax(hf(ids[:, :-1]).logits.float(), dim=-1)[0]
                ref = sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
                worst = max(worst, abs(ref - ll))
                checked += 1
    assert checked >= 6 * (4 + 4 + 2 + 1) * 2 - 8 and worst < 1e-4, (checked, worst)


@pytest.fixture(scope="module")
def theirs(hf_dir, include_dir) -> dict:
    """lm-eval's own `hf` backend on the exported weights: per-item log-likelihoods and accuracies."""
    res = run_lm_eval("hf", include_dir, model_args={"pretrained": str(hf_dir), "dtype": "float32"})
    return {t: {"lls": per_item_lls(res, t), "acc": res["results"][f"local_{t}"]["acc,none"],
                "acc_norm": res["results"][f"local_{t}"].get("acc_norm,none")} for t in TASKS}


@pytest.mark.parametrize("task", TASKS)
def test_lm_eval_protocol_matches_lm_eval_hf_backend(task, ours, theirs):
    mine = next(r for r in ours["results"] if r["task"] == task)
    assert mine["n"] == len(theirs[task]["lls"]) == 12
    for i, item in enumerate(mine["samples"]):
        ref = theirs[task]["lls"][i]
        assert max(abs(a - b) for a, b in zip(item["loglikelihoods"], ref)) < 1e-4, (task, i)
        ref_pred = max(range(len(ref)), key=lambda j: (ref[j], -j))
        assert item["predictions"]["acc"] == ref_pred, (task, i)
    assert mine["metrics"]["acc"]["value"] == pytest.approx(theirs[task]["acc"], abs=1e-12)
    if theirs[task]["acc_norm"] is not None:
        assert mine["metrics"]["acc_norm"]["value"] == pytest.approx(theirs[task]["acc_norm"], abs=1e-12)


def test_adapter_gives_gptforge_eval_loglikelihoods(ours, run_dir, include_dir):
    from gptforge.eval.lm_eval import GptforgeLM

    res = run_lm_eval(GptforgeLM(path=str(run_dir), batch_size=3), include_dir)
    for task in TASKS:
        theirs = per_item_lls(res, task)
        mine = next(r for r in ours["results"] if r["task"] == task)["samples"]
        assert len(theirs) == len(mine) == 12
        worst = max(abs(a - b) for i, item in enumerate(mine) for a, b in zip(item["loglikelihoods"], theirs[i]))
        assert worst < 1e-5, (task, worst)
        acc = next(r for r in ours["results"] if r["task"] == task)["metrics"]["acc"]["value"]
        assert res["results"][f"local_{task}"]["acc,none"] == pytest.approx(acc, abs=1e-12)


@pytest.mark.slow  # a fresh lm-eval process: ~40 s of imports and dataset building on an idle 2-core machine
def test_lm_eval_command_line_finds_the_gptforge_model(run_dir, include_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gptforge.eval.lm_eval", "run", "--model", "gptforge",
                           "--model_args", f"path={run_dir}", "--tasks", "local_piqa", "--include_path",
                           str(include_dir), "--output_path", str(tmp_path / "out"), "--batch_size", "4"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"local_piqa\s*\|.*\|acc\s*\|", proc.stdout), proc.stdout[-2000:]


def test_adapter_rolling_and_generation(run_dir):
    from lm_eval.api.instance import Instance

    from gptforge.eval.lm_eval import GptforgeLM
    from gptforge.eval.perplexity import rolling_nll

    lm = gptforge.load(run_dir)
    adapter = GptforgeLM(lm=lm)
    text = (ASSETS / "wikitext-2" / "wiki.test.tokens").read_text(encoding="utf-8")[:3000]
    rolling = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    seq = [lm.tokenizer.eot_id] + lm.tokenizer.encode(text)
    assert len(seq) > 2 * 128 and rolling[0] == pytest.approx(-rolling_nll(lm.model, seq, stride=128), rel=1e-9)
    out = adapter.generate_until([Instance("generate_until", {}, ("The game", {"until": ["\n"], "max_gen_toks": 20}),
                                           0)])
    expected = lm.generate("The game", max_new_tokens=20, temperature=0.0, stop=("\n",))
    assert out == [expected.split("\n")[0]] and "\n" not in out[0]


@pytest.mark.slow  # a 124M model: ~1 minute to build, save, import and score
def test_gpt2_shape_from_transformers_scores_like_transformers(run_dir, hf_dir, tmp_path):
    """OpenAI's gpt2 shape (12 layers, d_model 768, context 1024, vocab 50257), initialised by transformers
    and saved locally, imported with `gptforge import`: per-choice log-likelihoods equal transformers'."""
    import shutil

    from gptforge.checkpoint.convert import import_hf

    lm_small = gptforge.load(run_dir)
    src = tmp_path / "gpt2"
    torch.manual_seed(0)
    eot = lm_small.tokenizer.eot_id
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(bos_token_id=eot, eos_token_id=eot)).eval()
    hf.save_pretrained(str(src))
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(hf_dir / name, src / name)
    import_hf(src, tmp_path / "run")
    report = gptforge.evaluate(tmp_path / "run", ["hellaswag", "piqa"], 1, data_dir=ASSETS, limit=3)
    lm = gptforge.load(tmp_path / "run")
    worst = 0.0
    for item in (s for r in report["results"] for s in r["samples"]):
        for choice, ll in zip(item["choices"], item["loglikelihoods"]):
            ctx, cont = split_pair(lm.tokenizer, item["prompt"], choice, "gpt3")
            ids = torch.tensor([list(ctx) + list(cont)])
            with torch.no_grad():
                logp = torch.log_softmax(hf(ids[:, :-1]).logits.float(), dim=-1)[0]
            worst = max(worst, abs(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)) - ll))
    assert worst < 1e-4, worst
