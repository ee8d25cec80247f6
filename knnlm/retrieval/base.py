"""The retrieval contract: what every retrieval strategy takes and returns.

A strategy (FAISS search, exact search, RetoMaton pointers, adaptive skipping, ...) is one
subclass of `Retriever` implementing `retrieve`. Callers (`knnlm.KNNLM`, and through it every
front-end) never look past this contract, so a new strategy is one new file.

    neighbors = retriever.retrieve(queries, state=None)     # (N, D) queries -> Neighbors

`state` is an optional per-stream object a strategy may carry from one call to the next
(`new_state()` makes one; None for strategies that need none). `feedback(state, neighbors,
targets)` is called after the tokens of a call were scored, with their targets, for
strategies whose next step depends on what the text really was (RetoMaton's pointers).
"""

import dataclasses
import math
from typing import Optional

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
    retrieved (N,) bool or None: False for tokens the strategy decided not to search (they
        get p_LM alone); None means every token was searched.
    """

    distances: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor
    ids: Optional[torch.Tensor] = None
    weights: Optional[torch.Tensor] = None
    retrieved: Optional[torch.Tensor] = None

    def __len__(self):
        return self.distances.shape[0]

    def __getitem__(self, rows):
        """The neighbors of a subset of the queries (a mask or an index tensor)."""
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Neighbors(self.distances[rows], self.values[rows], self.valid[rows], pick(self.ids),
                         pick(self.weights), pick(self.retrieved))

    def as_tuple(self, return_ids=False):
        """(distances, values, valid[, ids]): what `Retriever.__call__` returned before the contract."""
        out = (self.distances, self.values, self.valid)
        return out + (self.ids,) if return_ids else out


class Retriever:
    """Base class of retrieval strategies. Subclasses set `datastore`, `k`, `sim_func` and
    implement `retrieve`; the rest has defaults.

    sim_func is stored here once: "l2" (exact squared L2), "do_not_recomp_l2" (the index's
    quantized L2 distances) or "dot" (inner products). Everything that turns distances into
    scores asks the retriever which it is.
    """

    datastore = None
    k = None
    sim_func = "l2"

    def retrieve(self, queries, state=None, *, nearest_first=True):
        """(N, D) queries (tensor or array) -> Neighbors on the queries' device.

        nearest_first: whether the k must come sorted nearest first (an export needs it, its k
        sweeps take each row's first k); scores never depend on the order.
        """
        raise NotImplementedError

    def new_state(self, n_streams=1):
        """A fresh per-stream state for `retrieve(..., state=)`, or None if the strategy keeps none."""
        return None

    def feedback(self, state, neighbors, targets):
        """Told, after scoring, which token really followed each query; stateless strategies ignore it."""

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

    def __call__(self, queries, return_ids=False, nearest_first=True):
        """The pre-contract call: (distances, values, valid[, ids]) tensors."""
        return self.retrieve(queries, nearest_first=nearest_first).as_tuple(return_ids)


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
