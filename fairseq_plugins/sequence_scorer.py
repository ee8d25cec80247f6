"""`KNNSequenceScorer`: fairseq's `SequenceScorer` plus a datastore dump or kNN-LM scoring.

The LM part is fairseq's own (`super().generate`), so without kNN the scores are stock
fairseq's bit for bit; this class only touches the positions fairseq scores.
"""

import logging
import math

import torch
from fairseq.sequence_scorer import SequenceScorer

from knnlm.errors import ConfigError
from knnlm.scoring import continuous_cache_log_prob, interpolate, knn_log_prob, neighbor_scores

from .hooks import KeyCapture

logger = logging.getLogger(__name__)


class KNNSequenceScorer(SequenceScorer):
    """Scores targets like `SequenceScorer`; on the way, dumps keys or mixes in p_kNN.

    retriever: a `knnlm.Retriever` (kNN-LM scoring) or None; dstore_writer: a
    `knnlm.DatastoreWriter` (dump) or None; export: a `knnlm.export.ExportWriter` that
    receives per-token log-probabilities and neighbor distances; dump: True when a writer
    will be set by `on_first_batch` (its dimension is known only then); cache: None or a dict
    with `lmbda`, `theta` and `size` for the continuous cache. `on_first_batch(model)` runs
    once, before anything is scored (compatibility checks that need the model).
    """

    def __init__(self, tgt_dict, softmax_batch=None, *, keytype="last_ffn_input", retriever=None,
                 lmbda=0.25, temperature=1.0, sim_func="l2", dstore_writer=None, export=None,
                 cache=None, remove_bos=False, on_first_batch=None, dump=False, **kwargs):
        super().__init__(tgt_dict, softmax_batch, **kwargs)
        self.keytype = keytype
        self.retriever, self.lmbda, self.temperature, self.sim_func = retriever, lmbda, temperature, sim_func
        self.dstore_writer, self.export, self.cache = dstore_writer, export, cache
        self.dump = dump or dstore_writer is not None  # the writer may be opened by on_first_batch
        self.remove_bos = remove_bos
        self.on_first_batch = on_first_batch
        self._capture = None
        self._model = None
        # Our own tally, so an infinite perplexity is reported instead of skipped (eval_lm drops inf).
        self.n_tokens = 0
        self.sum_lm = 0.0
        self.sum_final = 0.0
        self.n_inf = 0

    @property
    def needs_keys(self):
        return self.retriever is not None or self.dump or self.cache is not None

    def _attach(self, models):
        if len(models) != 1:
            raise ConfigError(
                "kNN-LM scoring and dumping take one model: an ensemble has no single key space "
                "to search (pass one checkpoint to --path)"
            )
        model = models[0]
        if self._model is not model:
            if self._capture is not None:
                self._capture.remove()
            self._capture = KeyCapture(model, self.keytype)
            self._model = model
            if self.on_first_batch is not None:
                self.on_first_batch(model)

    @torch.no_grad()
    def generate(self, models, sample, **kwargs):
        if not self.needs_keys:
            return super().generate(models, sample, **kwargs)
        self._attach(models)
        hypos = super().generate(models, sample, **kwargs)
        keys = self._capture.pop()  # (B, T, C)
        target = sample["target"]
        bsz = target.size(0)
        start = sample["start_indices"] if "start_indices" in sample else [0] * bsz
        # Scored positions of row i: start_i ... start_i + len(hypo) (fairseq strips trailing pad).
        spans = [(i, int(start[i]), hypos[i][0]["positional_scores"].numel()) for i in range(bsz)]
        rows = torch.cat([torch.full((n,), i, dtype=torch.long) for i, s, n in spans]).to(keys.device)
        cols = torch.cat([torch.arange(s, s + n) for i, s, n in spans]).to(keys.device)
        queries = keys[rows, cols]
        targets = target[rows, cols]
        lp_lm = torch.cat([h[0]["positional_scores"] for h in hypos]).float()

        if self.dump:
            keep = self._not_bos(spans, queries.device)
            self.dstore_writer.add(queries[keep].cpu().numpy(), targets[keep].cpu().numpy())
            final = lp_lm
        else:
            final = lp_lm
            if self.retriever is not None:
                # Only an export reads the neighbors' order (nearest first); scores do not.
                dists, vals, valid, ids = self.retriever(queries, return_ids=True,
                                                         nearest_first=self.export is not None)
                scores = neighbor_scores(dists, self.sim_func, self.temperature)
                lp_knn = knn_log_prob(scores, vals, targets, valid)
                final = interpolate(lp_lm, lp_knn.to(lp_lm.device), self.lmbda)
                if self.export is not None:
                    keep = self._not_bos(spans, queries.device)
                    self.export.add(lp_lm[keep], lp_knn[keep], targets[keep], dists=dists[keep],
                                    ids=ids[keep], vals=vals[keep], valid=valid[keep])
            if self.cache is not None:
                lp_cache = continuous_cache_log_prob(
                    keys, target, self._scored_mask(spans, target), self.cache["theta"],
                    self.cache.get("size"), memory=target.ne(self.pad),
                )[rows, cols]
                final = interpolate(final, lp_cache.to(final.device), self.cache["lmbda"])
        self._tally(lp_lm, final, spans)
        offset = 0
        for (i, s, n), h in zip(spans, hypos):
            scores = final[offset:offset + n].to(h[0]["positional_scores"].dtype)
            h[0]["positional_scores"] = scores
            h[0]["score"] = scores.sum() / max(n, 1)
            offset += n
        return hypos

    def _not_bos(self, spans, device):
        """Rows eval_lm counts: with --add-bos-token it drops each sample's first position."""
        keep = torch.ones(sum(n for _, _, n in spans), dtype=torch.bool, device=device)
        if self.remove_bos:
            offset = 0
            for _, _, n in spans:
                keep[offset] = False
                offset += n
        return keep

    @staticmethod
    def _scored_mask(spans, target):
        mask = torch.zeros_like(target, dtype=torch.bool)
        for i, s, n in spans:
            mask[i, s:s + n] = True
        return mask

    def _tally(self, lp_lm, final, spans):
        keep = self._not_bos(spans, final.device)
        f = final[keep]
        inf = torch.isinf(f)
        self.n_inf += int(inf.sum())
        self.n_tokens += int(keep.sum())
        self.sum_lm += float(lp_lm[keep].sum())
        self.sum_final += float(f[~inf].sum())

    def summary(self):
        """Base-LM and final perplexity over every scored token (inf if any token got p = 0)."""
        if self.n_tokens == 0:
            return None
        base = math.exp(-self.sum_lm / self.n_tokens)
        final = math.inf if self.n_inf else math.exp(-self.sum_final / self.n_tokens)
        return {"tokens": self.n_tokens, "base_ppl": base, "ppl": final, "inf_tokens": self.n_inf}

    def close(self):
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
            self._model = None

