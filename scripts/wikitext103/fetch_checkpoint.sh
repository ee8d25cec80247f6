#!/usr/bin/env bash
# Download fairseq's adaptive-input WikiText-103 LM (Baevski & Auli 2019; adaptive_lm_wiki103.v2,
# 247M parameters), the model the paper builds its kNN-LM on. Skipped if $CKPT exists.
#
#   scripts/wikitext103/fetch_checkpoint.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   CKPT_DIR=${WORK}/checkpoints
#   CKPT_URL=https://dl.fbaipublicfiles.com/fairseq/models/lm/adaptive_lm_wiki103.v2.tar.bz2
#   CKPT=${CKPT_DIR}/adaptive_lm_wiki103.v2/model.pt   point it at any other checkpoint to use that
#   SRCDICT=${CKPT_DIR}/adaptive_lm_wiki103.v2/dict.txt
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -f $CKPT ]]; then
    log "checkpoint $CKPT exists: not downloading"
else
    need curl tar
    mkdir -p "$CKPT_DIR"
    archive=$CKPT_DIR/$(basename "$CKPT_URL")
    run curl -fL --retry 3 -o "$archive.part" "$CKPT_URL"
    mv "$archive.part" "$archive"
    run tar -xf "$archive" -C "$CKPT_DIR"
    rm -f "$archive"
    [[ -f $CKPT ]] || die "the archive from $CKPT_URL has no $CKPT; set CKPT to the model file it unpacked in $CKPT_DIR"
fi
[[ -f $SRCDICT ]] || log "warning: no dictionary at $SRCDICT; prepare_data.sh will build one from the data"
echo "checkpoint: $CKPT"
