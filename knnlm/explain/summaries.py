"""The math of the explorer's summaries, on per-token arrays (numpy, float64 sums).

gain = log p_kNN-LM(target) - log p_LM(target), in nats: > 0 where retrieval helped. The sum of
the gains over the text is the change of its log-likelihood, so N * log(ppl_LM / ppl_kNN-LM).
"""

import math

import numpy as np
import torch

from ..retrieval.adaptive.ngrams import NgramStats
from ..scoring import interpolate, neighbor_scores

# Longest context n-gram looked up verbatim in the datastore's text (the lengths are
# capped here: "MAX_NGRAM" reads "at least MAX_NGRAM").
MAX_NGRAM = 8


def final_log_probs(lp_lm, lp_knn, lmbda, searched=None):
    """log p_kNN-LM(target): knnlm.scoring's interpolation; p_LM alone where not searched."""
    final = interpolate(torch.as_tensor(np.asarray(lp_lm, np.float32)),
                        torch.as_tensor(np.asarray(lp_knn, np.float32)), float(lmbda)).numpy().astype(np.float64)
    if searched is not None:
        final = np.where(searched, final, np.asarray(lp_lm, np.float64))
    return final


def gains(lp_lm, lp_final):
    return np.asarray(lp_final, np.float64) - np.asarray(lp_lm, np.float64)


def frequency_buckets(counts):
    """Counts -> (bucket index per token, labels): 0, 1-9, 10-99, ... (powers of ten)."""
    counts = np.asarray(counts, np.int64)
    top = int(counts.max(initial=0))
    decades = max(1, len(str(top))) if top > 0 else 1
    labels = ["0"] + [f"{10**d:,}-{10**(d + 1) - 1:,}" if d else "1-9" for d in range(decades)]
    idx = np.where(counts > 0, np.floor(np.log10(np.maximum(counts, 1))).astype(np.int64) + 1, 0)
    return idx, labels


def match_buckets(lengths, max_n=MAX_NGRAM):
    """Longest-match lengths 0..max_n -> (bucket index = the length, labels; the last 'max_n+')."""
    labels = [str(n) for n in range(max_n)] + [f"{max_n}+"]
    return np.minimum(np.asarray(lengths, np.int64), max_n), labels


def group_table(gain, lp_lm, lp_final, groups, labels):
    """One row per group: tokens, share of tokens, mean and total gain (nats), share of the
    text's total gain, and the group's perplexity under the LM and the kNN-LM."""
    gain = np.asarray(gain, np.float64)
    total = float(gain.sum())
    n = len(gain)
    rows = []
    for g, label in enumerate(labels):
        sel = np.asarray(groups) == g
        c = int(sel.sum())
        s = float(gain[sel].sum())
        rows.append({
            "group": label, "tokens": c, "token_share": c / n if n else 0.0,
            "mean_gain": s / c if c else float("nan"), "total_gain": s,
            "gain_share": s / total if total else float("nan"),
            "ppl_lm": math.exp(-float(np.mean(lp_lm[sel], dtype=np.float64))) if c else float("nan"),
            "ppl_knnlm": math.exp(-float(np.mean(lp_final[sel], dtype=np.float64))) if c else float("nan"),
        })
    return rows


def helps_hurts(gain):
    """Where interpolation helps (gain > 0), hurts (< 0) or changes nothing (= 0): per group its
    tokens, share of tokens, total gain (nats) and share of the text's total |change| (the sum
    of |gain|: the helped and hurt shares add up to 1)."""
    gain = np.asarray(gain, np.float64)
    n, absolute = len(gain), float(np.abs(gain).sum())
    rows = []
    for label, sel in (("helps", gain > 0), ("hurts", gain < 0), ("no change", gain == 0)):
        c, s = int(sel.sum()), float(gain[sel].sum())
        rows.append({"group": label, "tokens": c, "token_share": c / n if n else 0.0, "total_gain": s,
                     "abs_share": abs(s) / absolute if absolute else 0.0})
    return rows


def top_tokens(gain, n):
    """(the n largest gains, largest first; the n largest losses, largest first) as indices."""
    gain = np.asarray(gain, np.float64)
    order = np.argsort(-gain, kind="stable")
    best = [int(i) for i in order[:n] if gain[i] > 0]
    worst = [int(i) for i in np.argsort(gain, kind="stable")[:n] if gain[i] < 0]
    return best, worst


def text_contexts(tokens, max_n):
    """(N,) token stream -> (N, max_n) the max_n tokens before each, oldest first, -1 before the start."""
    tokens = np.asarray(tokens, np.int64)
    padded = np.concatenate([np.full(max_n, -1, np.int64), tokens])
    return np.lib.stride_tricks.sliding_window_view(padded, max_n)[:len(tokens)]


def longest_matches(text_values, contexts, max_n=MAX_NGRAM, progress=None):
    """For each context row (N, >= max_n): the largest n <= max_n whose last-n tokens occur in
    the datastore's text as the context of an entry (knnlm.retrieval.adaptive.ngrams' hashing), 0 if not even the
    last token does. A suffix of a found n-gram is found too, so the lengths are exact up to max_n."""
    stats = NgramStats.build(text_values, orders=range(1, max_n + 1), max_order=max_n, progress=progress)
    out = np.zeros(len(contexts), np.int64)
    for n in range(1, max_n + 1):
        count, _ = stats.lookup(n, contexts)
        out = np.where(count > 0, n, out)
    return out


def knn_ranks(dists, vals, targets, sim_func, temperature, weights=None):
    """Rank of each target in p_kNN over the kept neighbors (values summed), 1 = most probable;
    0 where no kept neighbor carries it. Ties share the better rank. Missing neighbors: NaN distance."""
    d = np.asarray(dists, np.float64)
    valid = ~np.isnan(d)
    s = neighbor_scores(torch.as_tensor(np.nan_to_num(d)), sim_func, temperature).double().numpy()
    s = np.where(valid, s, -np.inf)
    top = np.max(s, axis=1, keepdims=True, initial=-np.inf)
    p = np.where(valid, np.exp(s - np.where(np.isfinite(top), top, 0.0)), 0.0)
    if weights is not None:
        p = p * np.asarray(weights, np.float64)
    vals = np.asarray(vals, np.int64)
    ranks = np.zeros(len(d), np.int64)
    for i in range(len(d)):
        v, pi = vals[i][valid[i]], p[i][valid[i]]
        if not (v == targets[i]).any():
            continue
        uniq, inv = np.unique(v, return_inverse=True)
        mass = np.bincount(inv, weights=pi, minlength=len(uniq))
        mine = mass[np.searchsorted(uniq, targets[i])]
        ranks[i] = 1 + int((mass > mine * (1 + 1e-12)).sum())
    return ranks


def lm_ranks(features, feature_names, lp_lm, tol=1e-4):
    """Rank of each target under p_LM from the export's top-k log-probabilities (features.npy):
    1 + how many are larger; -1 where it is below all k (rank > k); 0 without features."""
    lp_lm = np.asarray(lp_lm, np.float64)
    if features is None or not feature_names:
        return np.zeros(len(lp_lm), np.int64)
    cols = [j for j, name in enumerate(feature_names) if name.startswith("top") and name.endswith("_log_prob")]
    if not cols:
        return np.zeros(len(lp_lm), np.int64)
    top = np.asarray(features[:, cols], np.float64)
    rank = 1 + (top > lp_lm[:, None] + tol).sum(axis=1)
    return np.where(lp_lm >= top[:, -1] - tol, rank, -1).astype(np.int64)
