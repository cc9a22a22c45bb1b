"""lm-evaluation-harness adapter: a gptforge run as an lm-eval `LM`, registered under the name `gptforge`.

Needs the optional extra (`pip install gptforge[eval]`: lm-eval 0.4.x); lm-eval is imported only here.
lm-eval 0.4.13 discovers models only through its own registry (no entry points), so the registration must
run inside the lm-eval process. Three ways:

    python -m gptforge.eval.lm_eval run --model gptforge --model_args path=RUN_DIR --tasks hellaswag \\
        --include_path DIR          # lm-eval's own CLI, with this module imported first
    import gptforge.eval.lm_eval    # in Python, before lm_eval.simple_evaluate(model="gptforge", ...)
    lm_eval.simple_evaluate(model=GptforgeLM(path=RUN_DIR), tasks=[...])

Plain `lm_eval run --model gptforge` cannot find the class (lm-eval issues 1457, 1621, 3282 ask for
plugin discovery). Scoring is gptforge's: contexts and continuations are tokenized with lm-eval's boundary
rule (`eval.protocol.split_pair(..., "lm-eval")`), an empty context is the end-of-text token, an over-long
context is cut from the left for each continuation, and the choices of one item that share a context are
scored in one packed row (`eval.scoring`). `loglikelihood_rolling` uses disjoint windows of the full
context length (`eval.perplexity.rolling_nll`); `generate_until` uses `LanguageModel.generate`.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from gptforge.eval.protocol import split_pair
from gptforge.eval.scoring import Group, score_groups


@register_model("gptforge")
class GptforgeLM(LM):
    """lm-eval `LM` over a gptforge run directory (or an already loaded `LanguageModel`).

    Args:
        path: run or checkpoint directory (`--model_args path=RUN_DIR`).
        lm: a loaded `gptforge.api.LanguageModel` instead of `path`.
        batch_size: continuations per forward pass; lm-eval passes its `--batch_size` ("auto" means 32).
        device: where to load the model (cpu, cuda, ...); lm-eval's default "cuda" falls back to the CPU when
            no GPU is present.
    """

    def __init__(self, path: str | None = None, lm=None, batch_size: int | str | None = 32, device: str | None = None,
                 **_: Any) -> None:
        super().__init__()
        if lm is None:
            import gptforge
            from gptforge.errors import GptforgeError

            if not path:
                raise GptforgeError("the gptforge lm-eval model needs --model_args path=RUN_DIR")
            if device and device.startswith("cuda") and not torch.cuda.is_available():
                device = "cpu"  # lm-eval's CLI passes --device cuda by default, also on machines without one
            lm = gptforge.load(path, device=device or "cpu")
        self.lm = lm
        self.batch_size = int(batch_size) if str(batch_size or "").isdigit() else 32
        self.window = lm.config.model.context_length

    def _pairs(self, requests) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        tok, pairs = self.lm.tokenizer, []
        for context, continuation in (r.args for r in requests):
            ctx, cont = split_pair(tok, context, continuation, "lm-eval")
            cont = cont[-self.window:]  # lm-eval keeps at most max_length continuation tokens too
            ctx = ctx[-(self.window + 1 - len(cont)):] if len(ctx) + len(cont) - 1 > self.window else ctx
            pairs.append((ctx or (tok.eot_id,), cont))
        return pairs

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log-likelihood in nats, whether greedy) of each request's continuation given its context."""
        pairs = self._pairs(requests)
        groups: list[Group] = []
        where: list[tuple[int, int]] = []
        last: dict[tuple[int, ...], int] = {}
        for ctx, cont in pairs:  # an item's choices arrive together with the same context: pack them
            g = last.get(ctx)
            if g is None or len(groups[g].continuations) >= 16:
                g = len(groups)
                last = {ctx: g}
                groups.append(Group(ctx, ()))
            groups[g] = Group(ctx, groups[g].continuations + (cont,))
            where.append((g, len(groups[g].continuations) - 1))
        scores = score_groups(self.lm.model, groups, batch_size=self.batch_size)
        return [scores[g][s] for g, s in where]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood (nats) of each request's whole string, every token scored once, the first
        given the end-of-text token."""
        from gptforge.eval.perplexity import rolling_nll

        out = []
        for (text,) in (r.args for r in requests):
            seq = [self.lm.tokenizer.eot_id] + self.lm.tokenizer.encode(text)
            out.append(-rolling_nll(self.lm.model, seq, stride=self.window) if len(seq) > 1 else 0.0)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuation of each context, cut at the first `until` string."""
        out = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sample = bool(kwargs.get("do_sample", False))
            max_new = max(1, min(int(kwargs.get("max_gen_toks", 256)), self.window // 2))
            ids = self.lm.tokenizer.encode(context)
            if len(ids) + max_new > self.window:  # keep the end of an over-long prompt, as lm-eval's hf does
                context = self.lm.tokenizer.decode(ids[-(self.window - max_new):])
            text = self.lm.generate(context, max_new_tokens=max_new,
                                    temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
                                    stop=tuple(until), seed=0)
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out


def main() -> None:
    """lm-eval's command line with the `gptforge` model registered: `python -m gptforge.eval.lm_eval run ...`."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv[0] = "lm_eval"
    cli_evaluate()


if __name__ == "__main__":
    main()
