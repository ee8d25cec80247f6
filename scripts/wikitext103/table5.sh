#!/usr/bin/env bash
# Table 5: the kNN-LM with keys taken from different states of the final layer, on the dev
# (valid) set, lambda tuned for each key type. Per key type: dump a datastore, build its
# index, export per-token probabilities on valid at k = K, tune lambda with knnlm-tune.
# Prints a markdown table, also written to $RESULTS/table5.md.
#
#   scripts/wikitext103/table5.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   KEYTYPES="decoder_output decoder_output_ln last_ffn_input last_ffn_input_before_ln last_attn_input last_attn_input_before_ln"
#                                          those the checkpoint lacks are left out with a message
#                                          before anything is dumped (the WikiText-103 LM has no
#                                          final LayerNorm: no decoder_output_ln)
#   K=1024
#   KNN_TEMP=1                             fixed; only lambda is tuned, as in the paper
#   TUNE_LAMBDAS=0:1:0.01
#   KEYTYPE=last_ffn_input                 this key type uses $DSTORE and $INDEX; the others
#                                          ${DSTORE_DIR}/wt103_<keytype> and <that>_knn.index
#   the dump, index and evaluation settings: see dump_datastore.sh, build_index.sh, table1.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm knnlm-build-index knnlm-tune
require_inputs

declare -A paper=([decoder_output]=17.07 [decoder_output_ln]=17.01 [last_ffn_input]=16.06
    [last_ffn_input_before_ln]=17.06 [last_attn_input]=16.76 [last_attn_input_before_ln]=17.14)
declare -A name=([decoder_output]="Model output" [decoder_output_ln]="Model output layer normalized"
    [last_ffn_input]="FFN input after layer norm" [last_ffn_input_before_ln]="FFN input before layer norm"
    [last_attn_input]="MHSA input after layer norm" [last_attn_input_before_ln]="MHSA input before layer norm")
rows=()
base=
for kt in $KEYTYPES; do
    [[ -v "name[$kt]" ]] || die "unknown key type $kt in KEYTYPES (known: ${!name[*]})"
done
# Checked on the model before any dump; unsupported ones are named on stderr and left out.
keytypes=$(supported_keytypes $KEYTYPES)
[[ -n $keytypes ]] || die "KeytypeUnsupported: $CKPT supports none of KEYTYPES=$KEYTYPES"
for kt in $KEYTYPES; do
    if ! grep -qx "$kt" <<<"$keytypes"; then
        rows+=("| ${name[$kt]} | n/a (the model has no such state) | - | ${paper[$kt]} |")
        continue
    fi
    if [[ $kt == "$KEYTYPE" ]]; then
        prefix=$DSTORE index=$INDEX
    else
        prefix=$DSTORE_DIR/wt103_$kt index=$DSTORE_DIR/wt103_${kt}_knn.index
    fi
    ensure_knn "$prefix" "$index" "$kt"
    knn_export "wt103_${kt}_valid_k$K" "$DATA_BIN" valid "$prefix" "$index" "$kt"
    json=$RESULTS/table5_$kt.json
    run knnlm-tune "$EXPORT_DIR/wt103_${kt}_valid_k$K" --lambdas "$TUNE_LAMBDAS" --temperatures "$KNN_TEMP" \
        --json "$json" >"$LOG_DIR/table5_tune_$kt.log"
    base=$(json_get "$json" base_ppl)
    rows+=("| ${name[$kt]} | $(fmt "$(json_get "$json" best_ppl)") | $(json_get "$json" best_lambda) | ${paper[$kt]} |")
done

{
    echo "Table 5: dev (valid) perplexity by key type (k=$K, T=$KNN_TEMP, lambda tuned per key type on valid)"
    echo
    echo "| Key type | Dev ppl | tuned lambda | paper dev ppl |"
    echo "|---|---:|---:|---:|"
    echo "| No datastore | $(fmt "$base") | - | 17.96 |"
    printf '%s\n' "${rows[@]}"
} | tee "$RESULTS/table5.md"
