#!/usr/bin/env bash
# Download WikiText-103 (if absent) and binarize it for fairseq.
#
#   scripts/wikitext103/prepare_data.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   WT103_DIR=${WORK}/wikitext-103     wiki.{train,valid,test}.tokens; downloaded only if one is missing
#   WT103_URL=https://wikitext.smerity.com/wikitext-103-v1.zip
#   DATA_BIN=${WORK}/data-bin/wikitext-103
#   SRCDICT                            a dictionary to binarize with, used if present. Empty by
#                                      default: CKPT_SOURCE=original builds it from wiki.train.tokens,
#                                      as the kNN-LM README did; CKPT_SOURCE=fairseq uses the archive's dict.txt
#   WORKERS=8                          fairseq-preprocess --workers
#   FORCE=0                            1: binarize again even if $DATA_BIN is complete and up to date
#
# Run fetch_checkpoint.sh first: with CKPT_SOURCE=fairseq, binarizing with the archive's dict.txt
# guarantees that token ids mean the same words to the data and to the model. Either way the
# base-perplexity check before the first dump (BASE_PPL_TARGET) catches a dictionary mismatch.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-preprocess

splits=(train valid test)
missing=0
for s in "${splits[@]}"; do [[ -f $WT103_DIR/wiki.$s.tokens ]] || missing=1; done
if [[ $missing == 0 ]]; then
    log "WikiText-103 is in $WT103_DIR: not downloading"
else
    need curl
    tmp=$WT103_DIR.download
    mkdir -p "$tmp" "$WT103_DIR"
    run curl -fL --retry 3 -o "$tmp/wikitext-103-v1.zip" "$WT103_URL"
    run "$PYTHON" -m zipfile -e "$tmp/wikitext-103-v1.zip" "$tmp"
    for s in "${splits[@]}"; do mv "$tmp/wikitext-103/wiki.$s.tokens" "$WT103_DIR/"; done
    rm -rf "$tmp"
fi

outputs=("$DATA_BIN/dict.txt")
for s in "${splits[@]}"; do outputs+=("$DATA_BIN/$s.bin" "$DATA_BIN/$s.idx"); done
complete=1
for f in "${outputs[@]}"; do [[ -f $f ]] || complete=0; done
# test.idx is written last: it must be newer than the text (and the dictionary used).
sources=("$WT103_DIR"/wiki.{train,valid,test}.tokens)
if [[ -n $SRCDICT && -f $SRCDICT ]]; then sources+=("$SRCDICT"); fi
if [[ $complete == 1 && $FORCE != 1 ]] && newer_than_all "$DATA_BIN/test.idx" "${sources[@]}"; then
    log "$DATA_BIN is complete and newer than its sources: not binarizing again (FORCE=1 redoes it)"
    exit 0
fi
dict=()
if [[ -n $SRCDICT && -f $SRCDICT ]]; then
    dict=(--srcdict "$SRCDICT")
elif [[ $CKPT_SOURCE == original && -z $SRCDICT ]]; then
    log "building the dictionary from the training text, as the original kNN-LM README did (CKPT_SOURCE=original)"
else
    log "warning: no $SRCDICT: building the dictionary from the training text; a checkpoint's" \
        "token ids match it only if that checkpoint was trained on data binarized the same way"
fi
# fairseq-preprocess refuses to overwrite a dictionary it builds: clear its own outputs only.
rm -f "${outputs[@]}" "$DATA_BIN/preprocess.log"
run fairseq-preprocess --only-source \
    --trainpref "$WT103_DIR/wiki.train.tokens" --validpref "$WT103_DIR/wiki.valid.tokens" \
    --testpref "$WT103_DIR/wiki.test.tokens" --destdir "$DATA_BIN" --workers "$WORKERS" "${dict[@]}" \
    2>&1 | tee "$LOG_DIR/prepare_data.log" >&2
echo "binarized WikiText-103 in $DATA_BIN ($(wc -l <"$DATA_BIN/dict.txt") dictionary entries)"
