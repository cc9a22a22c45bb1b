"""Zero- and few-shot evaluation (GPT-3 section 2.4), perplexity, and the lm-evaluation-harness adapter.

Modules: `tasks` (readers of the eval sets' file formats), `prompts` (gpt3 and lm-eval prompt formats),
`protocol` (demonstrations, fitting, the token boundary), `scoring` (batched continuation log-likelihoods
with the context shared across choices), `harness` (`evaluate` and the metrics), `report` (the table),
`perplexity` (sliding-window perplexity and bits per byte), `lm_eval` (the lm-eval `LM` adapter, optional
extra `gptforge[eval]`). Nothing here imports `gptforge.train`; scoring goes through `gptforge.model.loss`.
"""
