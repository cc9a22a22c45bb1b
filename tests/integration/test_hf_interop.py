"""Hugging Face interop against transformers itself, offline: export -> from_pretrained with the same ids,
logits and greedy text; GPT-2 directories that transformers writes -> import -> the same greedy output;
tokenizer parity on every line of Tiny Shakespeare and PTB; refused exports and bad directories."""

import gzip
import itertools
import json
import os
import shutil
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import gptforge  # noqa: E402
from conftest import skip_without_shared_data_msg
from gptforge.checkpoint.convert import export_hf, import_hf  # noqa: E402
from gptforge.checkpoint.io import save_checkpoint  # noqa: E402
from gptforge.config import Config, ModelConfig  # noqa: E402
from gptforge.errors import GptforgeError  # noqa: E402
from gptforge.generate.engine import iter_tokens  # noqa: E402
from gptforge.generate.sampling import SamplingParams  # noqa: E402
from gptforge.model.gpt import GPT  # noqa: E402
from gptforge.tokenizer import CharTokenizer, load_tokenizer  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
EOT = "<|endoftext|>"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "gptforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ})


@pytest.fixture(scope="module")
def corpora():
    """The real text: every file named by the issue (PTB train is gzip-compressed)."""
    from conftest import shared_data_dir

    root = shared_data_dir()
    if not (root / "tinyshakespeare" / "input.txt").is_file() or not (root / "ptb" / "ptb.valid.txt").is_file():
        skip_without_shared_data_msg(f"shared data not found at {root}")
    return {
        "tinyshakespeare/input.txt": (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"),
        "ptb/ptb.train.txt.gz": gzip.decompress((root / "ptb" / "ptb.train.txt.gz").read_bytes()).decode("utf-8"),
        "ptb/ptb.valid.txt": (root / "ptb" / "ptb.valid.txt").read_text(encoding="utf-8"),
        "ptb/ptb.test.txt": (root / "ptb" / "ptb.test.txt").read_text(encoding="utf-8"),
    }


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory, corpora):
    """A GPT-2 style vocab.json + merges.txt: byte-level BPE trained by HF tokenizers on both corpora."""
    out = tmp_path_factory.mktemp("vocab")
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([corpora["tinyshakespeare/input.txt"][:300_000], corpora["ptb/ptb.train.txt.gz"][:300_000]],
                            vocab_size=2000, special_tokens=[EOT], show_progress=False)
    bpe.save_model(str(out))
    return out


@pytest.fixture(scope="module")
def gpt2_vocab_dir(tmp_path_factory, vocab_dir):
    """The same merges in OpenAI GPT-2's layout: 50257 tokens with <|endoftext|> last (id 50256); the ids past
    the trained ones are filler tokens that no merge produces."""
    from gptforge.tokenizer import _byte_to_unicode

    vocab = json.loads((vocab_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab.pop(EOT)
    tokens = sorted(vocab, key=vocab.get)
    filler = ("".join(p) for p in itertools.product(sorted(_byte_to_unicode().values())[-40:], repeat=3))
    known = set(tokens)
    tokens += list(itertools.islice((t for t in filler if t not in known), 50256 - len(tokens)))
    out = tmp_path_factory.mktemp("gpt2_vocab")
    (out / "vocab.json").write_text(json.dumps({**{t: i for i, t in enumerate(tokens)}, EOT: 50256}),
                                    encoding="utf-8")
    shutil.copy(vocab_dir / "merges.txt", out / "merges.txt")
    return out


def _perturb(model, scale=0.05):
    """Random biases and LayerNorm gains too, so a swapped or untransposed tensor cannot go unnoticed."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def save_random_gpt2(out, tokenizer_dir, perturb=True, **config):
    """What a user has: a GPT-2 that transformers initialises and saves locally, with its tokenizer."""
    torch.manual_seed(0)
    tok = transformers.GPT2TokenizerFast.from_pretrained(str(tokenizer_dir))
    cfg = transformers.GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, **config)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model = _perturb(model) if perturb else model
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return model, tok


def greedy_ids_gptforge(model, prompt_ids, n, eot_id):
    params = SamplingParams(max_new_tokens=n, temperature=0)
    return [tok for events in iter_tokens(model, [prompt_ids], params, eot_id=eot_id) for _, tok in events]


def greedy_ids_hf(model, prompt_ids, n, eot_id):
    x = torch.tensor([prompt_ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=eot_id)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(scope="module")
def gptforge_run(tmp_path_factory, vocab_dir):
    """A gptforge run (2 layers, d_model 64, context 256) with perturbed weights and a BPE tokenizer."""
    tok = load_tokenizer(vocab_dir)
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, context_length=256,
                                   dropout=0.1))
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("gptforge") / "run"
    save_checkpoint(run, step=7, cfg=cfg, tokenizer=tok, model=_perturb(GPT(cfg.model)), state={"tokens_seen": 0})
    return run


@pytest.fixture(scope="module")
def exported(gptforge_run, tmp_path_factory):
    return export_hf(gptforge_run, tmp_path_factory.mktemp("export") / "hf")


# ------------------------------------------------------------------------------------------------ export


def test_export_writes_a_gpt2_directory(exported, gptforge_run):
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "generation_config.json", "merges.txt", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_positions"] == 256 and cfg["n_embd"] == 64
    assert cfg["activation_function"] == "gelu_new" and cfg["resid_pdrop"] == cfg["attn_pdrop"] == 0.1
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == gptforge.load(gptforge_run).tokenizer.eot_id


def test_export_loads_in_transformers_with_same_ids_logits_and_greedy_output(exported, gptforge_run, corpora):
    lm = gptforge.load(gptforge_run)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(exported)).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.lm_head.weight is hf.transformer.wte.weight
    windows = []
    for name in ("tinyshakespeare/input.txt", "ptb/ptb.valid.txt"):
        text = corpora[name][100_000:104_000]
        ids = lm.tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == ids, name
        assert hf_tok.decode(ids) == text
        windows += [ids[:256], ids[256:512]]
    tokens = torch.tensor(windows)  # (4, 256): full-context windows of real text
    with torch.no_grad():
        diff = (lm.model(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < 1e-4, diff
    prompt = windows[0][:40]
    ours = greedy_ids_gptforge(lm.model, prompt, 100, lm.tokenizer.eot_id)
    assert ours == greedy_ids_hf(hf, prompt, 100, lm.tokenizer.eot_id) and len(ours) == 100


def _tiny_run(root, name, tokenizer, **model):
    cfg = Config(model=ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, d_model=32,
                                   context_length=16, **model))
    run = root / name
    save_checkpoint(run, step=1, cfg=cfg, tokenizer=tokenizer, model=GPT(cfg.model))
    return run


@pytest.mark.parametrize("model,message", [
    ({"attention_pattern": "dense,local", "local_window": 4}, "banded attention"),
    ({"shared_layer_group": 2}, "shared layers (shared_layer_group=2"),
    ({"bias": False}, "bias=false"),
])
def test_export_refuses_what_gpt2_cannot_represent(tmp_path, vocab_dir, model, message):
    run = _tiny_run(tmp_path, "run", load_tokenizer(vocab_dir), **model)
    with pytest.raises(GptforgeError, match="cannot export .* in GPT-2 format: the model uses") as info:
        export_hf(run, tmp_path / "out")
    assert message in str(info.value) and not (tmp_path / "out").exists()


def test_export_refuses_a_char_tokenizer_and_accepts_a_full_width_band(tmp_path, vocab_dir):
    run = _tiny_run(tmp_path, "char", CharTokenizer("abc"))
    with pytest.raises(GptforgeError, match="its tokenizer is char-level; GPT-2 tokenizers are byte-level BPE"):
        export_hf(run, tmp_path / "out")
    wide = _tiny_run(tmp_path, "wide", load_tokenizer(vocab_dir), attention_pattern="dense,local", local_window=16)
    assert (export_hf(wide, tmp_path / "out") / "model.safetensors").is_file()


def test_export_and_import_cli(gptforge_run, tmp_path, vocab_dir):
    proc = run_cli("export", gptforge_run, "--format", "hf", "--out", tmp_path / "hf")
    assert proc.returncode == 0 and "exported" in proc.stdout, proc.stderr
    proc = run_cli("import", tmp_path / "hf", "--out", tmp_path / "back")
    assert proc.returncode == 0 and "imported 2 layers, d_model 64" in proc.stdout, proc.stderr
    original, back = gptforge.load(gptforge_run), gptforge.load(tmp_path / "back")
    a, b = original.model.state_dict(), back.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the round trip is exact
    assert back.config.model == original.config.model
    banded = _tiny_run(tmp_path, "banded", load_tokenizer(vocab_dir), attention_pattern="local", local_window=4)
    for args, message in [(["export", banded, "--out", tmp_path / "x"], "banded attention"),
                          (["export", gptforge_run, "--format", "onnx", "--out", tmp_path / "x"], "--format must be hf"),
                          (["export", gptforge_run, "--out", tmp_path / "hf"], "already exists and is not empty"),
                          (["import", tmp_path / "nothing", "--out", tmp_path / "y"], "directory not found")]:
        proc = run_cli(*args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------ import


@pytest.fixture(scope="module")
def small_gpt2(tmp_path_factory, vocab_dir):
    """A 4-layer, d_model 128 GPT-2 with the 2000-token vocabulary (<|endoftext|> = id 0)."""
    out = tmp_path_factory.mktemp("small_gpt2")
    model, tok = save_random_gpt2(out, vocab_dir, vocab_size=2000, n_positions=256, n_embd=128, n_layer=4, n_head=4)
    return out, model, tok


def test_import_gpt2_124m_generates_like_transformers(tmp_path, gpt2_vocab_dir, corpora):
    """OpenAI's gpt2 configuration (GPT2Config's defaults: 124M parameters, vocab 50257, context 1024)."""
    src = tmp_path / "gpt2"
    hf, hf_tok = save_random_gpt2(src, gpt2_vocab_dir, perturb=False)  # the small shapes test the mapping
    assert hf.num_parameters() == 124_439_808 and hf_tok.eos_token_id == 50256
    report = import_hf(src, tmp_path / "run")
    assert report.num_parameters == 124_439_808 and report.model.context_length == 1024
    lm = gptforge.load(tmp_path / "run")
    text = corpora["ptb/ptb.test.txt"][:1000]
    ids = hf_tok(text)["input_ids"][:128]
    assert lm.tokenizer.encode(text)[:128] == ids and lm.tokenizer.eot_id == 50256
    with torch.no_grad():
        diff = (lm.model(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item()
    assert diff < 1e-4, diff
    assert greedy_ids_gptforge(lm.model, ids[:16], 10, 50256) == greedy_ids_hf(hf, ids[:16], 10, 50256)


@pytest.mark.slow  # ~30-50 s; test_import_gpt2_124m_generates_like_transformers checks the same parity through the API
def test_import_cli_generate_matches_transformers_greedy(small_gpt2, tmp_path, corpora):
    src, hf, hf_tok = small_gpt2
    proc = run_cli("import", src, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "run"
    assert {"config.yaml", "tokenizer.json", "latest", "checkpoints"} <= {p.name for p in run.iterdir()}
    state = json.loads((run / "checkpoints" / "step_00000000" / "state.json").read_text())
    assert state["step"] == 0 and state["tokens_seen"] == 0 and state["imported_from"] == str(src.resolve())
    prompt = corpora["tinyshakespeare/input.txt"][2000:2100]
    ids = hf_tok(prompt)["input_ids"]
    expected = hf_tok.decode(greedy_ids_hf(hf, ids, 100, hf_tok.eos_token_id), skip_special_tokens=True)
    proc = run_cli("generate", run, "--prompt", prompt, "--max_new_tokens", 100, "--temperature", 0)
    assert proc.returncode == 0 and proc.stdout == prompt + expected + "\n", proc.stderr
    # batched prompts of different lengths (left-padded) give each prompt's own greedy output
    lm = gptforge.load(run)
    prompts = [prompt, corpora["ptb/ptb.valid.txt"][:37], "ROMEO:"]
    got = lm.generate(prompts, max_new_tokens=30, temperature=0)
    for p, text in zip(prompts, got):
        p_ids = hf_tok(p)["input_ids"]
        assert text == hf_tok.decode(greedy_ids_hf(hf, p_ids, 30, hf_tok.eos_token_id), skip_special_tokens=True)


def test_import_pytorch_model_bin_with_vocab_and_merges(small_gpt2, vocab_dir, tmp_path, corpora):
    """The older layout: pytorch_model.bin (stored tied head and causal-mask buffers included, no
    `transformer.` prefix) read with weights_only=True, and vocab.json + merges.txt instead of tokenizer.json."""
    src, hf, hf_tok = small_gpt2
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(src / "config.json", legacy / "config.json")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(vocab_dir / name, legacy / name)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256, dtype=torch.uint8))  # GPT-2's mask buffer
    torch.save(state, legacy / "pytorch_model.bin")
    lm = gptforge.load(import_hf(legacy, tmp_path / "run").run_dir)
    ids = hf_tok(corpora["ptb/ptb.test.txt"][:1500])["input_ids"][:256]
    with torch.no_grad():
        diff = (lm.model(torch.tensor([ids])) - hf(torch.tensor([ids])).logits).abs().max().item()
    assert diff < 1e-4, diff


def test_import_sharded_safetensors(small_gpt2, tmp_path):
    src, hf, hf_tok = small_gpt2
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="500KB")
    hf_tok.save_pretrained(str(sharded))
    assert (sharded / "model.safetensors.index.json").is_file()
    a = gptforge.load(import_hf(sharded, tmp_path / "a").run_dir).model.state_dict()
    b = gptforge.load(import_hf(src, tmp_path / "b").run_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_imported_run_continues_pretraining_with_init_from(small_gpt2, tmp_path, corpora):
    from gptforge.config import load_config
    from gptforge.data.prepare import prepare
    from gptforge.train.pretrain import pretrain

    src, _, _ = small_gpt2
    run = import_hf(src, tmp_path / "imported").run_dir
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpora["tinyshakespeare/input.txt"][:60_000], encoding="utf-8")
    prepare(str(corpus), tmp_path / "data", tokenizer=str(run), progress=False)
    cfg = load_config(preset="debug", overrides=[("init_from", str(run)), ("max_steps", 3), ("lr", 1e-4),
                                                 ("eval_tokens", 32), ("micro_batch_size", 2)])
    result = pretrain(cfg, tmp_path / "data", tmp_path / "tuned", progress=False)
    assert result.steps == 3 and result.val_loss == result.val_loss  # finite
    before = gptforge.load(run).model.state_dict()
    after = gptforge.load(tmp_path / "tuned").model.state_dict()
    assert gptforge.load(tmp_path / "tuned").config.model.n_layer == 4
    drift = max((after[k] - before[k]).abs().max().item() for k in before)
    assert 0 < drift < 0.01  # started from the imported weights and trained a little


# --------------------------------------------------------------------------------------- tokenizer parity


def test_tokenizer_parity_with_transformers_on_every_line(vocab_dir, corpora):
    ours = load_tokenizer(vocab_dir)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(str(vocab_dir))
    for name, text in corpora.items():
        lines = text.splitlines(keepends=True)
        assert len(lines) > 3000
        expected = theirs(lines)["input_ids"]
        got = ours.encode_batch(lines)
        bad = [i for i in range(len(lines)) if got[i] != expected[i]]
        assert not bad, f"{name}: {len(bad)} lines differ, first {lines[bad[0]]!r}"


# ------------------------------------------------------------------------------------------ bad directories


def _break(src, dst, how):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    if how == "no_config":
        (dst / "config.json").unlink()
    elif how == "no_weights":
        (dst / "model.safetensors").unlink()
    elif how == "no_tokenizer":
        (dst / "tokenizer.json").unlink()
    elif how == "vocab_without_merges":
        (dst / "tokenizer.json").unlink()
        (dst / "vocab.json").write_text("{}")
    elif how == "truncated_weights":
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "pickled_code":
        (dst / "model.safetensors").unlink()
        torch.save({"x": torch.zeros(1), "f": print}, dst / "pytorch_model.bin")  # a pickled callable
    elif how == "untied_head":
        (dst / "model.safetensors").unlink()
        from transformers import GPT2LMHeadModel

        state = GPT2LMHeadModel.from_pretrained(str(src)).state_dict()
        state["lm_head.weight"] = state["lm_head.weight"].clone() + 1
        torch.save(state, dst / "pytorch_model.bin")
    else:
        cfg.update(how)
    (dst / "config.json").write_text(json.dumps(cfg)) if how != "no_config" else None
    return dst


@pytest.mark.parametrize("how,message", [
    ("no_config", "missing file: {dst}/config.json"),
    ("no_weights", "no weights in {dst} (expected one of model.safetensors"),
    ("no_tokenizer", "no tokenizer in {dst} (expected tokenizer.json, or vocab.json + merges.txt)"),
    ("vocab_without_merges", "missing tokenizer file {dst}/merges.txt"),
    ("truncated_weights", "corrupt weights file {dst}/model.safetensors"),
    ("pickled_code", "refusing to load {dst}/pytorch_model.bin"),
    ("untied_head", "lm_head.weight differs from wte.weight"),
    ({"model_type": "llama"}, "{dst}/config.json: model_type is 'llama'"),
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"n_layer": 5}, "lack 'h.4.ln_1.weight'"),
    ({"n_embd": 64}, "{dst}/model.safetensors: wte.weight has shape (2000, 128) but config.json implies (2000, 64)"),
    ({"vocab_size": 1000}, "{dst}/tokenizer.json has 2000 tokens but {dst}/config.json has vocab_size 1000"),
    ({"eos_token_id": 5}, "eos_token_id 5 but <|endoftext|> is id 0"),
])
def test_bad_import_directories_name_the_problem(small_gpt2, tmp_path, how, message):
    dst = _break(small_gpt2[0], tmp_path / "src", how)
    with pytest.raises(GptforgeError) as info:
        import_hf(dst, tmp_path / "run")
    assert message.format(dst=dst) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_non_empty_output_and_a_missing_source(small_gpt2, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("keep me")
    with pytest.raises(GptforgeError, match="already exists and is not empty"):
        import_hf(small_gpt2[0], tmp_path / "run")
    with pytest.raises(GptforgeError, match="GPT-2 checkpoint directory not found"):
        import_hf(tmp_path / "missing", tmp_path / "other")
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    assert import_hf(small_gpt2[0], tmp_path / "empty").checkpoint.is_dir()
