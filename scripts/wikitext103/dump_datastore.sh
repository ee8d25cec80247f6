#!/usr/bin/env bash
# Dump the kNN-LM datastore: one (key, next token) entry per WikiText-103 training token.
#
#   scripts/wikitext103/dump_datastore.sh
#
# Blocks of 3072 tokens of which the last 1536 are scored, so a target has at least 1536 tokens
# of prior context (fairseq-eval-lm subtracts --context-window from --tokens-per-sample; the
# original code's `--tokens-per-sample 1536 --context-window 1536`). This code writes one entry
# per training token: 103,227,021 for WikiText-103. The paper's datastore has 103,225,485
# entries, exactly 1,536 (one block) fewer: the original dump left one block out (reportedly the
# first, whose tokens have less than the full context). So the check that applies here is
# EXPECTED_DSTORE_SIZE=103227021.
#
# Environment (defaults in configs/wikitext103.yaml):
#   DSTORE=${DSTORE_DIR}/wt103_${KEYTYPE}   prefix: DSTORE_keys.npy, DSTORE_vals.npy, DSTORE_meta.json
#   KEYTYPE=last_ffn_input
#   DUMP_TOKENS_PER_SAMPLE=3072
#   DUMP_CONTEXT_WINDOW=1536
#   DUMP_BREAK_MODE=none
#   DSTORE_FP16=1                          keys stored as float16
#   MAX_TOKENS=3072
#   SOFTMAX_BATCH=1024
#   EXPECTED_DSTORE_SIZE=                  when set, the entry count must equal it (see above)
#   DEVICE_ARGS=auto                       --fp16 on a GPU, --cpu without
#   CKPT, DATA_BIN, FORCE                  see common.sh / the YAML file
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need fairseq-eval-lm
require_inputs

dump_datastore "$DSTORE" "$KEYTYPE"
size=$(dstore_size "$DSTORE")
echo "datastore $DSTORE: $size entries ($KEYTYPE keys)"
if [[ -n $EXPECTED_DSTORE_SIZE ]]; then
    [[ $size == "$EXPECTED_DSTORE_SIZE" ]] ||
        die "datastore $DSTORE has $size entries, EXPECTED_DSTORE_SIZE is $EXPECTED_DSTORE_SIZE: other data, or other DUMP_* settings"
    echo "entry count matches EXPECTED_DSTORE_SIZE"
fi
