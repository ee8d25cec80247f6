#!/usr/bin/env bash
# Figure 5 (in-domain curve): perplexity on valid vs the interpolation weight lambda, from one
# evaluation's per-token export, with knnlm-tune. The paper finds lambda = 0.25 best on
# WikiText-103; table4_domain_adaptation.sh gives the out-of-domain curve. Writes
# $RESULTS/figure5.png, figure5.json and figure5.txt.
#
#   scripts/wikitext103/figure5.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   TUNE_LAMBDAS=0:1:0.01
#   KNN_TEMP=1                             fixed: one curve
#   K=1024
#   the dump, index and evaluation settings: see dump_datastore.sh, build_index.sh, table1.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm knnlm-build-index knnlm-tune
require_inputs
ensure_knn "$DSTORE" "$INDEX" "$KEYTYPE"

name=wt103_${KEYTYPE}_valid_k$K
knn_export "$name" "$DATA_BIN" valid "$DSTORE" "$INDEX" "$KEYTYPE"
run knnlm-tune "$EXPORT_DIR/$name" --lambdas "$TUNE_LAMBDAS" --temperatures "$KNN_TEMP" \
    --plot "$RESULTS/figure5.png" --json "$RESULTS/figure5.json" | tee "$RESULTS/figure5.txt"
