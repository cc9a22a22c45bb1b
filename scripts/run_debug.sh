#!/usr/bin/env bash
# The whole pipeline end to end on the tiny `debug` preset, in about a minute on a laptop CPU:
# prepare (BPE on Tiny Shakespeare, downloaded once or found under $GPTFORGE_DATA_DIR) -> pretrain -> generate.
set -euo pipefail
OUT=${OUT:-runs/debug}
gptforge prepare --corpus shakespeare --tokenizer bpe --vocab_size 1024 --out "$OUT/data"
gptforge pretrain --preset debug --data "$OUT/data" --out "$OUT/run" --max_steps 200 --context_length 64 --d_model 64
gptforge generate "$OUT/run" --prompt "ROMEO:" --max_new_tokens 60 --seed 0 --stream
