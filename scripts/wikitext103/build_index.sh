#!/usr/bin/env bash
# Build the FAISS index over the datastore's keys: 4096 IVF centroids learned from 1M random
# keys, keys quantized to 64 bytes (product quantization), 32 lists probed when searching.
#
#   scripts/wikitext103/build_index.sh
#
# Environment (defaults in configs/wikitext103.yaml):
#   DSTORE=${DSTORE_DIR}/wt103_${KEYTYPE}   the datastore (dump_datastore.sh)
#   INDEX=${DSTORE}_knn.index
#   INDEX_FACTORY=IVF{ncentroids},PQ{code_size}
#   NCENTROIDS=4096
#   CODE_SIZE=64
#   NUM_KEYS_TO_TRAIN=1000000
#   PROBE=32
#   INDEX_SEED=1
#   INDEX_SAMPLER=default                  legacy: the original build_dstore.py's training sample,
#                                          np.random.seed(INDEX_SEED); np.random.choice(...), unsorted
#   INDEX_GPU=0                            1: train and add on the GPU (needs faiss-gpu)
#   FORCE=0                                1: rebuild even if the index is up to date
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need knnlm-build-index

grep -qs '"complete": true' "${DSTORE}_meta.json" ||
    die "no complete datastore at $DSTORE: run scripts/wikitext103/dump_datastore.sh first"
build_index "$DSTORE" "$INDEX"
echo "index $INDEX over $(dstore_size "$DSTORE") entries of $DSTORE"
