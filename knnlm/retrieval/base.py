"""The retrieval contract: what every retrieval strategy takes and returns.

A strategy (FAISS search, exact search, RetoMaton pointers, adaptive skipping, ...) is one
subclass of `Retriever` implementing `retrieve`. Callers (`knnlm.KNNLM`, and through it every
front-end) never look past this contract, so a new strategy is one new file.

    neighbors = retriever.retrieve(queries, context)     # (N, D) queries -> Neighbors

`context` is one `Context` per call, filled by the front-end: where the streams of text
break, the token that really follows each query, the LM's own features, the last context
tokens. A strategy declares in `needs` which of those it reads; a front-end computes only
those, and `KNNLM` refuses a call that lacks one (nothing is silently searched instead).
Strategies are registered by name (`knnlm.retrieval.registry`) and built from
`RetrievalOptions`, so a new one is one file.
"""

import dataclasses
import math
from typing import List, Optional

import torch

from ..errors import ConfigError
from ..scoring import SIM_FUNCS


@dataclasses.dataclass
class Neighbors:
    """The k neighbors of N queries, as tensors on the queries' device.

    distances (N, k) float32: what the scores are computed from (exact squared L2 or inner
        products when recomputed, else the index's own distances);
    values (N, k) int64: the datastore's next tokens;
    valid (N, k) bool: False where fewer than k neighbors were found;
    ids (N, k) int64: datastore rows, -1 where missing (None if the strategy has no rows);
    weights (N, k) float32 or None: per-neighbor multiplicities (a pruned datastore's merged
        entries count w times in the softmax); None means 1 each;
    retrieved (N,) bool or None: False for tokens the strategy gave no neighbors (they get
        p_LM alone); None means every token has neighbors;
    searched (N,) bool or None: which tokens cost an index search (RetoMaton's pointer-fed
        tokens have neighbors without one); None means the same as `retrieved`;
    lmbda (N,) float32 or None: each token's own weight of p_kNN (adaptive retrieval's predicted
        lambda, --adaptive-lambda); None means the KNNLM's constant lambda;
    rows (M,) int64 or None: set when the strategy gave neighbors to only some of the N tokens
        (adaptive retrieval's skipped tokens have none): the (·, k) tensors then hold M rows, row j
        those of token rows[j], and `retrieved` (N,) is True exactly there. Scoring touches only
        those rows (nothing is allocated or computed for a skipped token); `dense()` gives the one
        row per token layout (an export's). None: one row per token.
    extra: Neighbors or None: with `rows`, a second compact block (with `rows` of its own) holding
        other tokens, in tensors of their own width: RetoMaton's pointer-fed tokens carry a few
        candidates each, so they are not padded out to k columns. `retrieved` is then True exactly
        at `rows` and `extra.rows`; `blocks()` walks both.
    """

    distances: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    ids: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    retrieved: Optional[torch.Tensor] = None
    searched: Optional[torch.Tensor] = None
    lmbda: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    extra: Optional["Neighbors"] = None

    def __len__(self):
        """The number of tokens (queries), whichever the layout."""
        return self.distances.shape[0] if self.rows is None else self.retrieved.shape[0]

    @property
    def compact(self):
        """Whether the (·, k) tensors hold only the retrieved tokens' rows (see `rows`)."""
        return self.rows is not None

    def blocks(self):
        """(rows, neighbors) per block of rows: (None, self) when dense; else the compact block and,
        if any, the `extra` one (each without `extra`), `rows` saying whose rows they hold."""
        if self.rows is None:
            return [(None, self)]
        main = dataclasses.replace(self, extra=None)
        return [(self.rows, main)] + ([(self.extra.rows, self.extra)] if self.extra is not None else [])

    def dense(self):
        """One row per token: skipped tokens' rows empty (valid False, id -1, distance 0, value 0,
        weight 1), as an export records them; `retrieved` None when every token has neighbors.
        Already dense: self."""
        if self.rows is None:
            return self
        parts = [nb for _, nb in self.blocks()]
        n, device = len(self), self.distances.device
        width = max(nb.distances.shape[1] for nb in parts)

        def spread(field, fill):
            if any(getattr(nb, field) is None for nb in parts):
                if all(getattr(nb, field) is None for nb in parts):
                    return None
                raise ValueError(f"Neighbors blocks disagree on whether they have {field}")
            out = torch.full((n, width), fill, dtype=getattr(self, field).dtype, device=device)
            for at, nb in self.blocks():
                t = getattr(nb, field)
                out[at.to(device), :t.shape[1]] = t
            return out

        retrieved = None if bool(self.retrieved.all()) else self.retrieved
        return Neighbors(spread("distances", 0.0), spread("values", 0), spread("valid", False), spread("ids", -1),
                         spread("weights", 1.0), retrieved, self.searched, self.lmbda)

    def __getitem__(self, rows):
        """The neighbors of a subset of the queries (a mask or an index tensor), one row per token."""
        if self.rows is not None:
            return self.dense()[rows]
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Neighbors(self.distances[rows], self.values[rows], self.valid[rows], pick(self.ids),
                         pick(self.weights), pick(self.retrieved), pick(self.searched), pick(self.lmbda))

    def searched_mask(self):
        """(N,) bool: the tokens that cost a search."""
        for mask in (self.searched, self.retrieved):
            if mask is not None:
                return mask
        return torch.ones(len(self), dtype=torch.bool, device=self.distances.device)

    def as_tuple(self, return_ids=False):
        """(distances, values, valid[, ids]): what `Retriever.__call__` returned before the contract."""
        n = self.dense()
        out = (n.distances, n.values, n.valid)
        return out + (n.ids,) if return_ids else out


# What a strategy may ask of the front-end, per call (`Retriever.needs`):
#   "streams"        Context.lengths: the queries are consecutive runs of text (RetoMaton's pointers)
#   "targets"        Context.targets: the token that really follows each query (teacher-forced scoring)
#   "lm_features"    Context.lm_features: the LM's (N, 1 + top_k) features (knnlm.retrieval.adaptive.features.lm_features)
#   "context_tokens" Context.context_tokens: each query's last context tokens (knnlm.retrieval.adaptive.ngrams.context_tokens)
NEEDS = ("streams", "targets", "lm_features", "context_tokens")


@dataclasses.dataclass
class Context:
    """What a front-end knows about the N queries of one call, beyond the queries.

    lengths: the queries are `len(lengths)` streams of consecutive text, one after the other
        (sum(lengths) == N); fairseq: the rows of an eval batch, knnlm-hf: its windows;
    targets (N,) int64: the token that really follows each query (`KNNLM.score` fills it);
    lm_features (N, 1 + top_k) float32: the LM's entropy and top log-probabilities;
    context_tokens (N, C) int64: the last tokens each prediction read, -1 where none.
    """

    lengths: Optional[List[int]] = None
    targets: Optional[torch.Tensor] = None
    lm_features: Optional[torch.Tensor] = None
    context_tokens: Optional[torch.Tensor] = None
    # (the call's whole context, these rows' indices in it), set by `rows`: a strategy asked about
    # a few rows at a time (under RetoMaton) may compute what it needs for the whole call once.
    origin: Optional[tuple] = dataclasses.field(default=None, repr=False, compare=False)

    def provided(self):
        """The `NEEDS` names this context holds."""
        have = {"streams": self.lengths, "targets": self.targets, "lm_features": self.lm_features,
                "context_tokens": self.context_tokens}
        return {name for name, value in have.items() if value is not None}

    def rows(self, index):
        """The context of a subset of the queries (an index tensor; streams are not kept)."""
        pick = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        root, at = self.origin if self.origin is not None else (self, None)
        return Context(None, pick(self.targets), pick(self.lm_features), pick(self.context_tokens),
                       origin=(root, index.cpu() if at is None else at[index.cpu()]))


class Retriever:
    """Base class of retrieval strategies. Subclasses set `datastore`, `k`, `sim_func` and
    implement `retrieve`; the rest has defaults.

    needs: the `Context` fields the strategy reads (see NEEDS); lm_feature_top_k: how many
    top log-probabilities its LM features hold, where it needs them.

    sim_func is stored here once: "l2" (exact squared L2), "do_not_recomp_l2" (the index's
    quantized L2 distances) or "dot" (inner products). Everything that turns distances into
    scores asks the retriever which it is.
    """

    datastore = None
    k = None
    sim_func = "l2"
    needs = frozenset()
    lm_feature_top_k = None
    search_name = None  # a name for the summary line's settings (', exact'); FAISS has none
    per_token_lambda = False  # whether Neighbors.lmbda replaces the constant lambda (--adaptive-lambda)
    # What an export records of the tokens this strategy does not search (knnlm.offline.export):
    # None (every token is searched), "lm_only" (they get p_LM alone), "pointers" (scored against
    # other entries, RetoMaton's pointers).
    unsearched = None

    @classmethod
    def validate_options(cls, opts):
        """Refuse options this strategy cannot serve, before anything is loaded (a registered
        strategy may override it; `from_options(opts, datastore)` then builds it)."""

    def retrieve(self, queries, context=None, *, nearest_first=True):
        """(N, D) queries (tensor or array), a `Context` -> Neighbors on the queries' device.

        nearest_first: whether the k must come sorted nearest first (an export needs it, its k
        sweeps take each row's first k); scores never depend on the order.
        """
        raise NotImplementedError

    def summary(self):
        """Counters worth a word in the run's summary line (e.g. searches saved), or {}."""
        return {}

    def describe(self):
        """What the run's summary line adds after the settings (e.g. searches saved), or ''."""
        return ""

    def exact_distances(self, queries, ids):
        """Exact fp32 squared L2 (or inner products, for dot) of each query to datastore rows
        `ids` (N, m): (N, m) on the CPU. Strategies with a faster kernel override it."""
        import numpy as np

        q = (queries.detach().float().cpu() if torch.is_tensor(queries)
             else torch.from_numpy(np.asarray(queries, np.float32)))
        ids = np.asarray(ids, dtype=np.int64)
        keys = torch.from_numpy(np.asarray(self.datastore.gather_keys(ids.reshape(-1)), np.float32))
        keys = keys.view(*ids.shape, -1)
        if self.sim_func == "dot":
            return (keys * q.unsqueeze(1)).sum(-1)
        return (keys - q.unsqueeze(1)).pow(2).sum(-1)

    def pair_distances(self, queries, qi, ids, chunk=65536):
        """Exact distances of P (query, row) pairs, query qi[p] to datastore row ids[p]: (P,) on the
        CPU, each as `exact_distances` computes it (RetoMaton's pointers: no padded rectangle)."""
        import numpy as np

        q = (queries.detach().float().cpu() if torch.is_tensor(queries)
             else torch.from_numpy(np.asarray(queries, np.float32)))
        qi, ids = torch.as_tensor(np.asarray(qi, dtype=np.int64)), np.asarray(ids, dtype=np.int64)
        out = torch.empty(len(ids), dtype=torch.float32)
        for s in range(0, len(ids), chunk):
            keys = torch.from_numpy(np.asarray(self.datastore.gather_keys(ids[s:s + chunk]), np.float32))
            qs = q[qi[s:s + chunk]]
            out[s:s + chunk] = (keys * qs).sum(-1) if self.sim_func == "dot" else (keys - qs).pow(2).sum(-1)
        return out

    def close(self):
        """Release what the strategy holds beyond memory (threads, remote workers); idempotent."""

    def __call__(self, queries, return_ids=False, nearest_first=True):
        """The pre-contract call: (distances, values, valid[, ids]) tensors."""
        return self.retrieve(queries, nearest_first=nearest_first).as_tuple(return_ids)


class Wrapper(Retriever):
    """A strategy over another (`base`): RetoMaton, adaptive retrieval. It shares the base's
    datastore, k and similarity, reads the context the base reads plus its own `own_needs`, and
    passes on what it does not change."""

    own_needs = frozenset()

    def __init__(self, base):
        self.base = base
        self.datastore, self.k, self.sim_func = base.datastore, base.k, base.sim_func

    # A base may be any object with retrieve/datastore/k/sim_func (duck-typed), hence the defaults.
    @property
    def needs(self):
        return frozenset(self.own_needs) | frozenset(getattr(self.base, "needs", ()))

    @property
    def lm_feature_top_k(self):
        return getattr(self.base, "lm_feature_top_k", None)

    @property
    def search_name(self):
        return getattr(self.base, "search_name", None)

    @property
    def unsearched(self):
        return getattr(self.base, "unsearched", None)

    @property
    def per_token_lambda(self):
        return getattr(self.base, "per_token_lambda", False)

    def exact_distances(self, queries, ids):
        return self.base.exact_distances(queries, ids)

    def pair_distances(self, queries, qi, ids):
        return self.base.pair_distances(queries, qi, ids)

    def close(self):
        getattr(self.base, "close", lambda: None)()


def check_common(datastore, k, sim_func):
    """The checks every strategy shares: a known similarity and 1 <= k <= datastore size."""
    if sim_func not in SIM_FUNCS:
        raise ConfigError(f"--knn-sim-func must be one of {', '.join(SIM_FUNCS)}, got {sim_func!r}")
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    if k > datastore.size:
        raise ConfigError(f"--k {k} exceeds the {datastore.size:,} entries of datastore {datastore.prefix}")


def check_k_factor(k_factor, sim_func):
    if not k_factor >= 1 or not math.isfinite(k_factor):
        raise ConfigError(f"--knn-k-factor must be a finite number >= 1, got {k_factor}")
    if k_factor > 1 and sim_func == "do_not_recomp_l2":
        raise ConfigError("--knn-k-factor above 1 re-ranks candidates by exact distance: it needs "
                          "--knn-sim-func l2 or dot, not do_not_recomp_l2")
