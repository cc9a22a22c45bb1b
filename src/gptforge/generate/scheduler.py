"""Continuous batching: the one generation engine behind the CLI, the Python API and the HTTP server.

Legend: R running rows (one per request), C context_length, V vocab_size, T tokens fed in one forward.
Works on token ids only (no text, no HTTP). Requests are queued by `submit` (from any thread) and join at the
next `step`; each step (1) ends cancelled requests, (2) admits queued ones into free rows, (3) runs one
decoding forward over every running row (one token each), (4) runs one prefill forward over newcomers' prompt
chunks, at most `prefill_chunk` tokens in all, so running streams keep flowing while a long prompt is read,
and (5) frees the rows of finished requests (end-of-text, a stop the caller recognised, max tokens, cancel)
by moving the last running row into the hole, so rows 0..R-1 stay contiguous in the KV cache.

Each row has its own length and positions (model/kv_cache.py). When a row fills the context window, only that
row slides: its cache is rebuilt from its last `C - C // 4` tokens (a re-prefill, chunked like a prompt), so
each later logit equals a full forward pass over exactly the tokens the row holds (learned absolute positions
rule out reusing shifted keys). Every request has its own SamplingParams and its own torch.Generator, from
which it draws exactly one number per sampled token: a seeded request gives the same tokens whatever else
runs beside it (up to the float rounding of batched kernels, which can flip a near-tie).

Memory is bounded: at most `max_running` rows, a KV cache of at most `max_cached_tokens` slots (rows x slots,
grown on demand and dropped when idle), and at most `max_queue` waiting requests (`QueueFullError` beyond).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gptforge.errors import GptforgeError
from gptforge.generate.sampling import SamplingParams, sample_rows, token_logprobs
from gptforge.model.kv_cache import KVCache
from gptforge.model.linear import linear
from gptforge.model.loss import IGNORE_INDEX, target_logprobs

FINISH_STOP = "stop"  # end-of-text or a stop string
FINISH_LENGTH = "length"  # max_new_tokens reached
FINISH_ABORT = "abort"  # cancelled by the caller or ended by a shutdown

_ids = itertools.count()
log = logging.getLogger(__name__)


class QueueFullError(GptforgeError):
    """The engine's queue of waiting requests is full; try again later."""


@dataclass(eq=False)
class Output:
    """What one step produced for one request: a new token (None when the request ended without one, e.g.
    cancelled), the model's log-probability of it and its top alternatives as (token, logprob) pairs (when
    asked for), and the finish reason on the request's last output."""

    seq: Sequence
    token: int | None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass(eq=False)
class Sequence:
    """One generation request.

    Args:
        prompt: token ids, 1..context_length of them (an empty prompt starts from end-of-text).
        params: sampling parameters, including max_new_tokens and the seed.
        logprobs: None, or how many top alternatives to report with each generated token's log-probability.
        prompt_logprobs: None, or score the prompt: the log-probability of every prompt token after the
            first (computed with `model.loss.target_logprobs`) with this many top alternatives.
        stop_check: called in the engine's thread with each new token (not end-of-text); True ends the
            request with finish reason "stop" (the text layer uses it for stop strings).
        on_output: called in the engine's thread with each Output of this request.
        ignore_eot: keep generating after end-of-text (benchmarks that need fixed output lengths).
    """

    prompt: list[int]
    params: SamplingParams
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_check: Callable[[int], bool] | None = None
    on_output: Callable[[Output], None] | None = None
    ignore_eot: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    # (logprob, [(token, logprob), ...]) for prompt tokens 1..P-1, filled while the prompt is read
    prompt_scores: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.row = -1
        self.pending: list[int] = []  # tokens still to prefill into the row
        self.fed_prompt = 0  # prompt tokens prefilled so far (for prompt scoring)
        self.scoring = False
        self.last = -1  # the newest sampled token, not yet fed back
        self.order = -1  # admission order (prefill is first come, first served)
        self.generator: torch.Generator | None = None
        self.seen: torch.Tensor | None = None  # (V,) bool, prompt and output tokens
        self.counts: torch.Tensor | None = None  # (V,) float32, generated-token counts

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def reservation(self, context_length: int) -> int:
        """KV slots this request can fill: its prompt and every new token but the last (never fed back)."""
        prompt = max(len(self.prompt), 1)  # an empty prompt is fed as one end-of-text token
        return min(context_length, max(prompt, prompt + self.params.max_new_tokens - 1))


class Engine:
    """Continuous-batching scheduler over a GPT (anything with `cfg`, and `forward(tokens, kv_cache=...)`;
    `hidden` and `lm_head` are used when present, to skip logits nobody needs).

    `submit` and `cancel` may be called from any thread; `step` from one thread only (the owner of the model).

    Args:
        model: the model, in eval mode.
        eot_id: the end-of-text token; generating it ends a request.
        max_running: rows decoded together (requests beyond wait in the queue).
        max_queue: waiting requests allowed; `submit` raises QueueFullError beyond.
        max_cached_tokens: KV-cache slots (rows x slots per row) the engine may allocate; at least
            context_length (default max_running * context_length).
        prefill_chunk: prompt tokens prefilled per step, over all newcomers (>= 1).
    """

    def __init__(self, model: torch.nn.Module, *, eot_id: int, max_running: int = 16, max_queue: int = 256,
                 max_cached_tokens: int | None = None, prefill_chunk: int = 256) -> None:
        self.model = model
        self.cfg = model.cfg
        C = self.cfg.context_length
        self.max_cached_tokens = max_running * C if max_cached_tokens is None else max_cached_tokens
        for ok, what in ((max_running >= 1, f"max_running must be >= 1, got {max_running}"),
                         (max_queue >= 0, f"max_queue must be >= 0, got {max_queue}"),
                         (prefill_chunk >= 1, f"prefill_chunk must be >= 1, got {prefill_chunk}"),
                         (self.max_cached_tokens >= C, f"max_cached_tokens must be >= context_length ({C}), "
                                                       f"got {self.max_cached_tokens}")):
            if not ok:
                raise GptforgeError(what)
        self.eot_id, self.max_running, self.max_queue = eot_id, max_running, max_queue
        self.prefill_chunk = prefill_chunk
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i] owns cache row i
        self.cache: KVCache | None = None
        self.steps = 0
        self._lock = threading.Lock()
        self._inbox: list[Sequence] = []
        self._cancels: list[Sequence] = []
        self._admitted = itertools.count()

    # ---- any thread -------------------------------------------------------------------------------------------
    def submit(self, seqs: list[Sequence]) -> None:
        """Queue requests (all or none). Thread-safe.

        Raises:
            GptforgeError: a prompt longer than the context window or with a token id outside the vocabulary.
            QueueFullError: fewer than len(seqs) free places in the queue.
        """
        C, V = self.cfg.context_length, self.cfg.vocab_size
        for seq in seqs:
            if len(seq.prompt) > C:
                raise GptforgeError(f"prompt has {len(seq.prompt)} tokens; the model's context_length is {C} tokens")
            if any(not 0 <= t < V for t in seq.prompt):
                bad = next(t for t in seq.prompt if not 0 <= t < V)
                raise GptforgeError(f"token id {bad} is out of range; allowed: 0..{V - 1}")
            if not seq.params.greedy:
                seed = seq.params.seed if seq.params.seed is not None else int(torch.randint(2**62, ()).item())
                seq.generator = torch.Generator().manual_seed(seed)
        with self._lock:
            if len(self.waiting) + len(self._inbox) + len(seqs) > self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._inbox.extend(seqs)

    def cancel(self, seq: Sequence) -> None:
        """End a request at the next step (its row is freed then); a no-op once it has finished. Thread-safe."""
        with self._lock:
            self._cancels.append(seq)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._inbox or self._cancels)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self._inbox)

    # ---- the engine's thread ----------------------------------------------------------------------------------
    @torch.inference_mode()  # also selects the fastest CPU kernels, see model/linear.py
    def step(self) -> list[Output]:
        """Run one scheduling step; return its outputs (also passed to each request's `on_output`)."""
        with self._lock:
            self.waiting.extend(self._inbox)
            inbox_cancels, self._inbox, self._cancels = self._cancels, [], []
        outputs = [self._finish(s, FINISH_ABORT) for s in inbox_cancels if not s.finished]
        self._release()
        self._admit(outputs)
        if any(s.pending == [] and not s.finished for s in self.running):
            outputs += self._decode()
        if any(s.pending for s in self.running):
            outputs += self._prefill()
        self._release()
        if not self.running and not self.waiting:
            self.cache = None  # idle: give the memory back
        self.steps += 1
        self._deliver(outputs)
        return outputs

    def _deliver(self, outputs: list[Output]) -> None:
        for out in outputs:
            if out.seq.on_output is not None:
                try:
                    out.seq.on_output(out)
                except Exception:  # a consumer's bug must not stop every other request
                    log.exception("on_output callback of request %d failed", out.seq.id)

    def abort_all(self, reason: str = FINISH_ABORT) -> list[Output]:
        """End every waiting and running request with `reason` and free everything (shutdown, or a failure:
        nothing here touches the model or the cache)."""
        with self._lock:
            self.waiting.extend(self._inbox)
            self._inbox, self._cancels = [], []
        outputs = [self._finish(s, reason) for s in [*self.waiting, *self.running] if not s.finished]
        self.waiting.clear()
        self.running.clear()
        self.cache = None
        self._deliver(outputs)
        return outputs

    def _admit(self, outputs: list[Output]) -> None:
        """Move waiting requests into free rows while the row and memory caps allow."""
        C, admitted = self.cfg.context_length, []
        slots = self.cache.capacity if self.cache is not None else 0
        while self.waiting and len(self.running) + len(admitted) < self.max_running:
            seq = self.waiting[0]
            if seq.finished:  # cancelled while waiting
                self.waiting.popleft()
                continue
            need = max(slots, seq.reservation(C))
            if (len(self.running) + len(admitted) + 1) * need > self.max_cached_tokens:
                break
            slots = need
            admitted.append(self.waiting.popleft())
        if not admitted:
            return
        self._ensure_cache(len(self.running) + len(admitted), slots)
        for seq in admitted:
            seq.row, seq.order = len(self.running), next(self._admitted)
            self.running.append(seq)
            seq.pending = list(seq.prompt) or [self.eot_id]  # an empty prompt starts from end-of-text
            seq.scoring = seq.prompt_logprobs is not None
            if seq.params.uses_seen:
                seq.seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
                seq.seen[torch.tensor(seq.pending, device=self.device)] = True
            if seq.params.uses_counts:
                seq.counts = torch.zeros(self.cfg.vocab_size, device=self.device)
            if seq.params.max_new_tokens == 0 and not seq.scoring:
                outputs.append(self._finish(seq, FINISH_LENGTH))
        self.cache.reset_rows([s.row for s in admitted])

    def _ensure_cache(self, rows: int, slots: int) -> None:
        """Make the cache hold at least `rows` rows of `slots` slots: grown by doubling within the caps (the
        running rows are copied over), so a stream of slightly longer requests does not reallocate each time."""
        old = self.cache
        if old is not None and old.batch_size >= rows and old.capacity >= slots:
            return
        new_rows, new_slots = rows, slots
        if old is not None:
            new_slots = max(slots, min(self.cfg.context_length, 2 * old.capacity)) if old.capacity < slots \
                else old.capacity
            new_rows = max(rows, min(self.max_running, 2 * old.batch_size)) if old.batch_size < rows \
                else old.batch_size
        if new_rows * new_slots > self.max_cached_tokens:
            new_rows = max(rows, self.max_cached_tokens // new_slots)
            new_slots = max(slots, min(new_slots, self.max_cached_tokens // new_rows))
        c = self.cfg
        self.cache = KVCache(n_layer=c.n_layer, batch_size=new_rows, n_head=c.n_head, d_head=c.d_head,
                             capacity=new_slots, device=self.device, dtype=self.dtype)
        if old is not None and self.running:
            rows = list(range(len(self.running)))
            self.cache.copy_rows(old, rows, rows)

    def _forward(self, tokens: torch.Tensor, rows: list[int] | None, takes: list[int],
                 score: list[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """tokens (B, T) for the selected rows -> (logits at each row's last real token (B, V) float32,
        {i: logits (takes[i], V) of every real token} for the batch indices i in `score`)."""
        cache, B = self.cache, tokens.shape[0]
        cache.select(rows, takes)
        last = torch.tensor([max(t, 1) - 1 for t in takes], device=self.device)
        batch = torch.arange(B, device=self.device)
        if hasattr(self.model, "hidden") and hasattr(self.model, "lm_head"):
            hidden = self.model.hidden(tokens, kv_cache=cache)  # (B, T, D)
            logits = linear(hidden[batch, last], self.model.lm_head)  # (B, V)
            full = {i: linear(hidden[i, :takes[i]], self.model.lm_head) for i in score}
        else:
            all_logits = self.model(tokens, kv_cache=cache)  # (B, T, V)
            logits = all_logits[batch, last]
            full = {i: all_logits[i, :takes[i]] for i in score}
        return logits.float(), full

    def _decode(self) -> list[Output]:
        """One token for every decoding row; rows still prefilling ride along without writing to the cache."""
        C = self.cfg.context_length
        for seq in self.running:  # a full window slides: the row is re-read from its last C - C // 4 tokens
            if not seq.pending and not seq.finished and self.cache.row_lengths[seq.row] >= C:
                seq.pending = (list(seq.prompt) + seq.output)[-(C - max(1, C // 4)):]
                self.cache.reset_rows([seq.row])
        decoding = [not s.pending and not s.finished for s in self.running]
        if not any(decoding):
            return []
        tokens = torch.tensor([[s.last if d else 0] for s, d in zip(self.running, decoding)], device=self.device)
        n = len(self.running)
        logits, _ = self._forward(tokens, list(range(n)), [int(d) for d in decoding], [])
        idx = [i for i, d in enumerate(decoding) if d]
        seqs = [self.running[i] for i in idx]
        return self._sample(seqs, logits[idx] if len(idx) < n else logits)

    def _prefill(self) -> list[Output]:
        """Feed waiting prompt (or slide) tokens, first come first served, at most prefill_chunk in all."""
        budget, chunk = self.prefill_chunk, []
        for seq in sorted((s for s in self.running if s.pending), key=lambda s: s.order):
            if budget == 0:
                break
            take = min(len(seq.pending), budget)
            chunk.append((seq, take))
            budget -= take
        T = max(take for _, take in chunk)
        tokens = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, (seq, take) in enumerate(chunk):
            tokens[i, :take] = torch.tensor(seq.pending[:take])
        score = [i for i, (seq, _) in enumerate(chunk) if seq.scoring]
        logits, full = self._forward(tokens.to(self.device), [s.row for s, _ in chunk], [t for _, t in chunk], score)
        done, outputs = [], []
        for i, (seq, take) in enumerate(chunk):
            if seq.scoring:
                self._score_prompt(seq, full[i], take)
            seq.pending = seq.pending[take:]
            if not seq.pending:
                seq.scoring = False
                if seq.params.max_new_tokens == 0:
                    outputs.append(self._finish(seq, FINISH_LENGTH))
                else:
                    done.append(i)
        if done:
            outputs += self._sample([chunk[i][0] for i in done], logits[done])
        return outputs

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor, take: int) -> None:
        """Log-probabilities of the prompt tokens that follow this chunk's positions. logits (take, V)."""
        start = seq.fed_prompt
        targets = [seq.prompt[j + 1] if j + 1 < len(seq.prompt) else IGNORE_INDEX for j in range(start, start + take)]
        lp, _ = target_logprobs(logits[None], torch.tensor([targets], device=logits.device))
        top = torch.topk(torch.log_softmax(logits.float(), -1), seq.prompt_logprobs, dim=-1) \
            if seq.prompt_logprobs else None
        for j, target in enumerate(targets):
            if target != IGNORE_INDEX:
                alts = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else []
                seq.prompt_scores.append((float(lp[0, j]), alts))
        seq.fed_prompt += take

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Output]:
        """Draw one token for each of `seqs` from its logits row (V,) and record it."""
        params = [s.params for s in seqs]
        uniforms = torch.tensor([0.0 if s.generator is None else
                                 float(torch.rand((), generator=s.generator, dtype=torch.float64)) for s in seqs])
        seen = counts = None
        if any(s.seen is not None for s in seqs):
            seen = torch.stack([s.seen if s.seen is not None else torch.zeros_like(logits[0], dtype=torch.bool)
                                for s in seqs])
        if any(s.counts is not None for s in seqs):
            counts = torch.stack([s.counts if s.counts is not None else torch.zeros_like(logits[0]) for s in seqs])
        tokens = sample_rows(logits, params, uniforms, seen=seen, counts=counts)
        want = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        info = {}
        if want:
            chosen, top_ids, top_lp = token_logprobs(logits[want], tokens[want], max(seqs[i].logprobs for i in want))
            for k, i in enumerate(want):
                n = seqs[i].logprobs
                info[i] = (float(chosen[k]), list(zip(top_ids[k, :n].tolist(), top_lp[k, :n].tolist())))
        return [self._accept(seq, tok, *info.get(i, (None, None))) for i, (seq, tok) in
                enumerate(zip(seqs, tokens.tolist()))]

    def _accept(self, seq: Sequence, token: int, logprob: float | None,
                top: list[tuple[int, float]] | None) -> Output:
        seq.output.append(token)
        seq.last = token
        if seq.seen is not None:
            seq.seen[token] = True
        if seq.counts is not None:
            seq.counts[token] += 1
        out = Output(seq, token, logprob, top)
        if token == self.eot_id and not seq.ignore_eot:
            reason = FINISH_STOP
        elif token != self.eot_id and seq.stop_check is not None and self._stop_check(seq, token):
            reason = FINISH_STOP if seq.finish_reason is None else FINISH_ABORT
        elif len(seq.output) >= seq.params.max_new_tokens:
            reason = FINISH_LENGTH
        else:
            return out
        self._finish(seq, reason)
        out.finish_reason = reason
        return out

    def _stop_check(self, seq: Sequence, token: int) -> bool:
        """The caller's stop check; one that raises ends its own request ("abort"), never the engine."""
        try:
            return bool(seq.stop_check(token))
        except Exception:
            log.exception("stop_check of request %d failed", seq.id)
            seq.finish_reason = FINISH_ABORT
            return True

    def _finish(self, seq: Sequence, reason: str) -> Output:
        seq.finish_reason = reason
        seq.pending = []
        return Output(seq, None, finish_reason=reason)

    def _release(self) -> None:
        """Free the rows of finished requests: the last running row moves into each hole, so rows stay
        contiguous (one row copy per finished request, see KVCache.copy_rows)."""
        if any(s.finished for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.finished)
        while True:
            while self.running and self.running[-1].finished:
                self.running.pop()
            hole = next((i for i, s in enumerate(self.running) if s.finished), None)
            if hole is None:
                return
            last = self.running.pop()
            self.cache.copy_rows(self.cache, [last.row], [hole])
            last.row = hole
            self.running[hole] = last
