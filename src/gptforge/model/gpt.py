"""The GPT-3 model (Brown et al. 2020, section 2.1): GPT-2's architecture with optional banded layers.

Legend: B batch, T tokens, D d_model, V vocab_size, K n_labels.
Learned token and position embeddings, pre-LayerNorm blocks (attention, then a 4*D GELU MLP, each with a
residual connection), a final LayerNorm and an output head tied to the token embedding; with `n_labels > 0`
also a classification head `score` on the last real token's hidden state (GPT-1, Radford et al. 2018,
section 3.2). Initialisation
follows GPT-2 (Radford et al. 2019): normal(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer).
This module knows nothing about optimizers, checkpoints, sampling or parallelism.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from gptforge.config import ModelConfig
from gptforge.errors import GptforgeError
from gptforge.model.attention import CausalSelfAttention
from gptforge.model.kv_cache import KVCache
from gptforge.model.linear import linear
from gptforge.model.lora import LORA_PARAMS, add_lora
from gptforge.model.loss import IGNORE_INDEX, loss_sum

__all__ = ["GPT", "IGNORE_INDEX", "count_parameters", "flops_per_token", "init_rows"]


class MLP(nn.Module):
    """D -> 4D -> GELU (tanh approximation, as GPT-2) -> D."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.gelu(linear(x, self.fc), approximate="tanh"), self.proj)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); dropout on both branches."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x), **attn_kwargs))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """GPT language model.

    `blocks` holds `n_layer / shared_layer_group` distinct blocks; layer i uses block
    `i // shared_layer_group`, so each group of adjacent layers shares weights. Names (`wte`, `wpe`,
    `blocks.N`, `ln_f`) are stable so checkpoints survive refactors and resharding.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer // cfg.shared_layer_group))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        add_lora(self, cfg)  # LoRA adapters around the targeted linear layers (model/lora.py); none if lora_r is 0
        self.tie_weights()
        if cfg.n_labels > 0:  # named and shaped as Hugging Face's GPT2ForSequenceClassification.score
            self.score = nn.Linear(cfg.d_model, cfg.n_labels, bias=False)
            self.score_drop = nn.Dropout(cfg.classifier_dropout)
        self.windows = [cfg.local_window if kind == "local" else None for kind in cfg.layer_attention()]
        self.init_weights()

    def tie_weights(self) -> None:
        """Make the output head use the token embedding's matrix (again: moving a model off the meta device with
        `to_empty` gives each module its own new parameter)."""
        self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 initialisation (Radford et al. 2019): normal(0, 0.02), residual output projections std
        0.02 / sqrt(2 * n_layer), zero biases, unit LayerNorm gains (`init_std`).

        A parameter's values depend only on `seed` and its name (`init_rows`), never on the order parameters are
        visited in, the device count or how a parameter is split into shards: a sharded copy filled row range by
        row range holds exactly these values. `seed` None draws one from torch's global CPU generator (so
        `torch.manual_seed(s); GPT(cfg)` is reproducible). Parameters on the meta device are left alone.
        """
        if self.wte.weight.is_meta:
            return
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
        for name, p in self.named_parameters():
            p.copy_(init_rows(self.init_std(name), tuple(p.shape), seed=seed, name=name))

    def init_std(self, name: str) -> float | None:
        """The GPT-2 initialisation of parameter `name` (as named by `named_parameters`): the std of a zero-mean
        normal, 0.0 for zeros (biases), or None for ones (LayerNorm gains). LoRA adapters: B zeros, A normal with
        std 1 / sqrt(3 * in); on the token embedding A zeros, B normal (model/lora.py)."""
        owner, _, leaf = name.rpartition(".")
        if leaf in LORA_PARAMS:
            return self.get_submodule(owner).init_std(leaf)
        if name.endswith("bias"):
            return 0.0
        if ".ln_" in name or name.startswith("ln_f"):
            return None
        if name.endswith("proj.weight"):
            return 0.02 / math.sqrt(2 * self.cfg.n_layer)
        return 0.02

    def num_parameters(self) -> int:
        """Distinct trainable parameters (the tied head and shared layers counted once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, tokens: torch.Tensor, *, kv_cache: KVCache | None = None) -> torch.Tensor:
        """The trunk: token ids -> final hidden states (after the last LayerNorm), for any head on top.

        Args:
            tokens: (B, T) int64 token ids, T <= context_length (with a cache: T new tokens that fit in it).
            kv_cache: optional cache for incremental decoding; it gives each row's positions and attention
                mask (rows may differ in length), and is read, extended and advanced.

        Returns:
            hidden (B, T, D) in the parameter dtype (or the autocast dtype).

        Raises:
            GptforgeError: T exceeds context_length (or the cache's free slots).
        """
        B, T = tokens.shape
        masks: dict[int | None, torch.Tensor | None] = {}
        if kv_cache is None:
            if T > self.cfg.context_length:
                raise GptforgeError(f"input has {T} tokens; the model's context_length is {self.cfg.context_length}")
            positions = torch.arange(T, device=tokens.device)  # (T,)
        else:
            positions = kv_cache.positions(T)  # (B, T), per row; raises GptforgeError when a row is full
            masks = {w: kv_cache.attn_mask(T, w) for w in set(self.windows)}
        x = self.drop(self.wte(tokens) + self.wpe(positions))  # (B, T, D)
        group = self.cfg.shared_layer_group
        for i, window in enumerate(self.windows):
            x = self.blocks[i // group](x, window=window, layer=i, kv_cache=kv_cache, attn_mask=masks.get(window))
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.ln_f(x)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, *,
                kv_cache: KVCache | None = None, head: str = "lm", lengths: torch.Tensor | None = None):
        """The trunk (`hidden`) and a head: next-token logits, class logits, or both from one pass.

        Args:
            tokens: (B, T) int64 token ids, T <= context_length (with a cache: T new tokens that fit in it).
            targets: optional (B, T) int64 next-token ids; IGNORE_INDEX (-100) positions are skipped ("lm" only).
            kv_cache: optional cache for incremental decoding; it is read, extended and advanced by T.
            head: "lm" (the tied language-model head), "classify" (the `score` head on the hidden state of each
                row's last real token, after `classifier_dropout`) or "both" (one trunk pass for both heads, as a
                classifier trained with the auxiliary LM loss needs: DDP allows one forward per backward).
            lengths: (B,) int64 real tokens per right-padded row, for the classification head (None: every row
                is T long). Padding never influences a real token (causal attention), so a padded row's class
                logits equal the unpadded row's.

        Returns:
            "lm": logits (B, T, V) in the parameter dtype, or `(logits, loss)` with targets, where loss is the
            mean cross-entropy (float32 scalar, nats per token) over non-ignored targets. "classify": class logits
            (B, K). "both": `(logits (B, T, V), class logits (B, K))`.

        Raises:
            GptforgeError: T exceeds context_length (or the cache's free slots), an unknown head, or a
                classification head asked of a model with n_labels = 0.
        """
        if head not in ("lm", "classify", "both"):
            raise GptforgeError(f"unknown head {head!r} (allowed: lm, classify, both)")
        hidden = self.hidden(tokens, kv_cache=kv_cache)  # (B, T, D)
        if head != "lm":
            classes = self.classify_hidden(hidden, lengths)  # (B, K)
            if head == "classify":
                return classes
            return linear(hidden, self.lm_head), classes
        logits = linear(hidden, self.lm_head)  # (B, T, V)
        if targets is None:
            return logits
        return logits, loss_sum(logits, targets) / (targets != IGNORE_INDEX).sum().clamp_min(1)

    def classify_hidden(self, hidden: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """Class logits (B, K) from final hidden states (B, T, D): the `score` head on position lengths - 1."""
        if self.cfg.n_labels <= 0:
            raise GptforgeError("this model has no classification head (model.n_labels = 0)")
        B, T, _ = hidden.shape
        last = (lengths - 1) if lengths is not None else torch.full((B,), T - 1, device=hidden.device)
        pooled = hidden[torch.arange(B, device=hidden.device), last.long()]  # (B, D)
        return linear(self.score_drop(pooled), self.score)


INIT_BLOCK_ELEMENTS = 1 << 20  # about this many values per independently seeded block of rows (init_rows)


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def init_rows(std: float | None, shape: tuple[int, ...], *, seed: int, name: str, start: int = 0,
              stop: int | None = None) -> torch.Tensor:
    """Rows [start, stop) (along dim 0) of a parameter's initial value, float32 on CPU.

    Args:
        std: a zero-mean normal's std; 0.0 means zeros and None ones (`GPT.init_std`).
        shape: the whole parameter's shape; a 0-dim parameter counts as one row.
        seed / name: the run's seed and the parameter's name, which alone fix the values.

    The rows are cut into blocks of about INIT_BLOCK_ELEMENTS values, each drawn from its own generator seeded by
    (seed, name, block index); a caller that needs rows [start, stop) of a large matrix (one shard) draws only the
    blocks overlapping them, yet gets the same values as a caller drawing the whole matrix.
    """
    rows, tail = (shape[0], shape[1:]) if shape else (1, ())
    stop = rows if stop is None else stop
    out = torch.empty((stop - start, *tail), dtype=torch.float32, device="cpu")
    if std is None or std == 0.0:
        return out.fill_(1.0 if std is None else 0.0).reshape(out.shape if shape else ())
    per_row = math.prod(tail)
    block_rows = max(1, INIT_BLOCK_ELEMENTS // max(per_row, 1))
    for block in range(start // block_rows, -(-stop // block_rows)):
        lo, hi = block * block_rows, min((block + 1) * block_rows, rows)
        gen = torch.Generator(device="cpu").manual_seed(_block_seed(seed, name, block))
        values = torch.empty((hi - lo, *tail), dtype=torch.float32, device="cpu").normal_(0.0, std, generator=gen)
        a, z = max(lo, start), min(hi, stop)
        out[a - start:z - start] = values[a - lo:z - lo]
    return out if shape else out.reshape(())


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of a GPT with this config, computed without building it (works for 175B).

    Per block: attention 4*D^2 (+4D biases), MLP 8*D^2 (+5D biases), two LayerNorms 2D (+2D biases);
    plus token embedding V*D (tied with the head), position embedding context_length*D, final LayerNorm;
    plus r * (in + out) per LoRA-adapted layer.
    """
    D, bias = cfg.d_model, int(cfg.bias)
    block = 12 * D * D + 2 * D + bias * (9 * D + 2 * D)
    distinct_blocks = cfg.n_layer // cfg.shared_layer_group
    lora_widths = {"qkv": (D, 3 * D), "attn_proj": (D, D), "mlp_fc": (D, 4 * D), "mlp_proj": (4 * D, D)}
    lora = sum(cfg.lora_r * sum(lora_widths[t]) * distinct_blocks for t in cfg.lora_target_names() if t != "lm_head")
    if "lm_head" in cfg.lora_target_names():
        lora += cfg.lora_r * (D + cfg.vocab_size)
    return cfg.vocab_size * D + cfg.context_length * D + distinct_blocks * block + D * (1 + bias) + lora


def flops_per_token(cfg: ModelConfig, context_length: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), the PaLM-paper convention (Chowdhery et al. 2022, App. B).

    6 * N for every matrix multiply with a parameter (N excludes the position embedding, a lookup; the tied
    head is counted, it is a real matmul; shared layers are counted once per use), plus 12 * D * T_attn per
    layer for the attention scores and the weighted sum, with T_attn the context (the band width for
    banded layers). Units: FLOPs per token.
    """
    T = context_length or cfg.context_length
    D = cfg.d_model
    matmul_params = cfg.vocab_size * D + cfg.n_layer * 12 * D * D
    attn = sum(12 * D * (min(T, cfg.local_window) if kind == "local" else T) for kind in cfg.layer_attention())
    return 6.0 * matmul_params + attn
