#!/usr/bin/env bash
# Figure 2a/2b: perplexity and the tuned lambda vs datastore size. The paper samples datastores
# of growing size from WIKI-3B; here they are seeded random fractions of the WikiText-103
# datastore (python -m knnlm.subset), each with its own index, evaluated on valid at k = K.
# Writes $RESULTS/figure2a.png (a: perplexity at LMBDA and at the tuned lambda; b: the tuned
# lambda), figure2a.json and figure2a.txt (the table printed).
#
#   scripts/wikitext103/figure2a.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   FRACTIONS="0.05 0.1 0.25 0.5 1"        fraction 1 is $DSTORE itself
#   SUBSET_SEED=1
#   LMBDA=0.25
#   KNN_TEMP=1
#   TUNE_LAMBDAS=0:1:0.01
#   the dump, index and evaluation settings: see dump_datastore.sh, build_index.sh, table1.sh
#   (the index settings apply to every subset; too many centroids for a small subset are reduced)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm knnlm-build-index
require_inputs
ensure_knn "$DSTORE" "$INDEX" "$KEYTYPE"

exports=()
for f in $FRACTIONS; do
    if "$PYTHON" -c 'import sys; sys.exit(float(sys.argv[1]) != 1)' "$f"; then
        prefix=$DSTORE index=$INDEX name=wt103_${KEYTYPE}_valid_k$K
    else
        prefix=${DSTORE}_frac${f}_seed$SUBSET_SEED index=${DSTORE}_frac${f}_seed${SUBSET_SEED}_knn.index
        name=wt103_${KEYTYPE}_frac${f}_seed${SUBSET_SEED}_valid_k$K
        step "${prefix}_meta.json" "$LOG_DIR/subset_$(basename "$prefix").log" "${DSTORE}_meta.json" -- \
            "$PYTHON" -m knnlm.subset "$DSTORE" "$f" "$prefix" --seed "$SUBSET_SEED" --overwrite
        build_index "$prefix" "$index"
    fi
    knn_export "$name" "$DATA_BIN" valid "$prefix" "$index" "$KEYTYPE"
    exports+=("$EXPORT_DIR/$name")
done
run "$PYTHON" -m knnlm.sweeps sizes "${exports[@]}" --lmbda "$LMBDA" --knn-temp "$KNN_TEMP" \
    --lambdas "$TUNE_LAMBDAS" --plot "$RESULTS/figure2a.png" --json "$RESULTS/figure2a.json" |
    tee "$RESULTS/figure2a.txt"
