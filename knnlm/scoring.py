"""The kNN-LM math, on plain tensors (no fairseq): the one place it lives.

    p_kNN(y | x) = sum_{j : v_j = y} softmax_j(s_j),   s_j = -d_j / T   (L2)   or   q.k_j / T   (dot)
    p(y | x)     = lambda * p_kNN(y | x) + (1 - lambda) * p_LM(y | x)

everything in log space, in fp32 whatever the model's dtype, and only for the target:
no vocabulary-sized tensor per token.
"""

import math

import torch

from .errors import ConfigError

SIM_FUNCS = ("l2", "do_not_recomp_l2", "dot")


def check_lambda(lmbda, name="--lmbda"):
    if not 0.0 <= lmbda <= 1.0:
        raise ConfigError(f"{name} must lie in [0, 1], got {lmbda}")


def check_temperature(temperature, name="--knn-temp"):
    if not temperature > 0 or not math.isfinite(temperature):
        raise ConfigError(f"{name} must be a positive finite number, got {temperature}")


def neighbor_scores(distances, sim_func="l2", temperature=1.0):
    """Logits of the neighbor softmax: -distance / T for L2, similarity / T for dot.

    Missing neighbors (FAISS returns id -1 with distance +/-inf or the float max) must be
    masked by the caller with `valid`; here only the sign convention lives.
    """
    check_temperature(temperature)
    d = distances.float()
    return (d if sim_func == "dot" else -d) / temperature


# Rows scored together by knn_log_prob: its (rows, k) temporaries stay ~4 MB each at k = 1024
# (cache-sized, and a batch of thousands of tokens never holds several full (N, k) copies).
KNN_ROWS_PER_BLOCK = 1024


def knn_log_prob(scores, neighbor_vals, targets, valid=None):
    """log p_kNN(target) for each query: (N, k) scores, (N, k) values, (N,) targets -> (N,).

    -inf where no neighbor carries the target (or no neighbor was found at all).
    """
    n = scores.shape[0]
    if n <= KNN_ROWS_PER_BLOCK:
        return _knn_log_prob_block(scores, neighbor_vals, targets, valid)
    out = torch.empty(n, dtype=torch.float32, device=scores.device)
    for s in range(0, n, KNN_ROWS_PER_BLOCK):
        e = s + KNN_ROWS_PER_BLOCK
        out[s:e] = _knn_log_prob_block(scores[s:e], neighbor_vals[s:e], targets[s:e],
                                       None if valid is None else valid[s:e])
    return out


def _knn_log_prob_block(scores, neighbor_vals, targets, valid):
    scores = scores.float()
    match = neighbor_vals == targets.unsqueeze(-1)
    if valid is not None and not bool(valid.all()):
        match &= valid
        scores = scores.masked_fill(~valid, float("-inf"))
    # Shift by the row maximum first: squared distances in the thousands would otherwise be
    # added back and subtracted again in fp32, losing ~1e-4 of log-probability.
    top = scores.max(dim=-1, keepdim=True).values
    shifted = scores - torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # our own buffer
    log_norm = torch.logsumexp(shifted, dim=-1)
    # Rows with no valid neighbor have log_norm = -inf; keep them at -inf, not NaN.
    log_norm = torch.where(torch.isfinite(log_norm), log_norm, torch.zeros_like(log_norm))
    matched = shifted.masked_fill_(match.logical_not_(), float("-inf"))
    return torch.logsumexp(matched, dim=-1) - log_norm


def interpolate(lp_lm, lp_knn, lmbda):
    """log(lambda p_kNN + (1 - lambda) p_LM), exact at lambda = 0 and lambda = 1."""
    check_lambda(lmbda)
    lp_lm = lp_lm.float()
    lp_knn = lp_knn.float()
    if lmbda == 0.0:
        return lp_lm.clone()
    if lmbda == 1.0:
        return lp_knn.clone()
    return torch.logaddexp(lp_knn + math.log(lmbda), lp_lm + math.log1p(-lmbda))


def interpolate_per_token(lp_lm, lp_knn, lmbda):
    """log(lambda_i p_kNN + (1 - lambda_i) p_LM) with (N,) lambdas in [0, 1] (--adaptive-lambda);
    exact where a lambda is 0 or 1 (log 0 = -inf drops that side of the sum)."""
    lam = lmbda.to(lp_lm.device, torch.float32)
    return torch.logaddexp(lp_knn.float() + lam.log(), lp_lm.float() + torch.log1p(-lam))


def knn_full_log_probs(lm_lprobs, scores, neighbor_vals, lmbda, valid=None):
    """The whole interpolated next-token distribution, (N, V), for generation.

    Only generation needs every word's probability; scoring uses `knn_log_prob`. lmbda: one
    number, or (N,) per-token lambdas (--adaptive-lambda).
    """
    if torch.is_tensor(lmbda):
        lmbda = lmbda.to(lm_lprobs.device, torch.float32).unsqueeze(-1)
    else:
        check_lambda(lmbda)
    scores = scores.float()
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    p_knn = torch.zeros(lm_lprobs.shape, dtype=torch.float32, device=lm_lprobs.device)
    p_knn.scatter_add_(-1, neighbor_vals.long(), weights)
    p = lmbda * p_knn + (1.0 - lmbda) * lm_lprobs.float().exp()
    return p.log()


def continuous_cache_log_prob(keys, targets, scored, theta, cache_size=None, memory=None, memory_targets=None):
    """Grave et al. (2017) cache: log p_cache(target_t) from earlier positions of the same row.

    keys (B, T, D): the state at each position; targets (B, T): the token that followed it;
    scored (B, T) bool: positions to score; memory (B, T) bool: positions that may be
    remembered (default: all, pass non-padding); memory_targets (B, T): the token that followed
    each remembered position (default: `targets`; differs where a position is remembered but not
    scored, e.g. the context window). Position t's cache holds positions j < t (the last
    `cache_size` of them), weighted by exp(theta * <h_t, h_j>). Returns (B, T); -inf where the
    target never followed an earlier position (and at t = 0).
    """
    return continuous_cache_log_probs(keys, targets, scored, (theta,), cache_size, memory, memory_targets)[0]


def continuous_cache_log_probs(keys, targets, scored, thetas, cache_size=None, memory=None, memory_targets=None):
    """`continuous_cache_log_prob` at each theta of `thetas`, the dot products computed once:
    a list of (B, T) tensors, one per theta (a grid search over theta costs one bmm)."""
    keys = keys.float()
    B, T, _ = keys.shape
    dots = torch.bmm(keys, keys.transpose(1, 2))  # (B, T, T): query t, memory j
    pos = torch.arange(T, device=keys.device)
    allowed = pos.unsqueeze(0) < pos.unsqueeze(1)  # j < t
    if cache_size is not None:
        allowed &= pos.unsqueeze(0) >= pos.unsqueeze(1) - cache_size
    allowed = allowed.unsqueeze(0).expand(B, T, T)
    if memory is not None:
        allowed = allowed & memory.unsqueeze(1)
    mem = targets if memory_targets is None else memory_targets
    match = allowed & (mem.unsqueeze(1) == targets.unsqueeze(2))  # value at j equals target at t
    out = []
    for theta in thetas:
        sims = (theta * dots).masked_fill_(~allowed, float("-inf"))
        log_norm = torch.logsumexp(sims, dim=-1)
        log_match = torch.logsumexp(sims.masked_fill_(~match, float("-inf")), dim=-1)
        lp = log_match - torch.where(torch.isfinite(log_norm), log_norm, torch.zeros_like(log_norm))
        out.append(lp.masked_fill(~scored, float("-inf")))
    return out
