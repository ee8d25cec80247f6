#!/usr/bin/env bash
# Dump vs plain evaluation, interleaved: stock fairseq-eval-lm, our task without dumping, and
# the dump (--save-knnlm-dstore), ROUNDS times each on the demo's valid split.
#   bash benchmarks/dump_vs_plain.sh [DEMO_DIR=demo_runs/austen] [ROUNDS=2]
set -euo pipefail
D=${1:-demo_runs/austen}
ROUNDS=${2:-2}
BIN=${BIN:-.venv/bin}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
COMMON=("$D/data-bin" --path "$D/checkpoints/checkpoint_last.pt" --gen-subset valid --tokens-per-sample 256
        --context-window 128 --max-tokens 8192 --cpu --num-workers 0 --no-progress-bar)
for _ in $(seq "$ROUNDS"); do
  "$BIN/fairseq-eval-lm" "${COMMON[@]}" --task language_modeling 2>&1 | grep Evaluated | sed 's/^/stock:        /'
  "$BIN/fairseq-eval-lm" "${COMMON[@]}" --user-dir fairseq_plugins --task knnlm 2>&1 | grep Evaluated | sed 's/^/plugin plain: /'
  "$BIN/fairseq-eval-lm" "${COMMON[@]}" --user-dir fairseq_plugins --task knnlm --save-knnlm-dstore \
      --dstore-mmap "$OUT/valid" --overwrite 2>&1 | grep Evaluated | sed 's/^/dump:         /'
done
