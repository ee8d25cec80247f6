#!/usr/bin/env bash
# Table 4-STYLE domain adaptation, NOT the paper's Table 4: the WikiText-103 LM on another
# corpus, alone and with a datastore of that corpus's training text; lambda tuned on that
# corpus's dev (valid) set. What it measures: how much a datastore of a new domain helps a
# WikiText-103 LM there, and whether the best lambda out of domain is larger than in domain
# (section 5 / Figure 5). The paper's Table 4 is another experiment: a WIKI-3B LM with a BOOKS
# datastore (not distributable), a 512-token context and FAISS's distances; its numbers are
# not comparable with these and are not printed in the table. The default corpus here is Jane
# Austen (knnlm.experiments.corpora.austen, built from Debian's r-cran-janeaustenr if
# DOMAIN_DIR has no train.txt), at this file's WikiText-103 settings. Writes
# $RESULTS/table4.md, table4_lambda.png (perplexity vs lambda on the corpus's dev set: an
# out-of-domain curve like Figure 5's) and table4_*.json.
#
#   scripts/wikitext103/table4_domain_adaptation.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   DOMAIN_NAME=austen
#   DOMAIN_DIR=${WORK}/${DOMAIN_NAME}      train.txt valid.txt test.txt, tokenized like WikiText
#   DOMAIN_DATA_BIN=${WORK}/data-bin/${DOMAIN_NAME}   binarized with the LM's dictionary
#   DOMAIN_DSTORE=${DSTORE_DIR}/${DOMAIN_NAME}_${KEYTYPE}
#   DOMAIN_INDEX=${DOMAIN_DSTORE}_knn.index
#   TUNE_LAMBDAS=0:1:0.01
#   K=1024
#   KNN_TEMP=1
#   WORKERS=8
#   the dump, index and evaluation settings: see dump_datastore.sh, build_index.sh, table1.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm fairseq-preprocess knnlm-build-index knnlm-tune
require_inputs

# 1. The corpus, binarized with the LM's dictionary (its unknown words become <unk>).
splits=(train valid test)
if [[ ! -f $DOMAIN_DIR/train.txt ]]; then
    [[ $DOMAIN_NAME == austen ]] ||
        die "no $DOMAIN_DIR/train.txt: put the $DOMAIN_NAME corpus there as train.txt, valid.txt, test.txt"
    run "$PYTHON" -m knnlm.experiments.corpora.austen "$DOMAIN_DIR"
fi
for s in "${splits[@]}"; do [[ -f $DOMAIN_DIR/$s.txt ]] || die "missing $DOMAIN_DIR/$s.txt"; done
if [[ $FORCE != 1 ]] && newer_than_all "$DOMAIN_DATA_BIN/test.idx" "$DATA_BIN/dict.txt" "$DOMAIN_DIR"/{train,valid,test}.txt; then
    log "$DOMAIN_DATA_BIN is binarized: not redone (FORCE=1 redoes it)"
else
    run fairseq-preprocess --only-source --srcdict "$DATA_BIN/dict.txt" \
        --trainpref "$DOMAIN_DIR/train.txt" --validpref "$DOMAIN_DIR/valid.txt" --testpref "$DOMAIN_DIR/test.txt" \
        --destdir "$DOMAIN_DATA_BIN" --workers "$WORKERS" 2>&1 | tee "$LOG_DIR/prepare_$DOMAIN_NAME.log" >&2
fi

# 2. Its datastore and index; lambda tuned on its dev set.
ensure_knn "$DOMAIN_DSTORE" "$DOMAIN_INDEX" "$KEYTYPE" "$DOMAIN_DATA_BIN"
name=${DOMAIN_NAME}_${KEYTYPE}_valid_k$K
knn_export "$name" "$DOMAIN_DATA_BIN" valid "$DOMAIN_DSTORE" "$DOMAIN_INDEX" "$KEYTYPE"
run knnlm-tune "$EXPORT_DIR/$name" --lambdas "$TUNE_LAMBDAS" --temperatures "$KNN_TEMP" \
    --plot "$RESULTS/table4_lambda.png" --json "$RESULTS/table4_${DOMAIN_NAME}_valid.json" \
    >"$LOG_DIR/table4_tune_$DOMAIN_NAME.log"
lam=$(json_get "$RESULTS/table4_${DOMAIN_NAME}_valid.json" best_lambda)

# 3. The in-domain best lambda, for comparison (WikiText-103's datastore and dev set).
ensure_knn "$DSTORE" "$INDEX" "$KEYTYPE"
knn_export "wt103_${KEYTYPE}_valid_k$K" "$DATA_BIN" valid "$DSTORE" "$INDEX" "$KEYTYPE"
run knnlm-tune "$EXPORT_DIR/wt103_${KEYTYPE}_valid_k$K" --lambdas "$TUNE_LAMBDAS" --temperatures "$KNN_TEMP" \
    --json "$RESULTS/table4_wt103_valid.json" >"$LOG_DIR/table4_tune_wt103.log"
lam_in=$(json_get "$RESULTS/table4_wt103_valid.json" best_lambda)

# 4. Test set at the lambda tuned on dev.
eval_args "$DOMAIN_DATA_BIN" test
knn_args "$DOMAIN_DSTORE" "$DOMAIN_INDEX" "$KEYTYPE"
out=$LOG_DIR/table4_${DOMAIN_NAME}_test.log
run "${EVAL[@]}" "${KNN[@]}" --lmbda "$lam" 2>&1 | tee "$out" >&2

dev=$RESULTS/table4_${DOMAIN_NAME}_valid.json
{
    echo "Domain adaptation (Table 4-style, not the paper's Table 4): the WikiText-103 LM on $DOMAIN_NAME,"
    echo "with a datastore of $DOMAIN_NAME's training text (k=$K, T=$KNN_TEMP, $SIM_FUNC, lambda=$lam tuned on $DOMAIN_NAME dev)"
    echo
    echo "| Training data | Datastore | Dev | Test |"
    echo "|---|---|---:|---:|"
    echo "| WikiText-103 | - | $(fmt "$(json_get "$dev" base_ppl)") | $(fmt "$(ppl_from "$out" base)") |"
    echo "| WikiText-103 | $DOMAIN_NAME | $(fmt "$(json_get "$dev" best_ppl)") | $(fmt "$(ppl_from "$out" knn)") |"
    echo
    echo "Best lambda: $lam on $DOMAIN_NAME dev (out of domain), $lam_in on WikiText-103 dev (in domain)."
    echo "Not comparable with the paper's Table 4 (a WIKI-3B LM, a BOOKS datastore, 512-token context, FAISS distances);"
    echo "only the direction is: the paper's best lambda was larger out of domain (0.65) than in domain (0.25)."
} | tee "$RESULTS/table4.md"
