#!/usr/bin/env bash
# Table 1: WikiText-103 perplexity of the base LM, +kNN-LM, +continuous cache, +both, on the
# dev (valid) and test sets. Prints a markdown table, also written to $RESULTS/table1.md.
# The datastore and index are made first if missing or out of date.
#
#   scripts/wikitext103/table1.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   SPLITS="valid test"
#   K=1024
#   PROBE=32
#   LMBDA=0.25
#   KNN_TEMP=1
#   SIM_FUNC=l2
#   CACHE_LMBDA=0.1                        not given in the paper: tune on valid
#   CACHE_THETA=0.05
#   EVAL_TOKENS_PER_SAMPLE=3072            with EVAL_CONTEXT_WINDOW=2560: 512 tokens scored per block
#   EVAL_CONTEXT_WINDOW=2560
#   EVAL_BREAK_MODE=complete
#   DSTORE, INDEX, KEYTYPE, the dump and index settings: see dump_datastore.sh, build_index.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm knnlm-build-index
require_inputs
ensure_knn "$DSTORE" "$INDEX" "$KEYTYPE"

cache=(--continuous-cache --cache-lmbda "$CACHE_LMBDA" --cache-theta "$CACHE_THETA")
declare -A ppl
for split in $SPLITS; do
    eval_args "$DATA_BIN" "$split"
    knn_args "$DSTORE" "$INDEX" "$KEYTYPE"
    out=$LOG_DIR/table1_${split}_knn.log
    run "${EVAL[@]}" "${KNN[@]}" 2>&1 | tee "$out" >&2
    ppl[base,$split]=$(ppl_from "$out" base)
    ppl[knn,$split]=$(ppl_from "$out" knn)
    # The cache alone: the kNN-LM path at lambda = 0 (exactly the LM) plus the cache; the task
    # does not apply --continuous-cache without --knnlm.
    out=$LOG_DIR/table1_${split}_cache.log
    run "${EVAL[@]}" "${KNN[@]}" --lmbda 0 "${cache[@]}" 2>&1 | tee "$out" >&2
    ppl[cache,$split]=$(ppl_from "$out" knn)
    out=$LOG_DIR/table1_${split}_knn_cache.log
    run "${EVAL[@]}" "${KNN[@]}" "${cache[@]}" 2>&1 | tee "$out" >&2
    ppl[both,$split]=$(ppl_from "$out" knn)
done

{
    echo "Table 1: perplexity on WikiText-103 (k=$K, lambda=$LMBDA, T=$KNN_TEMP, $SIM_FUNC; cache lambda=$CACHE_LMBDA, theta=$CACHE_THETA)"
    echo
    printf '| Model |'; for split in $SPLITS; do printf ' %s |' "$split"; done; echo ' paper (dev / test) |'
    printf '|---|'; for split in $SPLITS; do printf -- '---:|'; done; echo '---:|'
    for row in "base|Base LM|17.96 / 18.65" "knn|+kNN-LM|16.06 / 16.12" \
        "cache|+Continuous cache|17.67 / 18.27" "both|+kNN-LM + continuous cache|15.81 / 15.79"; do
        IFS='|' read -r key name paper <<<"$row"
        printf '| %s |' "$name"
        for split in $SPLITS; do printf ' %s |' "$(fmt "${ppl[$key,$split]}")"; done
        echo " $paper |"
    done
} | tee "$RESULTS/table1.md"
