"""The kNN-LM method as one object: retrieve -> neighbor scores -> p_kNN -> interpolate.

    knn = KNNLM(retriever, lmbda=0.25, temperature=1.0)
    scored = knn.score(queries, targets, lp_lm)        # scoring: log p of each target
    lprobs = knn.next_token_log_probs(queries, lm_lp)  # generation: the whole distribution
    knn.summary()                                      # tokens, base and kNN-LM perplexity

Front-ends (fairseq, Hugging Face) capture the queries and the LM's log-probabilities and
hand them here; none of them re-implements the recipe. The similarity function is the
retriever's (stored once, there).
"""

import dataclasses
import math

import torch

from .errors import ConfigError
from .timing import timed
from .retrieval.base import Context, Neighbors
from .scoring import (check_lambda, check_temperature, interpolate, interpolate_per_token, knn_full_log_probs,
                      knn_log_prob, neighbor_scores)
from .validation import check_distribution, check_k, check_score_inputs, vocab_of


@dataclasses.dataclass
class Scored:
    """What `KNNLM.score` returns for N tokens (tensors of shape (N,), fp32)."""

    final: torch.Tensor      # log p_kNN-LM(target)
    lp_lm: torch.Tensor      # log p_LM(target), as given
    lp_knn: torch.Tensor     # log p_kNN(target); -inf where no neighbor carries it (or not searched)
    neighbors: Neighbors     # what the retriever returned (an export writes its distances and ids)


class Tally:
    """Running sums over scored tokens: the base LM's and the final perplexity.

    Our own count, so an infinite perplexity (a token of probability 0, possible at lambda = 1)
    is reported as such instead of skipped, as fairseq's eval_lm does.
    """

    def __init__(self):
        self.tokens = 0
        self.sum_lm = 0.0
        self.sum_final = 0.0
        self.inf_tokens = 0
        self.searched = 0

    def add(self, lp_lm, final, searched=None):
        inf = torch.isinf(final)
        self.inf_tokens += int(inf.sum())
        self.tokens += int(final.numel())
        self.sum_lm += float(lp_lm.float().sum())
        self.sum_final += float(final[~inf].float().sum())
        self.searched += int(final.numel() if searched is None else searched)

    def summary(self):
        """{tokens, base_ppl, ppl, inf_tokens, searched}, or None before any token was added."""
        if self.tokens == 0:
            return None
        base = math.exp(-self.sum_lm / self.tokens)
        final = math.inf if self.inf_tokens else math.exp(-self.sum_final / self.tokens)
        return {"tokens": self.tokens, "base_ppl": base, "ppl": final, "inf_tokens": self.inf_tokens,
                "searched": self.searched}


class KNNLM:
    """A retriever (any strategy), lambda and the temperature: the kNN-LM of Khandelwal et al.

    lmbda: weight of p_kNN, in [0, 1]; temperature: divides the neighbor scores (> 0).
    """

    def __init__(self, retriever, *, lmbda=0.25, temperature=1.0):
        check_lambda(lmbda)
        check_temperature(temperature)
        check_k(getattr(retriever, "k", 1), "the retriever's k")
        self.retriever, self.lmbda, self.temperature = retriever, float(lmbda), float(temperature)
        self.tally = Tally()
        ds = retriever.datastore
        # A datastore of reduced keys (PCA) takes queries through the same transform; a pruned
        # one weighs each neighbor by the entries it stands for.
        self.transform = ds.query_transform() if hasattr(ds, "query_transform") else None
        self.weighted = bool(getattr(ds, "weighted", False))

    @property
    def needs(self):
        """The `Context` fields the strategy reads: a front-end computes only these."""
        return self.retriever.needs

    @property
    def lm_feature_top_k(self):
        return self.retriever.lm_feature_top_k

    def _check_context(self, context, given=()):
        missing = set(self.needs) - (context.provided() if context is not None else set()) - set(given)
        if missing:
            name = type(self.retriever).__name__
            raise ConfigError(f"{name} reads {', '.join(sorted(missing))} of each call: pass "
                              f"context=knnlm.Context({', '.join(f'{m}=...' for m in sorted(missing))}) "
                              f"(see knnlm.retrieval.base.NEEDS)".replace("streams=", "lengths="))

    def retrieve(self, queries, context=None, nearest_first=False):
        """The retriever's neighbors of the (transformed) queries, with their weights if the datastore has any."""
        return self.collect(self.prefetch(queries, context, nearest_first))

    def prefetch(self, queries, context=None, nearest_first=False):
        """Start retrieving; `score(..., prefetched=handle)` (or `collect(handle)`) finishes it.

        A strategy that searches elsewhere (the sharded search's threads or Ray actors: it has
        `submit`/`collect`) runs while the caller computes the next batch's LM forward; any other
        retrieves at once. knnlm-hf eval pipelines its windows this way."""
        self._check_context(context)
        if self.transform is not None:
            queries = self.transform(queries)
        if hasattr(self.retriever, "submit"):
            return ("pending", self.retriever.submit(queries), nearest_first)
        return ("done", self.retriever.retrieve(queries, context, nearest_first=nearest_first), nearest_first)

    def collect(self, handle):
        state, value, nearest_first = handle
        neighbors = value if state == "done" else self.retriever.collect(value, nearest_first=nearest_first)
        if self.weighted and neighbors.weights is None:
            for block in (neighbors, neighbors.extra):  # a compact layout's two blocks
                if block is not None:
                    ids = block.ids.clamp(min=0).cpu().numpy()
                    w = torch.from_numpy(self.retriever.datastore.gather_weights(ids).astype("float32"))
                    block.weights = w.to(block.distances.device)
        return neighbors

    @property
    def per_token_lambda(self):
        """Whether the strategy returns each token's lambda (--adaptive-lambda), used instead of `lmbda`."""
        return bool(getattr(self.retriever, "per_token_lambda", False))

    @property
    def sim_func(self):
        return self.retriever.sim_func

    @property
    def k(self):
        return self.retriever.k

    def neighbor_scores(self, neighbors):
        """Logits of the neighbor softmax: -d / T (L2) or q.k / T (dot), plus log w for weighted entries."""
        scores = neighbor_scores(neighbors.distances, self.sim_func, self.temperature)
        if neighbors.weights is not None:
            scores = scores + neighbors.weights.float().log()
        return scores

    def knn_log_prob(self, neighbors, targets):
        """log p_kNN(target) for each query, (N,); -inf for tokens not searched. Compact neighbors
        (`Neighbors.rows`, `.extra`): computed for their rows only, block by block (a row's value
        does not depend on its block's width or its neighbors in the block)."""
        if neighbors.compact:
            lp = torch.full((len(neighbors),), float("-inf"), dtype=torch.float32, device=neighbors.distances.device)
            for rows, block in neighbors.blocks():
                if len(rows):
                    at = rows.to(targets.device)
                    lp[at.to(lp.device)] = knn_log_prob(self.neighbor_scores(block), block.values, targets[at],
                                                        block.valid)
            return lp
        lp = knn_log_prob(self.neighbor_scores(neighbors), neighbors.values, targets, neighbors.valid)
        if neighbors.retrieved is not None:
            lp = lp.masked_fill(~neighbors.retrieved.to(lp.device), float("-inf"))
        return lp

    def mix(self, lp_lm, lp_knn, retrieved=None, lmbda=None):
        """log(lambda p_kNN + (1 - lambda) p_LM); p_LM alone where a token was not searched.
        lmbda: (N,) per-token lambdas (`Neighbors.lmbda`, --adaptive-lambda) instead of the constant.
        (Over all N tokens, skipped ones included: O(N), and each token's value then does not
        depend on which others were searched: PyTorch's vectorised kernels round a tensor's tail
        elements apart from the rest.)"""
        if lmbda is None:
            final = interpolate(lp_lm, lp_knn.to(lp_lm.device), self.lmbda)
        else:
            final = interpolate_per_token(lp_lm, lp_knn.to(lp_lm.device), lmbda)
        if retrieved is not None:
            final = torch.where(retrieved.to(final.device), final, lp_lm.float())
        return final

    def score(self, queries, targets, lp_lm, *, context=None, nearest_first=False, count=None, prefetched=None):
        """Score N targets: (N, D) queries, (N,) targets, (N,) log p_LM(target) -> Scored.

        context: a `Context` with what the strategy `needs` (its targets are filled in from
        `targets`). nearest_first: ask for the neighbors sorted (an export needs it). count:
        which tokens the tally counts: None for all, a (N,) bool mask (a front-end that scores
        positions its perplexity leaves out, fairseq's --add-bos-token, passes one), False for
        none (the caller mixes in more, a cache say, and counts the result itself with `count`).
        prefetched: the handle of `prefetch(queries, context, nearest_first)` made earlier.
        """
        check_score_inputs(queries, targets, lp_lm, vocab_of(self.retriever))  # knnlm.validation: named errors
        if prefetched is not None:
            neighbors = self.collect(prefetched)
        else:
            if "targets" in self.needs:
                context = dataclasses.replace(context or Context(), targets=targets)
            neighbors = self.retrieve(queries, context, nearest_first=nearest_first)
        targets = targets.to(neighbors.values.device)
        with timed("scoring"):
            lp_knn = self.knn_log_prob(neighbors, targets)
            final = self.mix(lp_lm.float(), lp_knn, neighbors.retrieved, neighbors.lmbda)
        if count is not False:
            self.count(lp_lm, final, count, neighbors.searched_mask())
        return Scored(final=final, lp_lm=lp_lm.float(), lp_knn=lp_knn, neighbors=neighbors)

    def count(self, lp_lm, final, mask=None, searched=None):
        """Add tokens to the tally (those in `mask`, if given); `searched`: (N,) bool, the tokens that cost a search."""
        if mask is not None:
            mask = mask.to(final.device)
            lp_lm, final = lp_lm[mask], final[mask]
            searched = None if searched is None else searched.to(final.device)[mask]
        self.tally.add(lp_lm, final, None if searched is None else int(searched.sum()))

    def next_token_log_probs(self, queries, lm_log_probs, *, context=None):
        """(N, D) queries, (N, V) log p_LM -> (N, V) log of the interpolated next-token distribution.

        The LM's features a strategy reads (adaptive retrieval) come from `lm_log_probs` itself
        when the context does not hold them."""
        check_distribution(queries, lm_log_probs, vocab_of(self.retriever))  # knnlm.validation: named errors
        if "lm_features" in self.needs and (context is None or context.lm_features is None):
            from .retrieval.adaptive.features import lm_features

            context = dataclasses.replace(context or Context(),
                                          lm_features=lm_features(lm_log_probs, self.lm_feature_top_k))
        if "targets" in self.needs:
            raise ConfigError(f"{type(self.retriever).__name__} follows the text that really came next, which "
                              f"generation does not know: generate without it (e.g. drop --retomaton)")
        # Order-free; one row per token (a generation step's few rows: the whole distribution of
        # each is computed anyway, and so every row rounds as the unskipped path does).
        neighbors = self.retrieve(queries, context, nearest_first=False).dense()
        scores = self.neighbor_scores(neighbors).to(lm_log_probs.device)
        lmbda = self.lmbda if neighbors.lmbda is None else neighbors.lmbda  # per token: --adaptive-lambda
        out = knn_full_log_probs(lm_log_probs, scores, neighbors.values.to(lm_log_probs.device), lmbda,
                                 neighbors.valid.to(lm_log_probs.device))
        if neighbors.retrieved is not None:
            keep = neighbors.retrieved.to(out.device)
            out = torch.where(keep.unsqueeze(-1), out, lm_log_probs.float())
        return out

    def summary(self):
        return self.tally.summary()

    def close(self):
        """Release the strategy's threads or remote workers (a sharded search's actors)."""
        self.retriever.close()

    def describe(self):
        """The settings as the summary line prints them: 'k=..., lambda=..., T=..., l2', plus the
        strategy's name where it has one (', exact' for --knn-search exact; FAISS has none), then what
        the strategy reports (RetoMaton: the searches it saved)."""
        name = self.retriever.search_name
        lmbda = "per-token (predicted)" if self.per_token_lambda else self.lmbda
        text = f"k={self.k}, lambda={lmbda}, T={self.temperature}, {self.sim_func}" + (f", {name}" if name else "")
        extra = self.retriever.describe()  # e.g. RetoMaton's searches saved
        return text + (f"; {extra}" if extra else "")


def summary_line(summary, setting, inf_note=""):
    """The one fixed wording every front-end prints, so scripts can parse it:
    'kNN-LM: N tokens, base LM perplexity X, kNN-LM perplexity Y (setting)'."""
    note = ""
    if summary["inf_tokens"]:
        note = (f"; {summary['inf_tokens']:,} tokens have probability 0 (no neighbor carries the "
                f"target and lambda = 1), so the perplexity is infinite{inf_note}")
    return (f"kNN-LM: {summary['tokens']:,} tokens, base LM perplexity {summary['base_ppl']:.4f}, "
            f"kNN-LM perplexity {summary['ppl']:.4f} ({setting}){note}")

