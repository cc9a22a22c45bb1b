#!/usr/bin/env bash
# The whole pipeline end to end on the tiny `debug` preset, in a few minutes on a laptop CPU:
# prepare (BPE on Tiny Shakespeare, downloaded once or found under $GPTFORGE_DATA_DIR) -> pretrain -> eval
# (zero-shot on a few items, when the eval sets are found: $GPTFORGE_EVAL_DATA) -> generate.
set -euo pipefail
OUT=${OUT:-runs/debug}
gptforge prepare --corpus shakespeare --tokenizer bpe --vocab_size 1024 --out "$OUT/data"
gptforge pretrain --preset debug --data "$OUT/data" --out "$OUT/run" --max_steps 200 --context_length 64 --d_model 64
if [ -n "${GPTFORGE_EVAL_DATA:-}" ]; then
    gptforge eval "$OUT/run" --tasks piqa,sst2 --limit 50 --quiet
fi
gptforge generate "$OUT/run" --prompt "ROMEO:" --max_new_tokens 60 --seed 0 --stream
