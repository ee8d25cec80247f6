#!/usr/bin/env bash
# Download the WikiText-103 LM (Baevski & Auli 2019's adaptive-input transformer,
# transformer_lm_wiki103, 247M parameters) the paper builds its kNN-LM on. Skipped if $CKPT exists.
#
#   scripts/wikitext103/fetch_checkpoint.sh
#
# CKPT_SOURCE=original (default) fetches the checkpoint of the kNN-LM authors' README,
# https://nlp.stanford.edu/projects/knnlm/wt103_checkpoint_best.pt, to
# ${CKPT_DIR}/wt103_checkpoint_best.pt; prepare_data.sh then builds the dictionary from the
# training text, as that README does (its data-bin). CKPT_SOURCE=fairseq fetches fairseq's
# adaptive_lm_wiki103.v2 archive (model.pt and its dict.txt, used to binarize). Either way
# the first dump checks that the weights give the paper's base perplexity on valid
# (BASE_PPL_TARGET) before anything is written.
#
# Environment (defaults in configs/wikitext103.yaml):
#   CKPT_SOURCE=original                   original | fairseq
#   CKPT_DIR=${WORK}/checkpoints
#   CKPT, CKPT_URL, SRCDICT                empty: the source's (see common.sh); set to override
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -f $CKPT ]]; then
    log "checkpoint $CKPT exists: not downloading"
else
    need curl
    mkdir -p "$CKPT_DIR"
    case $CKPT_URL in
        *.tar.bz2|*.tar.gz|*.tgz|*.tar)
            need tar
            archive=$CKPT_DIR/$(basename "$CKPT_URL")
            run curl -fL --retry 3 -o "$archive.part" "$CKPT_URL"
            mv "$archive.part" "$archive"
            run tar -xf "$archive" -C "$CKPT_DIR"
            rm -f "$archive"
            [[ -f $CKPT ]] || die "the archive from $CKPT_URL has no $CKPT; set CKPT to the model file it unpacked in $CKPT_DIR" ;;
        *)  # a checkpoint file itself (the original README's)
            mkdir -p "$(dirname "$CKPT")"
            run curl -fL --retry 3 -o "$CKPT.part" "$CKPT_URL"
            mv "$CKPT.part" "$CKPT" ;;
    esac
fi
if [[ -n $SRCDICT && ! -f $SRCDICT ]]; then
    log "warning: no dictionary at $SRCDICT; prepare_data.sh will build one from the data"
fi
echo "checkpoint: $CKPT ($CKPT_SOURCE)"
