"""Retrieval: the contract every strategy implements, the registry, and the strategies.

    base.py          Neighbors (the result type), Context (what a call knows), Retriever, Wrapper
    registry.py      register_strategy / register_wrapper, --knn-user-module, build(options) -> KNNLM
    faiss_search.py  FaissRetriever ("faiss"): FAISS search, k-factor re-ranking, exact recompute, GPU clone
    exact.py         ExactRetriever ("exact"): exact search by chunked matrix products on the queries' device
    retomaton.py     RetoMatonRetriever (wrapper): pointers to the next entries, a search only when too few survive
    adaptive.py      AdaptiveRetriever (wrapper): a predictor on the LM's features decides which tokens are searched
"""

from .base import Context, Neighbors, Retriever, Wrapper
from .factory import build, build_retriever
from .registry import register_strategy, register_wrapper
from .adaptive import AdaptiveRetriever, Predictor
from .exact import ExactRetriever
from .faiss_search import FaissRetriever
from .retomaton import RetoMatonRetriever

__all__ = ["AdaptiveRetriever", "Context", "ExactRetriever", "FaissRetriever", "Neighbors", "Predictor", "Retriever",
           "RetoMatonRetriever", "Wrapper", "build", "build_retriever", "register_strategy", "register_wrapper"]
