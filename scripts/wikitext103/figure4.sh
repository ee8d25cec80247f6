#!/usr/bin/env bash
# Figure 4: perplexity on valid vs the number of neighbors k, from ONE evaluation at k = K
# (its per-token export keeps every neighbor's distance, best-first, so the first k' columns
# are what a run with --k k' retrieves). Writes $RESULTS/figure4.png, figure4.json and
# figure4.txt (the table printed: perplexity at LMBDA and at the lambda tuned per k).
#
#   scripts/wikitext103/figure4.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   KS="8 16 32 64 128 256 512 1024"       each at most K
#   K=1024
#   LMBDA=0.25
#   KNN_TEMP=1
#   TUNE_LAMBDAS=0:1:0.01
#   the dump, index and evaluation settings: see dump_datastore.sh, build_index.sh, table1.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm knnlm-build-index
require_inputs
ensure_knn "$DSTORE" "$INDEX" "$KEYTYPE"

name=wt103_${KEYTYPE}_valid_k$K
knn_export "$name" "$DATA_BIN" valid "$DSTORE" "$INDEX" "$KEYTYPE"
run "$PYTHON" -m knnlm.sweeps k "$EXPORT_DIR/$name" --ks "$(tr -s ' ' ',' <<<"$KS")" --lmbda "$LMBDA" \
    --knn-temp "$KNN_TEMP" --tune-lambda --lambdas "$TUNE_LAMBDAS" \
    --plot "$RESULTS/figure4.png" --json "$RESULTS/figure4.json" | tee "$RESULTS/figure4.txt"
