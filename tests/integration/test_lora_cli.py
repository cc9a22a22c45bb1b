"""LoRA end to end: continued pretraining with adapters through the CLI, generate, merge, exact resume, one-line
errors, and PEFT parity of the Hugging Face export (`peft.PeftModel` on the exported base gives our logits)."""

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing may touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import kill_mid_run  # noqa: E402
from gptforge.checkpoint.convert import export_hf  # noqa: E402
from gptforge.checkpoint.io import find_resume_checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from gptforge.config import Config, ModelConfig, load_config  # noqa: E402
from gptforge.errors import GptforgeError  # noqa: E402
from gptforge.model.gpt import GPT  # noqa: E402
from gptforge.model.lora import LoRAEmbedding, LoRALinear, load_adapter, merge_lora  # noqa: E402
from gptforge.tokenizer import load_tokenizer, train_bpe  # noqa: E402

LORA = ["--preset", "debug", "--lora_r", "8", "--lora_alpha", "16", "--lr", "1e-2", "--warmup_steps", "0",
        "--log_interval", "1", "--eval_interval", "10", "--checkpoint_interval", "7", "--keep_checkpoints", "2",
        "--global_batch_tokens", "128"]


def cli(*args, check=False):
    proc = subprocess.run([sys.executable, "-m", "gptforge", *map(str, args)], capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def base_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    cli("pretrain", "--preset", "debug", "--max_steps", "40", "--lr", "1e-2", "--data", char_data, "--out", out,
        "--quiet", check=True)
    return out


@pytest.fixture(scope="module")
def lora_run(char_data, base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    proc = cli("pretrain", *LORA, "--max_steps", "30", "--lora_targets", "qkv,attn_proj,mlp_fc", "--init_from",
               base_run, "--data", char_data, "--out", out, "--quiet", check=True)
    return out, proc.stdout + proc.stderr


def greedy(run, prompt="ROMEO:\n"):
    proc = cli("generate", run, "--prompt", prompt, "--max_new_tokens", "40", "--temperature", "0", check=True)
    return proc.stdout


def test_lora_pretraining_trains_only_the_adapters(lora_run, base_run):
    run, log = lora_run
    # debug preset: 2 layers, d_model 32; r 8 on qkv (32+96), attn proj (32+32), mlp fc (32+128)
    assert "LoRA: 5,632 trainable of 33,728 parameters (16.70%)" in log  # vocab 66
    ckpt = find_resume_checkpoint(run)
    weights = load_file(str(ckpt / "model.safetensors"))
    base = load_file(str(find_resume_checkpoint(base_run) / "model.safetensors"))
    assert all(torch.equal(base[k], weights[k]) for k in base)  # the base is frozen
    assert all(weights[k].abs().max() > 0 for k in weights if k.endswith("lora_B"))  # the adapters trained
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sorted(optimizer["state"]) == sorted(k for k in weights if "lora" in k)  # no state for frozen weights
    info = json.loads((ckpt / "adapter.json").read_text())
    assert info["lora_r"] == 8 and info["lora_targets"] == "qkv,attn_proj,mlp_fc" and len(info["base_sha256"]) == 64
    adapter = load_file(str(ckpt / "adapter.safetensors"))
    assert sorted(adapter) == sorted(k for k in weights if "lora" in k)
    assert (ckpt / "adapter.safetensors").stat().st_size < 0.3 * (ckpt / "model.safetensors").stat().st_size
    model, _, _, _ = load_checkpoint(base_run)  # the adapter loads onto its base, not onto another one
    adapted, _, _, _ = load_checkpoint(run)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora" not in name:
                p.copy_(dict(model.named_parameters())[name])
    load_adapter(adapted, ckpt)
    with torch.no_grad():
        adapted.wte.weight.add_(0.01)
    with pytest.raises(GptforgeError, match="different base model"):
        load_adapter(adapted, ckpt)


@pytest.mark.slow  # ~20 s; merge equality runs by default in test_lora.py and test_finetune.py's LoRA test
def test_generate_merge_generate(lora_run, base_run, tmp_path):
    run, _ = lora_run
    adapted_text = greedy(run)
    assert adapted_text.startswith("ROMEO:") and adapted_text != greedy(base_run)
    merged = tmp_path / "merged"
    proc = cli("merge", run, "--out", merged, check=True)
    assert "merged the LoRA adapters" in proc.stdout
    assert greedy(merged) == adapted_text
    model, cfg, _, _ = load_checkpoint(run)
    plain, merged_cfg, _, state = load_checkpoint(merged)
    assert merged_cfg.model.lora_r == 0 and state["step"] == cfg.train.max_steps and "merged_from" in state
    x = torch.randint(0, cfg.model.vocab_size, (2, 16))
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max() <= 1e-5
    again = cli("merge", run, "--out", merged)  # refuses to overwrite
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "not empty" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["--lora_targets", "qkv,attn_out"], "unknown target 'attn_out'; did you mean 'attn_proj'?"),
    (["--lora_targets=,"], "matches no layer"),
    (["--lora_alpha", "0"], "lora_alpha must be > 0"),
])
def test_bad_lora_settings_are_one_line_errors(char_data, base_run, tmp_path, args, message):
    out = tmp_path / "run"
    proc = cli("pretrain", *LORA, *args, "--init_from", base_run, "--data", char_data, "--out", out)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not out.exists()


def test_lora_on_a_banded_model_is_refused(char_data, tmp_path):
    banded = tmp_path / "banded"
    cfg = load_config(preset="debug", overrides=[("attention_pattern", "dense,local"), ("local_window", 4),
                                                  ("vocab_size", 66)])
    save_checkpoint(banded, step=1, cfg=cfg, tokenizer=load_tokenizer(char_data), model=GPT(cfg.model))
    out = tmp_path / "run"
    for extra in (["--init_from", banded], ["--attention_pattern", "dense,local"]):
        proc = cli("pretrain", *LORA, *extra, "--data", char_data, "--out", out)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
        assert "LoRA (model.lora_r=8) needs dense attention" in proc.stderr and not out.exists()
    proc = cli("merge", banded, "--out", out)
    assert proc.returncode == 2 and "no LoRA adapters" in proc.stderr and not out.exists()


def test_init_from_a_lora_run_asks_to_merge_first(char_data, lora_run, tmp_path):
    proc = cli("pretrain", *LORA, "--init_from", lora_run[0], "--data", char_data, "--out", tmp_path / "run")
    assert proc.returncode == 2 and "gptforge merge" in proc.stderr


def test_an_init_from_run_resumes_with_its_own_command_line(char_data, base_run, tmp_path):
    """The architecture of an `--init_from` run is the initial checkpoint's: model fields on the command line that
    differ from it (here --dropout) must not make `--resume` refuse the run's own command."""
    args = [*LORA, "--dropout", "0.1", "--init_from", base_run, "--data", char_data, "--out", tmp_path / "run",
            "--quiet"]
    cli("pretrain", *args, "--max_steps", "7", check=True)
    cli("pretrain", *args, "--max_steps", "9", "--resume", check=True)
    assert find_resume_checkpoint(tmp_path / "run").name == "step_00000009"


@pytest.mark.slow  # about 55 s on 2 cores: two 40-step runs plus the resumed one
def test_sigkill_then_resume_of_a_lora_run_is_bitwise_identical(char_data, base_run, tmp_path):
    args = [*LORA, "--max_steps", "40", "--lora_dropout", "0.1", "--init_from", base_run,
            "--data", char_data, "--quiet"]
    reference = tmp_path / "ref"
    cli("pretrain", *args, "--out", reference, check=True)
    out = tmp_path / "run"
    kill_mid_run(["pretrain", *args, "--out", out], out / "metrics.jsonl", lines=(9, 30))
    cli("pretrain", *args, "--out", out, "--resume", check=True)
    ref_ckpt, got_ckpt = find_resume_checkpoint(reference), find_resume_checkpoint(out)
    assert ref_ckpt.name == got_ckpt.name == "step_00000040"
    for name in ("model.safetensors", "adapter.safetensors"):
        ref, got = load_file(str(ref_ckpt / name)), load_file(str(got_ckpt / name))
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


# ------------------------------------------------------------------------------------------------ PEFT


def save_bpe_lora_run(run, text, targets):
    """A BPE-tokenized LoRA run with random (non-zero) adapters on `targets`."""
    tok = train_bpe([text], vocab_size=400)
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=4, d_model=64, context_length=64,
                                   lora_r=4, lora_alpha=8.0, lora_targets=targets))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
            elif isinstance(m, LoRAEmbedding):  # A starts at zero there
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.05)
    save_checkpoint(run, step=3, cfg=cfg, tokenizer=tok, model=model, state={"tokens_seen": 0})
    return run, tok


@pytest.fixture(scope="module")
def shakespeare_text(shared_data_dir_path):
    return (shared_data_dir_path / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:100_000]


@pytest.fixture(scope="module")
def bpe_lora_run(tmp_path_factory, shakespeare_text):
    """A BPE-tokenized LoRA run on every block linear layer, with random (non-zero) adapters."""
    return save_bpe_lora_run(tmp_path_factory.mktemp("bpe") / "run", shakespeare_text, "qkv,attn_proj,mlp_fc,mlp_proj")


@pytest.fixture(scope="module")
def shared_data_dir_path():
    from conftest import shared_data_dir, skip_without_shared_data

    path = shared_data_dir()
    if not (path / "tinyshakespeare" / "input.txt").is_file():
        skip_without_shared_data(path)
    return path


def test_peft_loads_the_exported_adapter_with_the_same_logits(bpe_lora_run, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run, tok = bpe_lora_run
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True and config["r"] == 4
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.1.mlp.c_proj.lora_A.weight" in keys and len(keys) == 2 * 2 * 4
    base = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    plain = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()  # PEFT adapts `base` in place
    hf = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    adapted = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in hf.modules())
    assert adapted == 2 * 4  # every block layer, attention c_proj and MLP c_proj told apart, nothing else
    model, _, _, _ = load_checkpoint(run)
    ids = torch.tensor([tok.encode("ROMEO: What light through yonder window breaks?")[:40]])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4
        assert (ours - plain(ids).logits).abs().max() > 1e-2  # the adapter matters (base alone differs)


def test_export_merged_matches_the_adapted_model(bpe_lora_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    run, tok = bpe_lora_run
    out = export_hf(run, tmp_path / "hf", merged=True)
    assert not (out / "adapter").exists()
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    model, _, _, _ = load_checkpoint(run)
    ids = torch.tensor([tok.encode("But, soft! what light")])
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
        assert (merge_lora(model)(ids) - model(ids)).abs().max() <= 1e-5


def test_peft_loads_an_embedding_adapter_with_the_same_logits(tmp_path, shakespeare_text):
    """Target wte: PEFT's lora_embedding_A/B (its layout is ours), the tied head left alone as under PEFT; a language
    model's embedding adapter cannot be merged (it would change the tied head), so export --merged refuses."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run, tok = save_bpe_lora_run(tmp_path / "run", shakespeare_text, "wte,mlp_fc")
    out = export_hf(run, tmp_path / "hf")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == r"transformer\.h\.\d+\.(mlp\.c_fc)|transformer\.wte"
    keys = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert keys["base_model.model.transformer.wte.lora_embedding_A"].shape == (4, tok.vocab_size)
    assert keys["base_model.model.transformer.wte.lora_embedding_B"].shape == (64, 4)
    base = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    plain = transformers.GPT2LMHeadModel.from_pretrained(str(out)).eval()
    hf = peft.PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    assert sum(isinstance(m, peft.tuners.lora.Embedding) for m in hf.modules()) == 1
    model, _, _, _ = load_checkpoint(run)
    ids = torch.tensor([tok.encode("ROMEO: What light through yonder window breaks?")[:40]])
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        assert (ours - theirs).abs().max() <= 1e-4
        assert (ours - plain(ids).logits).abs().max() > 1e-2
    with pytest.raises(GptforgeError, match="cannot merge a LoRA adapter on wte into a language model"):
        export_hf(run, tmp_path / "merged", merged=True)
    assert not (tmp_path / "merged").exists()
