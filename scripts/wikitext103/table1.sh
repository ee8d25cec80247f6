#!/usr/bin/env bash
# Table 1: WikiText-103 perplexity of the base LM, +kNN-LM, +continuous cache, +both, on the
# dev (valid) and test sets. Prints a markdown table, also written to $RESULTS/table1.md.
# The datastore and index are made first if missing or out of date.
#
# The continuous cache is Grave et al. (2017)'s: the output hidden state (CACHE_KEYTYPE=auto:
# decoder_output_ln where the model has a final LayerNorm, else decoder_output, as for the
# WikiText-103 LM), a memory of the CACHE_SIZE previous positions that spans the context window
# (--cache-include-context: the 2,560 context positions are remembered, not only the block's
# earlier scored ones), and its lambda and theta tuned on valid over the grid CACHE_LAMBDAS x
# CACHE_THETAS in one evaluation (--cache-grid-json), once over the LM (+cache) and once over
# the kNN-LM (+kNN-LM + cache). Set CACHE_LMBDA and CACHE_THETA to use fixed values instead.
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
#   CACHE_KEYTYPE=auto                     the cache's hidden state (auto: the output state)
#   CACHE_SIZE=2000                        positions remembered (Grave et al.: 2,000)
#   CACHE_LMBDA=                           empty: tuned on valid (both must be set to fix them)
#   CACHE_THETA=
#   CACHE_LAMBDAS=0:0.5:0.02               the tuning grid
#   CACHE_THETAS=0.0001,0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1
#   EVAL_TOKENS_PER_SAMPLE=3072            with EVAL_CONTEXT_WINDOW=2560: 512 tokens scored per block
#   EVAL_CONTEXT_WINDOW=2560
#   EVAL_BREAK_MODE=complete
#   DSTORE, INDEX, KEYTYPE, the dump and index settings: see dump_datastore.sh, build_index.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm knnlm-build-index
require_inputs
ensure_knn "$DSTORE" "$INDEX" "$KEYTYPE"

cache_kt=$CACHE_KEYTYPE
if [[ $cache_kt == auto ]]; then cache_kt=$(output_keytype); fi
require_keytype "$cache_kt"
cache=(--continuous-cache --cache-keytype "$cache_kt" --cache-size "$CACHE_SIZE" --cache-include-context)
if [[ -n $CACHE_LMBDA && -n $CACHE_THETA ]]; then
    lam_lm=$CACHE_LMBDA theta_lm=$CACHE_THETA lam_knn=$CACHE_LMBDA theta_knn=$CACHE_THETA
    tuned="fixed"
else
    # One evaluation on valid tunes both cache rows: the kNN-LM as usual, the cache at lambda 0
    # (so the run's own numbers are the kNN-LM's), every (lambda, theta) of the grid tallied.
    grid=$RESULTS/table1_cache_grid.json
    eval_args "$DATA_BIN" valid
    knn_args "$DSTORE" "$INDEX" "$KEYTYPE"
    run "${EVAL[@]}" "${KNN[@]}" "${cache[@]}" --cache-lmbda 0 --cache-grid-json "$grid" \
        --cache-grid-lambdas "$CACHE_LAMBDAS" --cache-grid-thetas "$CACHE_THETAS" 2>&1 |
        tee "$LOG_DIR/table1_cache_tune_valid.log" >&2
    lam_lm=$(json_get "$grid" lm.best_lambda) theta_lm=$(json_get "$grid" lm.best_theta)
    lam_knn=$(json_get "$grid" knn.best_lambda) theta_knn=$(json_get "$grid" knn.best_theta)
    tuned="tuned on valid"
fi
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
    run "${EVAL[@]}" "${KNN[@]}" --lmbda 0 "${cache[@]}" --cache-lmbda "$lam_lm" --cache-theta "$theta_lm" 2>&1 | tee "$out" >&2
    ppl[cache,$split]=$(ppl_from "$out" knn)
    out=$LOG_DIR/table1_${split}_knn_cache.log
    run "${EVAL[@]}" "${KNN[@]}" "${cache[@]}" --cache-lmbda "$lam_knn" --cache-theta "$theta_knn" 2>&1 | tee "$out" >&2
    ppl[both,$split]=$(ppl_from "$out" knn)
done

{
    echo "Table 1: perplexity on WikiText-103 (k=$K, lambda=$LMBDA, T=$KNN_TEMP, $SIM_FUNC)"
    echo
    echo "Continuous cache: $cache_kt states, the last $CACHE_SIZE positions (context window included);" \
        "lambda=$lam_lm, theta=$theta_lm over the LM and lambda=$lam_knn, theta=$theta_knn over the kNN-LM ($tuned)"
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
