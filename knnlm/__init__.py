"""kNN-LM: nearest-neighbor language models (Khandelwal et al., ICLR 2020) for fairseq and beyond.

The core here needs no fairseq: a datastore on disk, a FAISS index over it, retrieval, and
the scoring math on plain tensors. The fairseq task and `KNNSequenceScorer` live in
`fairseq_plugins` (the `--user-dir`).

Names are imported on first use, so `import knnlm` (and every command-line tool and shard
worker) does not pay for importing torch and faiss until it needs them.
"""

import importlib
import logging

# faiss logs every instruction-set build it tries at INFO; under fairseq's INFO logging that
# buries the output in "No module named faiss.swigfaiss_avx512" lines.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

__version__ = "0.1.0"

_EXPORTS = {
    "Datastore": "datastore", "DatastoreWriter": "datastore",
    "Retriever": "retrieval", "load_index": "index",
    "knn_log_prob": "scoring", "interpolate": "scoring", "neighbor_scores": "scoring",
    "knn_full_log_probs": "scoring", "continuous_cache_log_prob": "scoring",
    "KNNLMError": "errors", "ConfigError": "errors", "CorruptError": "errors",
    "IncompleteError": "errors", "MismatchError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'knnlm' has no attribute {name!r}")
