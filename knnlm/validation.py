"""The Python API's boundary checks (`KNNLM.score`, `KNNLM.next_token_log_probs`): what cannot be
what the method asks for is refused with a named error, before any search.

Each check is a few vectorised reductions over the batch (one `isfinite`/`max`/`logsumexp`),
no copy and no host synchronisation beyond the one that reads its verdict; an ordinary batch
passes through unchanged, so results stay bit-identical.
"""

import numbers

import torch

from .errors import ConfigError, InputError

# log-probabilities above this are impossible (not the float rounding of a probability of 1);
# the same bound the export applies to what it stores.
LP_MAX = 1e-4
# A full distribution's logsumexp must lie within this of 0: fp32 softmax over 267K words
# rounds far below it, raw logits are off by whole nats.
LOGSUMEXP_TOL = 1e-3


def check_k(k, name="k"):
    """k: an integer >= 1 (a float k, even 8.0, is refused: it would be silently truncated)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ConfigError(f"{name} must be an integer of at least 1, got {k!r} ({type(k).__name__})")
    return int(k)


def _tensor(x, name):
    if not torch.is_tensor(x):
        raise InputError(f"{name} must be a torch tensor, got {type(x).__name__}")
    return x


def check_log_probs(lp, name="lp_lm"):
    """Finite-or-minus-infinity values <= 0 (log-probabilities, not NLLs or logits)."""
    if not lp.is_floating_point():
        raise InputError(f"{name} must hold floating-point log-probabilities, got {lp.dtype}")
    if lp.numel() == 0:
        return
    bad = torch.isnan(lp) | (lp > LP_MAX)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        v = float(lp.reshape(-1)[i])
        raise InputError(
            f"{name}[{i}] = {v} is not a log-probability (they are <= 0, finite or -inf): "
            f"{'NaN' if v != v else 'a positive value'}; pass log p, not a negative log-likelihood or logits")


def check_score_inputs(queries, targets, lp_lm, vocab_size=None):
    """KNNLM.score's (N, D) queries, (N,) integer targets in [0, vocab_size), (N,) log p_LM(target)."""
    _tensor(queries, "queries"), _tensor(targets, "targets"), _tensor(lp_lm, "lp_lm")
    if queries.ndim != 2:
        raise InputError(f"queries must be (N, D), got shape {tuple(queries.shape)}")
    n = queries.shape[0]
    if targets.shape != (n,) or lp_lm.shape != (n,):
        raise InputError(f"lengths do not match: queries {tuple(queries.shape)}, targets {tuple(targets.shape)}, "
                         f"lp_lm {tuple(lp_lm.shape)}; expected (N, D), (N,), (N,)")
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise InputError(f"targets must be integer token ids, got {targets.dtype}")
    if n and vocab_size is not None:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab_size:
            raise InputError(f"targets must lie in [0, {vocab_size}) (the datastore's vocabulary), got "
                             f"{lo if lo < 0 else hi}")
    check_log_probs(lp_lm)


def check_distribution(queries, lm_log_probs, vocab_size=None, tol=LOGSUMEXP_TOL):
    """next_token_log_probs' (N, D) queries and (N, V) log p_LM: each row a normalised distribution."""
    _tensor(queries, "queries"), _tensor(lm_log_probs, "lm_log_probs")
    if queries.ndim != 2 or lm_log_probs.ndim != 2 or lm_log_probs.shape[0] != queries.shape[0]:
        raise InputError(f"queries {tuple(queries.shape)} and lm_log_probs {tuple(lm_log_probs.shape)} must be "
                         f"(N, D) and (N, V) with the same N")
    if vocab_size is not None and lm_log_probs.shape[1] < vocab_size:
        raise InputError(f"lm_log_probs has {lm_log_probs.shape[1]} columns, fewer than the datastore's "
                         f"vocabulary of {vocab_size}")
    if lm_log_probs.numel() == 0:
        return
    if not lm_log_probs.is_floating_point():
        raise InputError(f"lm_log_probs must hold floating-point log-probabilities, got {lm_log_probs.dtype}")
    # One max per row finds NaN (it propagates) and positive values; the element is located
    # only on failure. Then one logsumexp per row: the distribution sums to 1.
    top = lm_log_probs.amax(dim=-1)
    if bool((torch.isnan(top) | (top > LP_MAX)).any()):
        check_log_probs(lm_log_probs, "lm_log_probs")
    norm = torch.logsumexp(lm_log_probs, dim=-1)
    off = (norm.abs() > tol) | torch.isnan(norm)
    if bool(off.any()):
        i = int(off.nonzero()[0])
        raise InputError(
            f"lm_log_probs row {i} is not a normalised distribution: its logsumexp is {float(norm[i]):.4g}, "
            f"not 0 (within {tol:g}); pass log_softmax(logits), not raw logits")


def vocab_of(retriever):
    """The vocabulary size recorded by the retriever's datastore (None if it records none)."""
    meta = getattr(getattr(retriever, "datastore", None), "meta", None)
    v = meta.get("dict_size") if isinstance(meta, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
