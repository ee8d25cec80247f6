"""Memorisation caught by content: is the text being scored the text the datastore was dumped from?

A datastore's values, in order, are the text it was dumped from (each value is the next token).
While dumping, `TokenSketch` keeps a bottom-k MinHash of that stream's distinct n-grams (the
K smallest 64-bit hashes of its NGRAM-token windows: streaming, a few KB of metadata,
whatever the datastore's size). Before scoring, a front-end hands the token stream it is
about to score to `check_memorisation`, which sketches it the same way and estimates

* resemblance: |A ∩ B| / |A ∪ B| of the two n-gram sets (Broder's bottom-k estimator: of the
  K smallest hashes of A ∪ B, the share present in both; standard error below 0.012 at K = 2048);
* containment: the share of the scored text's n-grams found in the datastore's text (from the
  scored hashes below the datastore sketch's largest, where that sketch holds all of A's).

A resemblance of RESEMBLANCE_LIMIT (0.5) or more means the datastore is mostly of the very
tokens scored: the perplexity would measure memorisation, so it is refused
(MemorisationError) unless allowed (`--knn-allow-same-split`). A datastore that merely also
contains the scored text among much more (containment high, resemblance low: a test set
whose sentences recur in the training corpus) is only warned about. A datastore dumped before
sketches existed keeps working; the check says it could not be done.
"""

import logging

import numpy as np

from .errors import MemorisationError

logger = logging.getLogger(__name__)

ALGO = "bottomk-minhash-v1"
NGRAM = 8          # tokens per n-gram: long enough that two different texts rarely share one
K = 2048           # hashes kept: the estimate's standard error is below sqrt(0.25 / K)
RESEMBLANCE_LIMIT = 0.5
CONTAINMENT_WARN = 0.5
_MULT = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def ngram_hashes(tokens, n=NGRAM):
    """The 64-bit hash of every window of n consecutive tokens (splitmix64-finalized
    multiply-add, so the hashes are spread uniformly): (len - n + 1,) uint64."""
    t = np.asarray(tokens).reshape(-1).astype(np.int64)
    if len(t) < n:
        return np.zeros(0, dtype=np.uint64)
    w = np.lib.stride_tricks.sliding_window_view(t, n)
    h = np.zeros(len(w), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULT + (w[:, j].astype(np.uint64) + np.uint64(1))
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h


class TokenSketch:
    """The bottom-K hashes of a token stream's distinct n-grams, fed in pieces, in order."""

    def __init__(self, n=NGRAM, k=K):
        self.n, self.k = n, k
        self.hashes = np.zeros(0, dtype=np.uint64)
        self.tokens = 0
        self._tail = np.zeros(0, dtype=np.int64)  # the last n - 1 tokens: windows across pieces

    def add(self, tokens):
        t = np.asarray(tokens).reshape(-1).astype(np.int64)
        if not len(t):
            return
        self.tokens += len(t)
        stream = np.concatenate([self._tail, t])
        self._tail = stream[-(self.n - 1):] if self.n > 1 else stream[:0]
        h = ngram_hashes(stream, self.n)
        if len(self.hashes) >= self.k:
            h = h[h < self.hashes[-1]]  # only smaller hashes can enter a full sketch
        if len(h):
            self.hashes = np.unique(np.concatenate([self.hashes, h]))[:self.k]

    def record(self):
        """What the datastore's metadata keeps (`token_sketch`)."""
        return {"algo": ALGO, "ngram": self.n, "k": self.k, "tokens": int(self.tokens),
                "hashes": [int(x) for x in self.hashes]}

    @classmethod
    def of(cls, tokens, n=NGRAM, k=K):
        s = cls(n, k)
        s.add(tokens)
        return s


def _hashes(record):
    """The sorted uint64 hashes of a recorded sketch, or None if the record is not one."""
    if not isinstance(record, dict) or record.get("algo") != ALGO or not isinstance(record.get("hashes"), list):
        return None
    n, k = record.get("ngram"), record.get("k")
    if not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= 1 << 20 for x in (n, k)):
        return None  # damaged: treated as no record (the check says it could not be done)
    try:
        return np.unique(np.asarray(record["hashes"], dtype=np.uint64))
    except (TypeError, ValueError, OverflowError):
        return None


def datastore_sketch(datastore):
    """The datastore's recorded sketch {ngram, k, hashes}, merged over shards; None when any
    part was dumped before sketches were recorded."""
    parts = [s.meta for s in datastore.shards] if hasattr(datastore, "shards") else [datastore.meta]
    hashes, n, k = [], None, None
    for meta in parts:
        record = meta.get("token_sketch") if isinstance(meta, dict) else None
        h = _hashes(record)
        if h is None or (n is not None and (record["ngram"], record["k"]) != (n, k)):
            return None
        n, k = record["ngram"], record["k"]
        hashes.append(h)
    if not hashes:
        return None
    # bottom-k of a union = bottom-k of the union of the parts' bottom-k sketches
    return {"ngram": n, "k": k, "hashes": np.unique(np.concatenate(hashes))[:k]}


def estimate(ds_hashes, k, tokens, n=NGRAM):
    """{resemblance, containment, sample}: the overlap of the scored `tokens` with the stream a
    sketch of `k` hashes (`ds_hashes`, sorted) was taken of."""
    a = np.asarray(ds_hashes, dtype=np.uint64)
    b_all = np.unique(ngram_hashes(tokens, n))
    b = b_all[:k]
    union = np.unique(np.concatenate([a, b]))[:k]
    both = np.isin(union, a, assume_unique=True) & np.isin(union, b, assume_unique=True)
    resemblance = float(both.mean()) if len(union) else 0.0
    # Containment: the scored n-grams in the range the datastore's sketch covers completely.
    limit = a[-1] if len(a) >= k else np.uint64(np.iinfo(np.uint64).max)
    sample = b_all[b_all <= limit]
    containment = float(np.isin(sample, a, assume_unique=True).mean()) if len(sample) else None
    return {"resemblance": resemblance, "containment": containment, "sample": int(len(sample)),
            "union": int(len(union))}


def check_memorisation(datastore, tokens, *, allow=False, flag="--knn-allow-same-split", what="the text scored"):
    """Refuse (MemorisationError) to score `tokens` with a datastore dumped from (mostly) the
    same text, unless `allow`. Returns the estimate, or None when the datastore records no
    sketch (dumped before this version: the check could not be done, and says so)."""
    sketch = datastore_sketch(datastore)
    if sketch is None:
        logger.warning("datastore %s records no fingerprint of the text it was dumped from (dumped before "
                       "this version): whether %s is that text could not be checked", datastore.prefix, what)
        return None
    est = estimate(sketch["hashes"], sketch["k"], tokens, sketch["ngram"])
    share = f"{100 * est['resemblance']:.0f}%"
    if est["resemblance"] >= RESEMBLANCE_LIMIT and est["union"] > 0:
        if allow:
            logger.warning("%s is the text datastore %s was dumped from (about %s of their %d-grams shared); "
                           "scored anyway (%s)", what, datastore.prefix, share, sketch["ngram"], flag)
            return est
        raise MemorisationError(
            f"{what} is the text datastore {datastore.prefix} was dumped from (about {share} of their "
            f"{sketch['ngram']}-token n-grams are shared, at or above the {100 * RESEMBLANCE_LIMIT:.0f}% limit): "
            f"every target is in the datastore, so the perplexity would measure memorisation, not the "
            f"kNN-LM. Score other text, or pass {flag} if that is the experiment")
    if est["containment"] is not None and est["containment"] >= CONTAINMENT_WARN and est["sample"] >= 32:
        logger.warning("%.0f%% of the %d-grams of %s also occur in the text of datastore %s: those tokens "
                       "are partly memorised", 100 * est["containment"], sketch["ngram"], what, datastore.prefix)
    return est
