"""Per-token features of the LM's next-token distribution, for adaptive retrieval (He et al.,
EMNLP 2021, "Efficient Nearest Neighbor Language Models", section 4).

    feats = lm_features(log_probs)          # (N, V) log p_LM -> (N, F) float32
    feature_names()                         # the F names, in column order

Only what the LM alone gives at test time, before any retrieval: the entropy of p_LM (nats)
and its top-k log-probabilities, largest first (the paper's "lm_ent" and "lm_max", the latter
widened to the top k). The paper's n-gram frequency and fertility features are computed by
`knnlm.retrieval.adaptive.ngrams`; its context-vector feature (the query itself) is not used:
it does not help on held-out text here (benchmarks/adaptive_query.py). Front-ends (fairseq,
Hugging Face) hand this function the log-probs they already computed; it is the one
implementation of the math.
"""

import dataclasses
from typing import Optional

import torch

DEFAULT_TOP_K = 8
# Rows per chunk: entropy needs exp(log p), a temporary as large as the chunk; 256 rows of a
# 267k vocabulary (WikiText-103) is 270 MB of fp32, of the demo's vocabulary far less.
CHUNK_ROWS = 256


@dataclasses.dataclass
class TokenFeatures:
    """What adaptive retrieval reads of each token before searching: the LM's features (N, 1 +
    top_k) and, for n-gram features, the last tokens of its context (N, C) int64, -1 where the
    text has none (`knnlm.retrieval.adaptive.ngrams.context_tokens`)."""

    lm: torch.Tensor
    context: Optional[torch.Tensor] = None


def feature_names(top_k=DEFAULT_TOP_K):
    """Column names of `lm_features(..., top_k)`: entropy, then the top-k log-probabilities."""
    return ["entropy"] + [f"top{i}_log_prob" for i in range(1, top_k + 1)]


def lm_features(log_probs, top_k=DEFAULT_TOP_K, chunk_rows=CHUNK_ROWS, rows=None):
    """(..., V) log-probabilities of a normalized distribution -> (..., 1 + top_k) float32.

    Entropy -sum p log p in nats (a probability of 0, log p = -inf, adds 0); then the top_k
    largest log-probabilities, largest first (-inf where V < top_k or the tail is 0).
    Computed in fp32 whatever the input dtype, in chunks of rows so the temporary stays small.
    rows: (M,) indices into the flattened leading dimensions: the features of those rows only,
    (M, 1 + top_k) (a front-end's scored positions; nothing is computed for the others).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    lead, v = log_probs.shape[:-1], log_probs.shape[-1]
    flat = log_probs.reshape(-1, v)
    if rows is not None:
        rows, lead = rows.to(flat.device), (len(rows),)
    n = flat.shape[0] if rows is None else len(rows)
    out = torch.empty((n, 1 + top_k), dtype=torch.float32, device=flat.device)
    kk = min(top_k, v)
    for s in range(0, n, chunk_rows):
        lp = (flat[s:s + chunk_rows] if rows is None else flat[rows[s:s + chunk_rows]]).float()
        # p * log p with 0 * -inf taken as 0: the NaN it gives is dropped by nansum (in place, one
        # temporary: 2.8x faster than a where over a zero-filled copy, the same sums)
        out[s:s + chunk_rows, 0] = -lp.exp().mul_(lp).nansum(-1)
        out[s:s + chunk_rows, 1:1 + kk] = lp.topk(kk, dim=-1, sorted=True).values
    if kk < top_k:
        out[:, 1 + kk:] = float("-inf")
    return out.reshape(*lead, 1 + top_k)
