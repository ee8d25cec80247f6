"""Adaptive retrieval (He et al., EMNLP 2021, "Efficient Nearest Neighbor Language Models" §4),
in one package: a predictor decides from each token's features whether a search is worth it.

    features.py  the LM's own features of each token (entropy, top log-probabilities)
    ngrams.py    the paper's n-gram features of each token's context in the datastore's text
    retriever.py Predictor (the MLP, a self-describing JSON file) and AdaptiveRetriever (the wrapper)
    train.py     knnlm-adaptive train / curve: the predictor trained on an export, its skip curve
"""

from .features import DEFAULT_TOP_K, TokenFeatures, feature_names, lm_features
from .ngrams import MAX_ORDER, NgramStats, context_tokens
from .retriever import AdaptiveRetriever, Predictor

__all__ = ["AdaptiveRetriever", "DEFAULT_TOP_K", "MAX_ORDER", "NgramStats", "Predictor", "TokenFeatures",
           "context_tokens", "feature_names", "lm_features"]
