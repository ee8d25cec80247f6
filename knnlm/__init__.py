"""kNN-LM: nearest-neighbor language models (Khandelwal et al., ICLR 2020) for fairseq and beyond.

The core here needs no fairseq: a datastore on disk, a FAISS index over it, retrieval, and
the scoring math on plain tensors. The fairseq task and `KNNSequenceScorer` live in
`fairseq_plugins` (the `--user-dir`).
"""

import logging

# faiss logs every instruction-set build it tries at INFO; under fairseq's INFO logging that
# buries the output in "No module named faiss.swigfaiss_avx512" lines.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

from .datastore import Datastore, DatastoreWriter  # noqa: E402
from .errors import ConfigError, CorruptError, IncompleteError, KNNLMError, MismatchError
from .index import load_index
from .retrieval import Retriever
from .scoring import (
    continuous_cache_log_prob,
    interpolate,
    knn_full_log_probs,
    knn_log_prob,
    neighbor_scores,
)

__version__ = "0.1.0"

__all__ = [
    "Datastore", "DatastoreWriter", "Retriever", "load_index",
    "knn_log_prob", "interpolate", "neighbor_scores", "knn_full_log_probs",
    "continuous_cache_log_prob",
    "KNNLMError", "ConfigError", "CorruptError", "IncompleteError", "MismatchError",
]
