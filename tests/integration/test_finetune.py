"""Fine-tuning through the CLI on real data (SST-2, GSM8K subsets; a tiny BPE model): classification with
labels, metrics, `classify`, `generate` and a Hugging Face export with logits parity; SFT with prompt masking;
bad input leaves nothing behind; SIGKILL + --resume is bitwise exact; import -> finetune -> export round trip."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import kill_mid_run, shared_data_dir, skip_without_shared_data
from gptforge.checkpoint.io import find_resume_checkpoint, save_checkpoint
from gptforge.config import Config, ModelConfig, config_from_dict
from gptforge.model.gpt import GPT
from gptforge.tokenizer import load_tokenizer, train_bpe

transformers = pytest.importorskip("transformers")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread each is faster on a shared machine


def cli(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "gptforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ENV)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-2000:])
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = shared_data_dir()
    if not (root / "sst2" / "train.tsv").is_file() or not (root / "gsm8k" / "train.jsonl").is_file():
        skip_without_shared_data(root)
    out = tmp_path_factory.mktemp("ftdata")
    train = (root / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    dev = (root / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (out / "train.tsv").write_text("\n".join(train[:161]) + "\n", encoding="utf-8")  # header + 160
    (out / "dev.tsv").write_text("\n".join(dev[:41]) + "\n", encoding="utf-8")
    gsm = (root / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:40]
    (out / "gsm.jsonl").write_text("\n".join(gsm) + "\n", encoding="utf-8")
    texts = [line.rsplit("\t", 1)[0] for line in train[1:2001]] + [json.loads(x)["question"] for x in gsm]
    tok = train_bpe(texts, 400)
    cfg = config_from_dict(Config(model=ModelConfig(n_layer=2, n_head=2, d_model=32, context_length=128,
                                                    vocab_size=tok.vocab_size)).to_dict())
    torch.manual_seed(0)
    save_checkpoint(out / "base", step=0, cfg=cfg, tokenizer=tok, model=GPT(cfg.model),
                    state={"tokens_seen": 0, "val_loss": None})
    tok.save(out / "base")
    return out


FAST = ["--quiet", "--epochs", 0, "--max_steps", 6, "--micro_batch_size", 8, "--global_batch_size", 16,
        "--eval_interval", 3, "--checkpoint_interval", 3]


def hf_inputs(tokenizer, texts):
    ids = [tokenizer.encode(t) for t in texts]
    x = torch.full((len(ids), max(map(len, ids))), tokenizer.eot_id)
    for i, r in enumerate(ids):
        x[i, :len(r)] = torch.tensor(r)
    return x, torch.tensor([len(r) for r in ids])


def assert_hf_classifier_parity(run, export_dir, texts):
    from gptforge.finetune.predict import Classifier

    clf = Classifier(run)
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(str(export_dir)).eval()
    cfg = json.loads((export_dir / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"] and cfg["pad_token_id"] == clf.tokenizer.eot_id
    assert cfg["id2label"] == {str(i): name for i, name in enumerate(clf.labels)}
    x, lengths = hf_inputs(clf.tokenizer, texts)  # right-padded with end-of-text: HF pools the last non-pad
    with torch.no_grad():
        ours = clf.model(x, head="classify", lengths=lengths)
        theirs = hf(input_ids=x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_classify_cli_on_sst2_then_classify_generate_export(data, tmp_path):
    out = tmp_path / "cls"
    steps_only = [x for x in FAST if x not in ("--epochs", 0)]  # --max_steps alone must win over the preset's epochs
    proc = cli("finetune", "--init", data / "base", "--data", data / "train.tsv", "--val_data", data / "dev.tsv",
               "--task", "classify", "--out", out, *steps_only)
    log = proc.stdout + proc.stderr
    assert "labels: 0=0, 1=1" in log and "val loss" in log and "macro_f1" in proc.stdout
    assert "--max_steps given, so finetune.epochs is 0" in log
    assert json.loads((out / "labels.json").read_text())["labels"] == ["0", "1"]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_accuracy" in r]
    assert [r["step"] for r in val] == [3, 6]
    assert all(0 <= r["val_accuracy"] <= 1 and 0 <= r["val_macro_f1"] <= 1 for r in val)
    assert all(r["val_accuracy"] * 40 == pytest.approx(round(r["val_accuracy"] * 40)) for r in val)  # of 40
    assert "val_tp_0" not in val[0] and (out / "best").is_file()
    saved = json.loads((find_resume_checkpoint(out) / "config.json").read_text())
    assert saved["model"]["n_labels"] == 2 and saved["model"]["context_length"] == 128  # the init architecture
    assert saved["optim"]["lr"] == 6.25e-5 and saved["optim"]["lr_schedule"] == "linear"  # GPT-1 preset
    got = cli("classify", out, "--text", "a wonderful , moving film", "--text", "dull", "--json").stdout
    rows = [json.loads(x) for x in got.splitlines()]
    assert [r["text"] for r in rows] == ["a wonderful , moving film", "dull"]
    assert all(r["label"] in ("0", "1") and abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)
    assert cli("generate", out, "--prompt", "the", "--max_new_tokens", 5, "--seed", 0).returncode == 0
    cli("export", out, "--out", tmp_path / "hf")
    assert_hf_classifier_parity(out, tmp_path / "hf", ["a wonderful , moving film", "dull", "it is not bad at all"])


def test_sft_cli_on_gsm8k_masks_prompts(data, tmp_path):
    args = ["--init", data / "base", "--data", data / "gsm.jsonl", "--task", "sft", "--prompt_field", "question",
            "--completion_field", "answer", *FAST]
    masked = cli("finetune", *args, "--out", tmp_path / "masked").stderr
    unmasked = cli("finetune", *args, "--out", tmp_path / "all", "--mask_prompt", "false").stderr

    def counts(text):
        line = next(x for x in text.splitlines() if x.startswith("sft train"))
        return [int(n.replace(",", "")) for n in re.findall(r"(\d[\d,]*) (?:examples|tokens|scored|masked)", line)]

    m, u = counts(masked), counts(unmasked)
    assert m[0] == u[0] == 38 and m[1] == u[1]  # 40 minus 5% held out
    assert m[2] < u[2] and m[2] + m[3] == m[1] and u[3] == 0  # prompt targets masked only with masking on
    assert "sft val: 2 examples" in masked
    assert cli("generate", tmp_path / "masked", "--prompt", "Q", "--max_new_tokens", 4).returncode == 0


@pytest.mark.parametrize("case, message", [
    ("label", r"dev.tsv:2: label '7' is not in the training file's label set \(0, 1\)"),
    ("field", r"train.tsv:3: missing field 'label'"),
    ("chars", r"train.tsv:2: the --init model's tokenizer cannot encode this example"),
    ("completion", r"d.jsonl:1: field 'completion' is empty"),
    ("binary", r"train.tsv is not UTF-8 text \(byte \d+"),
])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, case, message):
    train, dev, init, task = data / "train.tsv", data / "dev.tsv", data / "base", "classify"
    if case == "label":
        dev = tmp_path / "dev.tsv"
        dev.write_text("sentence\tlabel\nfine\t7\n")
    elif case == "field":
        train = tmp_path / "train.tsv"
        train.write_text("sentence\tlabel\ngood\t1\nno label here\n")
    elif case == "binary":  # e.g. a compressed file given by mistake: a one-line error, not a UnicodeDecodeError
        train = tmp_path / "train.tsv"
        train.write_bytes(b"sentence\tlabel\n\x1f\x8b\x08\x00\xff\xfe\xfa\t1\n")
    elif case == "chars":  # a character-level init model cannot encode characters it never saw
        from gptforge.tokenizer import CharTokenizer

        tok = CharTokenizer("abc ")
        cfg = config_from_dict(Config(model=ModelConfig(n_layer=1, n_head=1, d_model=8, context_length=16,
                                                        vocab_size=tok.vocab_size)).to_dict())
        init = tmp_path / "charbase"
        save_checkpoint(init, step=0, cfg=cfg, tokenizer=tok, model=GPT(cfg.model), state={"tokens_seen": 0})
    else:
        task, train = "sft", tmp_path / "d.jsonl"
        train.write_text('{"prompt": "x", "completion": ""}\n')
    proc = cli("finetune", "--init", init, "--data", train, "--val_data", dev, "--task", task,
               "--out", tmp_path / "out", *FAST, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_holding_a_users_files_is_refused_and_left_untouched(data, tmp_path):
    """A directory with files a run would write (config.yaml, metrics.jsonl, labels.json, ...) but no checkpoints is
    someone's: it is refused as it is, not overwritten or appended to."""
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("config.yaml", "labels.json", "metrics.jsonl", "notes.txt"):
        (out / name).write_text(f"my {name}\n")
    proc = cli("finetune", "--init", data / "base", "--data", data / "train.tsv", "--val_data", data / "dev.tsv",
               "--task", "classify", "--out", out, *FAST, check=False)
    assert proc.returncode == 2 and "which a run would overwrite" in proc.stderr and "config.yaml" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "labels.json", "metrics.jsonl", "notes.txt"]
    assert all((out / name).read_text() == f"my {name}\n" for name in ("config.yaml", "labels.json", "metrics.jsonl"))
    proc = cli("finetune", "--init", data / "base", "--data", data / "train.tsv", "--task", "classify",
               "--out", out / "notes.txt", *FAST, check=False)  # a file given as the run directory
    assert proc.returncode == 2 and "is a file, not a run directory" in proc.stderr
    assert (out / "notes.txt").read_text() == "my notes.txt\n"


RESUME = ["--task", "classify", "--quiet", "--epochs", 0, "--max_steps", 24, "--checkpoint_interval", 5,
          "--eval_interval", 8, "--log_interval", 1, "--micro_batch_size", 4, "--global_batch_size", 8,
          "--keep_checkpoints", 2, "--lr", 1e-3]


def test_sigkill_then_resume_is_bitwise_identical(data, tmp_path):
    common = ["--init", data / "base", "--data", data / "train.tsv", "--val_data", data / "dev.tsv", *RESUME]
    cli("finetune", *common, "--out", tmp_path / "ref")
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    kill_mid_run(["finetune", *common, "--out", out], metrics, lines=(6, 18), env=ENV)
    cli("finetune", "--data", data / "train.tsv", "--val_data", data / "dev.tsv", "--out", out, "--quiet",
        "--resume")
    a = find_resume_checkpoint(tmp_path / "ref")
    b = find_resume_checkpoint(out)
    assert a.name == b.name == "step_00000024"
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and "score.weight" in wa
    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()
    got_rows = metrics.read_text().splitlines()

    def strip(rows):
        keep = ("step", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "epoch")
        return [{k: v for k, v in json.loads(r).items() if k in keep} for r in rows]

    assert strip(got_rows) == strip(ref_rows)


def test_import_finetune_export_round_trip(data, tmp_path):
    """A randomly initialised, locally saved gpt2-shaped HF checkpoint (tiny dims) -> import -> classify
    fine-tune -> export as GPT2ForSequenceClassification with the same logits as transformers."""
    base_export = tmp_path / "tok"
    cli("export", data / "base", "--out", base_export)  # for its tokenizer files
    hf_cfg = transformers.GPT2Config.from_pretrained(str(base_export))
    torch.manual_seed(1)
    hf_dir = tmp_path / "gpt2-random"
    transformers.GPT2LMHeadModel(hf_cfg).save_pretrained(str(hf_dir))
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if (base_export / name).is_file():
            (hf_dir / name).write_bytes((base_export / name).read_bytes())
    cli("import", hf_dir, "--out", tmp_path / "imported")
    out = tmp_path / "cls"
    cli("finetune", "--init", tmp_path / "imported", "--data", data / "train.tsv", "--val_data", data / "dev.tsv",
        "--task", "classify", "--out", out, *FAST)
    cli("export", out, "--out", tmp_path / "hf")
    assert_hf_classifier_parity(out, tmp_path / "hf", ["what a great film", "boring", "i did n't like it much"])
    # the trunk moved away from the imported weights (the import really was the starting point)
    hf_start = transformers.GPT2LMHeadModel.from_pretrained(str(hf_dir)).transformer.wpe.weight
    tuned = transformers.GPT2ForSequenceClassification.from_pretrained(str(tmp_path / "hf")).transformer.wpe.weight
    assert 0 < (hf_start - tuned).abs().max().item() < 0.05


def test_lora_classify_then_merge_then_classify(data, tmp_path):
    out, merged = tmp_path / "lora", tmp_path / "merged"
    proc = cli("finetune", "--init", data / "base", "--data", data / "train.tsv", "--val_data", data / "dev.tsv",
               "--task", "classify", "--out", out, *FAST, "--lora_r", 8, "--lora_targets", "qkv,wte", "--lr", 1e-2)
    # qkv adapters 2 layers x 8 x (32 + 96) + token embedding 8 x (V + 32) + score 2 x 32
    vocab = load_tokenizer(data / "base").vocab_size
    assert f"LoRA: {2112 + 8 * (vocab + 32):,} trainable of " in proc.stderr
    ckpt = find_resume_checkpoint(out)
    assert {"adapter.safetensors", "adapter.json", "labels.json"} <= {p.name for p in ckpt.iterdir()}
    tuned = load_file(str(ckpt / "model.safetensors"))
    start = load_file(str(find_resume_checkpoint(data / "base") / "model.safetensors"))
    assert all(torch.equal(tuned[k], start[k]) for k in start)  # the base stayed frozen
    assert tuned["score.weight"].abs().sum() > 0
    cli("merge", out, "--out", merged)
    texts = ["a great movie", "awful", "not what i hoped for"]
    a = [json.loads(x) for x in cli("classify", out, *sum((["--text", t] for t in texts), []), "--json").stdout
         .splitlines()]
    b = [json.loads(x) for x in cli("classify", merged, *sum((["--text", t] for t in texts), []), "--json").stdout
         .splitlines()]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert all(abs(x["probability"] - y["probability"]) <= 1e-5 for x, y in zip(a, b))
