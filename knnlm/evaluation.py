"""What every front-end does around `KNNLM.score`, once: the front-end kit.

    ev = Evaluation.from_options(retrieval, export, cache, keytype="last_ffn_input")
    ev.needs                                   # the Context fields to compute per batch
    ev.start(identity, meta={...})             # first batch: the datastore/predictor checks, the export opened
    final = ev.score(queries, targets, lp_lm, context=Context(...), count=mask, cache=CacheBatch(...))
    for line in ev.finish(): print(line)       # export finalized, cache grid written, the summary line

A front-end is then its hooks (the keys), its model's identity and its loop over batches
(fairseq's eval_lm batches, knnlm-hf's sliding windows); the kNN-LM, the export, the
continuous cache and its grid, the tally and the summary wording live here.
"""

import dataclasses
import logging


from .cache import ContinuousCache
from .retrieval.adaptive.features import DEFAULT_TOP_K
from .model import Tally, summary_line
from .timing import STAGES
from .retrieval.base import Context
from .options import ExportOptions, RetrievalOptions, validate
from .scoring import interpolate

logger = logging.getLogger(__name__)


def check_model(knn, identity, *, keytype, allow_model_mismatch=False):
    """Refuse a datastore (or an adaptive predictor) made with another model, key type or vocabulary."""
    knn.retriever.datastore.check_compatible(keytype=keytype, allow_model_mismatch=allow_model_mismatch,
                                             **identity.as_dict())
    predictor = getattr(knn.retriever, "predictor", None)
    if predictor is not None:
        predictor.check_compatible(identity=identity, allow_model_mismatch=allow_model_mismatch)


class Evaluation:
    """One scoring run: a `KNNLM` or none, an export or none, a continuous cache or none."""

    def __init__(self, knn=None, *, keytype, export_opts=None, cache=None, overwrite=False,
                 retrieval=None):
        self.knn, self.keytype, self.cache = knn, keytype, cache
        self.retrieval = retrieval if retrieval is not None else RetrievalOptions()
        self.overwrite = overwrite
        self.export_opts = export_opts if export_opts is not None else ExportOptions()
        self.export = None
        self.tally = knn.tally if knn is not None else Tally()
        self.identity = None
        STAGES.reset()  # this run's stage times (knnlm.timing), printed by finish()

    @classmethod
    def from_options(cls, retrieval=None, export=None, cache=None, *, keytype, datastore=None, overwrite=False):
        """Validate the options together and build what they ask for (the KNNLM from the registry)."""
        from .retrieval.factory import build

        retrieval = retrieval if retrieval is not None else RetrievalOptions()
        export = export if export is not None else ExportOptions()
        validate(retrieval, export=export)
        knn = build(retrieval, datastore) if retrieval.knnlm else None
        continuous = None
        if cache is not None and (cache.continuous_cache or cache.cache_grid_json or cache.cache_keytype
                                  or cache.cache_include_context):
            continuous = ContinuousCache(cache, keytype, with_knn=knn is not None)
        return cls(knn, keytype=keytype, export_opts=export, cache=continuous,
                   overwrite=overwrite, retrieval=retrieval)

    # ---- what the front-end computes ----
    @property
    def needs(self):
        """The `Context` fields a batch needs: the strategy's, plus the LM features and context
        tokens an export stores."""
        out = set(self.knn.needs) if self.knn is not None else set()
        if self.export_opts.knnlm_dump_probs:
            out |= {"lm_features", "context_tokens"}
        return out

    @property
    def feature_top_k(self):
        """How many top log-probabilities the LM features hold: the strategy's, else the export's default."""
        top_k = self.knn.lm_feature_top_k if self.knn is not None else None
        return top_k or DEFAULT_TOP_K

    @property
    def needs_keys(self):
        return self.knn is not None or self.cache is not None

    @property
    def cache_keytype(self):
        return self.cache.keytype if self.cache is not None else self.keytype

    # ---- the run ----
    def start(self, identity, *, allow_model_mismatch=None, meta=None):
        """At the first batch: refuse a datastore or predictor of another model; open the export."""
        self.identity = identity
        if self.knn is None:
            return
        allow = self.retrieval.knn_allow_model_mismatch if allow_model_mismatch is None else allow_model_mismatch
        check_model(self.knn, identity, keytype=self.keytype, allow_model_mismatch=allow)
        if self.export_opts.knnlm_dump_probs:
            self.export = self._open_export(self.knn.retriever.datastore, identity, meta or {})

    def _open_export(self, datastore, identity, meta):
        from .retrieval.adaptive import MAX_ORDER, feature_names
        from .offline.export import ExportWriter

        e, knn = self.export_opts, self.knn
        kept = knn.k if e.knnlm_dump_neighbors < 0 else min(e.knnlm_dump_neighbors, knn.k)
        return ExportWriter(
            e.knnlm_dump_probs, kept, sim_func=knn.sim_func, temperature=knn.temperature, lmbda=knn.lmbda,
            with_ids=e.knnlm_dump_ids, overwrite=self.overwrite,
            feature_names=feature_names(self.feature_top_k), context_order=MAX_ORDER,
            unsearched=knn.retriever.unsearched,  # RetoMaton, adaptive: which tokens were searched (knnlm-explain)
            meta={**meta, "datastore": datastore.prefix, "datastore_fingerprint": datastore.fingerprint,
                  "index": self.retrieval.indexfile, **identity.as_dict()})

    def prefetch(self, queries, targets, context=None):
        """Start the batch's retrieval (see KNNLM.prefetch); pass the handle to `score`. None without a kNN-LM."""
        if self.knn is None:
            return None
        if "targets" in self.knn.needs:
            context = dataclasses.replace(context or Context(), targets=targets)
        return self.knn.prefetch(queries, context, nearest_first=self.export is not None)

    def score(self, queries, targets, lp_lm, *, context=None, count=None, cache=None, prefetched=None):
        """(N,) final log-probabilities of N scored tokens; the tally counts those in `count`
        (a (N,) bool mask, None for all). cache: the batch's `CacheBatch` when the cache is on.
        prefetched: the batch's `prefetch` handle, if its retrieval was started earlier."""
        final = lp_lm.float()
        if self.knn is not None:
            scored = self.knn.score(queries, targets, lp_lm, context=context, nearest_first=self.export is not None,
                                    count=count if self.cache is None else False, prefetched=prefetched)
            final = scored.final
            if self.export is not None:
                keep = slice(None) if count is None else count.to(scored.neighbors.distances.device)
                n = scored.neighbors[keep]
                pick = (lambda t: t) if count is None else (lambda t: t[count.to(t.device)])  # noqa: E731
                self.export.add(pick(lp_lm), pick(scored.lp_knn), pick(targets), dists=n.distances, ids=n.ids,
                                vals=n.values, valid=n.valid, features=pick(context.lm_features),
                                context=pick(context.context_tokens),
                                searched=n.searched_mask() if self.knn.retriever.unsearched else None)
        if self.cache is not None:
            lps = self.cache.log_probs(cache)
            if self.cache.grid is not None:
                c = slice(None) if count is None else count.to(lps[0].device)
                bases = {"lm": lp_lm[c]}
                if self.knn is not None:
                    bases["knn"] = final[c if count is None else count.to(final.device)]
                self.cache.grid.add([lp[c] for lp in lps[1:]], bases)
            final = interpolate(final, lps[0].to(final.device), self.cache.lmbda)
        if self.knn is None or self.cache is not None:
            if count is None:
                self.tally.add(lp_lm, final)
            else:
                self.tally.add(lp_lm[count.to(lp_lm.device)], final[count.to(final.device)])
        return final

    def setting(self):
        """The settings as the summary line prints them."""
        text = self.knn.describe() if self.knn is not None else "no datastore: the LM alone"
        if self.cache is not None:
            text += "; " + self.cache.describe()
        return text

    def finish(self, *, inf_note="", grid_meta=None):
        """After the last batch: finalize the export, write the cache grid; the lines to show."""
        lines = []
        if self.export is not None:
            self.export.finalize()
            lines.append(f"per-token export written to {self.export_opts.knnlm_dump_probs}")
        summary = self.tally.summary()
        if summary:
            lines.append(summary_line(summary, self.setting(), inf_note=inf_note))
            if self.knn is not None and STAGES.line():
                lines.append(STAGES.line())
        if self.cache is not None and self.cache.grid is not None:
            meta = {"keytype": self.cache.keytype, "cache_size": self.cache.size,
                    "include_context": self.cache.include_context,
                    "knn_lmbda": self.knn.lmbda if self.knn is not None else None, **(grid_meta or {})}
            lines += self.cache.grid.write(self.cache.grid_json, meta=meta, overwrite=self.overwrite)
        if self.knn is not None:
            self.knn.close()
        return lines

    def abandon(self):
        """A run that failed: remove the half-written export, release the strategy."""
        if self.export is not None:
            self.export.abandon()
            self.export = None
        if self.knn is not None:
            self.knn.close()

    def summary(self):
        return self.tally.summary()

    def table(self):
        """A small table of what the run measured: the LM alone, and with what was mixed in."""
        s = self.tally.summary()
        if not s:
            return []
        rows = [("LM alone", s["base_ppl"], "")]
        if self.knn is not None or self.cache is not None:
            name = "kNN-LM" if self.knn is not None else "LM"
            if self.cache is not None:
                name += " + cache"
            change = 100 * (s["ppl"] / s["base_ppl"] - 1)
            rows.append((name, s["ppl"], f"{change:+.1f}%"))
        width = max(len(r[0]) for r in rows)
        out = [f"{'':{width}}  perplexity  change   ({s['tokens']:,} tokens)"]
        out += [f"{name:{width}}  {ppl:10.4f}  {chg}" for name, ppl, chg in rows]
        return out
