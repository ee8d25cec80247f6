"""FAISS indexes over a datastore: open one safely, build one, build one over shards.

    load.py           load_index / read_index_meta: only a complete index of this datastore
    plan.py           knnlm-build-index's settings and plan
    steps.py          sample, train, add, checkpoint, finalize
    builder.py        the single build and the knnlm-build-index command
    sharded_build.py  shards added in parallel processes, merged on disk
    faiss_utils.py    threads, the GPU clone, writing an index atomically
"""

from .load import load_index, meta_path, read_index_meta

__all__ = ["load_index", "meta_path", "read_index_meta"]
