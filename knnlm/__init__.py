"""kNN-LM: nearest-neighbor language models (Khandelwal et al., ICLR 2020) for fairseq and beyond.

The core here needs no fairseq and no transformers: a datastore on disk (`knnlm.store`), FAISS
indexes over it (`knnlm.index`), retrieval strategies behind one contract (`knnlm.retrieval`),
the math on plain tensors (`knnlm.scoring`), the method as one object (`knnlm.KNNLM`), a dump
session (`knnlm.DumpSession`) and offline re-scoring (`knnlm.offline`). Front-ends capture
keys from a model and reach the core through those objects: `fairseq_plugins` (the fairseq
`--user-dir`); `knnlm.experiments` holds the demo and the analyses. docs/architecture.md
draws the layers.

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
    "KNNLM": "model", "Tally": "model", "DumpSession": "dump", "ModelIdentity": "provenance",
    "Datastore": "store", "DatastoreWriter": "store", "ShardedDatastore": "store", "open_datastore": "store",
    "Neighbors": "retrieval", "RetoMatonRetriever": "retrieval", "Context": "retrieval", "Retriever": "retrieval",
    "FaissRetriever": "retrieval", "ExactRetriever": "retrieval", "Wrapper": "retrieval",
    "register_strategy": "retrieval", "register_wrapper": "retrieval", "build": "retrieval",
    "RetrievalOptions": "options", "ExportOptions": "options", "CacheOptions": "options",
    "AdaptiveRetriever": "retrieval", "Predictor": "retrieval", "lm_features": "retrieval.adaptive",
    "load_index": "index",
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
