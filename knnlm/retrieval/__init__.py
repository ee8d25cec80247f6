"""Retrieval: the contract every strategy implements, and the strategies.

    base.py          Neighbors (the result type) and Retriever (the contract)
    faiss_search.py  FaissRetriever: FAISS search, k-factor re-ranking, exact recompute, GPU clone
    retomaton.py     RetoMatonRetriever: pointers to the next entries, a search only when too few survive
    exact.py         ExactRetriever: exact search by chunked matrix products on the queries' device
    adaptive.py      AdaptiveRetriever: a predictor on the LM's features decides which tokens are searched
"""

from .adaptive import AdaptiveRetriever, Predictor
from .base import Neighbors, Retriever
from .exact import ExactRetriever
from .faiss_search import FaissRetriever
from .retomaton import RetoMatonRetriever, Streams

__all__ = ["AdaptiveRetriever", "ExactRetriever", "FaissRetriever", "Neighbors", "Predictor", "Retriever", "RetoMatonRetriever",
           "Streams"]
