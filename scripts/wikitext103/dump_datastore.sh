#!/usr/bin/env bash
# Dump the kNN-LM datastore: one (key, next token) entry per WikiText-103 training token.
#
#   scripts/wikitext103/dump_datastore.sh
#
# Blocks of 3072 tokens of which the last 1536 are scored, so a target has at least 1536 tokens
# of prior context (fairseq-eval-lm subtracts --context-window from --tokens-per-sample; the
# original code's `--tokens-per-sample 1536 --context-window 1536`, whose eval_lm took 3072 from
# the checkpoint and subtracted the context window). This code writes one entry per training
# token: 103,227,021 for WikiText-103. The paper's datastore has 103,225,485 entries, exactly
# 1,536 (one block) fewer: the original eval_lm skipped every sample whose key count was not
# tokens_per_sample, which is the first block (no prior context: its keys span the padded row),
# and cut the last, partial block at --dstore-size. LEGACY_DATASTORE=1 (--legacy-datastore)
# leaves out that first block too, giving the paper's 103,225,485 rows in the same order.
#
# Before the dump (hours, ~200 GB): the key type is checked against the model
# (python -m fairseq_plugins.keytypes) and the base LM's valid perplexity against
# BASE_PPL_TARGET; a CPU run is refused unless ALLOW_CPU=1.
#
# Environment (defaults in configs/wikitext103.yaml):
#   DSTORE=${DSTORE_DIR}/wt103_${KEYTYPE}   prefix: DSTORE_keys.npy, DSTORE_vals.npy, DSTORE_meta.json
#   KEYTYPE=last_ffn_input
#   DUMP_TOKENS_PER_SAMPLE=3072
#   DUMP_CONTEXT_WINDOW=1536
#   DUMP_BREAK_MODE=none
#   DSTORE_FP16=1                          keys stored as float16
#   LEGACY_DATASTORE=0                     1: leave out the first block, as the original dump did
#   MAX_TOKENS=3072
#   SOFTMAX_BATCH=1024
#   EXPECTED_DSTORE_SIZE=                  when set, the entry count must equal it (see above)
#   BASE_PPL_TARGET=17.96                  the base LM's valid perplexity must be within
#   BASE_PPL_TOLERANCE=0.05                this much of it (empty target: not checked)
#   DEVICE_ARGS=auto                       --fp16 on a GPU; no GPU is refused...
#   ALLOW_CPU=0                            ...unless 1
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
