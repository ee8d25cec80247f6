"""`KNNSequenceScorer`: fairseq's `SequenceScorer` plus a datastore dump or kNN-LM scoring.

The LM part is fairseq's own (`super().generate`), so without kNN the scores are stock
fairseq's bit for bit; this class only finds the positions fairseq scores, captures their
keys, and hands them to the core: a `knnlm.DumpSession` (dump) or a `knnlm.KNNLM` (scoring).
"""

import logging

import torch
from fairseq.sequence_scorer import SequenceScorer

from knnlm.errors import ConfigError
from knnlm.features import DEFAULT_TOP_K, TokenFeatures, lm_features
from knnlm.ngrams import context_tokens
from knnlm.model import Tally
from knnlm.retrieval import RetoMatonRetriever, Streams
from knnlm.scoring import continuous_cache_log_probs, interpolate

from .hooks import KeyCapture

logger = logging.getLogger(__name__)


class KNNSequenceScorer(SequenceScorer):
    """Scores targets like `SequenceScorer`; on the way, dumps keys or mixes in p_kNN.

    knn: a `knnlm.KNNLM` (kNN-LM scoring) or None; dump: a `knnlm.DumpSession` (started with
    the model's identity at the first batch) or None; export: a `knnlm.offline.export.ExportWriter`
    that receives per-token log-probabilities and neighbors; cache: None or a dict with
    `lmbda`, `theta` and `size` for the continuous cache (optionally `keytype`: the state it
    remembers, default the scorer's; `context`: also remember the context window's positions;
    `grid`: a `fairseq_plugins.cache_grid.CacheGrid` to tune lambda and theta). drop_first_block
    (dump): leave out the rows of blocks with no prior context, as the original code did. `on_first_batch(model)` runs once,
    before anything is scored: it returns the model's `knnlm.ModelIdentity` (compatibility
    checks, and what a dump records).
    """

    def __init__(self, tgt_dict, softmax_batch=None, *, keytype="last_ffn_input", knn=None, dump=None,
                 export=None, cache=None, remove_bos=False, on_first_batch=None, drop_first_block=False, **kwargs):
        super().__init__(tgt_dict, softmax_batch, **kwargs)
        self.keytype = keytype
        self.knn, self.dump, self.export, self.cache = knn, dump, export, cache
        self.remove_bos = remove_bos
        self.on_first_batch = on_first_batch
        self.drop_first_block = drop_first_block
        self._capture = None
        self._cache_capture = None
        self._model = None
        # Our own tally (the kNN-LM's when there is one), so an infinite perplexity is reported
        # instead of skipped (eval_lm drops inf).
        self.tally = knn.tally if knn is not None else Tally()

    @property
    def feature_top_k(self):
        """How many top log-probabilities the LM features hold: the adaptive predictor's, else the default."""
        return getattr(self.knn.retriever, "top_k", DEFAULT_TOP_K) if self._adaptive else DEFAULT_TOP_K

    @property
    def _adaptive(self):
        return self.knn is not None and getattr(self.knn.retriever, "needs_lm_features", False)

    @property
    def needs_features(self):
        """The LM's per-token features cost a pass over the (B, T, V) log-probs: only an export or
        adaptive retrieval pays it."""
        return self.export is not None or self._adaptive

    @property
    def needs_keys(self):
        return self.knn is not None or self.dump is not None or self.cache is not None

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
            if self._cache_capture is not None:
                self._cache_capture.remove()
                self._cache_capture = None
            self._capture = KeyCapture(model, self.keytype)
            cache_kt = (self.cache or {}).get("keytype") or self.keytype
            if cache_kt != self.keytype:
                self._cache_capture = KeyCapture(model, cache_kt)
            self._model = model
            identity = self.on_first_batch(model) if self.on_first_batch is not None else None
            if self.dump is not None and not self.dump.started:
                self.dump.start(identity)

    @torch.no_grad()
    def generate(self, models, sample, **kwargs):
        if not self.needs_keys:
            return super().generate(models, sample, **kwargs)
        self._attach(models)
        if self.needs_features and self.dump is None:
            with FeatureTap(models[0], self.feature_top_k) as tap:
                hypos = super().generate(models, sample, **kwargs)
            features = tap.result(sample["target"].shape)  # (B, T, F)
        else:
            hypos, features = super().generate(models, sample, **kwargs), None
        keys = self._capture.pop()  # (B, T, C)
        cache_keys = self._cache_capture.pop() if self._cache_capture is not None else keys
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
        counted = self._not_bos(spans, queries.device)  # the positions eval_lm counts
        context = None
        if features is not None:
            features = features[rows.to(features.device), cols.to(features.device)]
            # The tokens each prediction read last (input position t predicts target t), for the
            # n-gram features of adaptive retrieval and the export.
            context = context_tokens(sample["net_input"]["src_tokens"], cols, rows=rows)

        final = lp_lm
        if self.dump is not None:
            kept = counted
            if self.drop_first_block:  # the original dump's: a block with no prior context is left out
                kept = counted & torch.cat([torch.full((n,), s > 0, dtype=torch.bool)
                                            for _, s, n in spans]).to(counted.device)
            self.dump.add(queries[kept], targets[kept])
        else:
            if self.knn is not None:
                # Only an export reads the neighbors' order (nearest first); scores do not.
                # A strategy that follows the text (RetoMaton) is told where each row's stream is.
                state = (Streams([n for _, _, n in spans], targets)
                         if isinstance(self.knn.retriever, RetoMatonRetriever) else None)
                if self._adaptive:  # adaptive retrieval decides from the LM's features
                    state = TokenFeatures(features, context)
                scored = self.knn.score(queries, targets, lp_lm, state=state, nearest_first=self.export is not None,
                                        count=counted if self.cache is None else False)
                final = scored.final
                if self.export is not None:
                    n = scored.neighbors[counted.to(scored.neighbors.distances.device)]
                    self.export.add(lp_lm[counted], scored.lp_knn[counted], targets[counted], dists=n.distances,
                                    ids=n.ids, vals=n.values, valid=n.valid,
                                    features=features[counted.to(features.device)],
                                    context=context[counted.to(context.device)])
            if self.cache is not None:
                memory, memory_targets = target.ne(self.pad), None
                if self.cache.get("context"):
                    memory, memory_targets = self._context_memory(sample, target, spans)
                grid = self.cache.get("grid")
                thetas = [self.cache["theta"]] + (list(grid.thetas) if grid is not None else [])
                lps = [lp[rows, cols] for lp in continuous_cache_log_probs(
                    cache_keys, target, self._scored_mask(spans, target), thetas,
                    self.cache.get("size"), memory=memory, memory_targets=memory_targets)]
                if grid is not None:
                    c = counted.to(lps[0].device)
                    bases = {"lm": lp_lm[c]}
                    if self.knn is not None:
                        bases["knn"] = final[c.to(final.device)]
                    grid.add([lp[c] for lp in lps[1:]], bases)
                final = interpolate(final, lps[0].to(final.device), self.cache["lmbda"])
        if self.knn is None or self.cache is not None or self.dump is not None:
            self.tally.add(lp_lm[counted], final[counted.to(final.device)])
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

    def _context_memory(self, sample, target, spans):
        """Every real position of each row remembered, context window included, and the token
        that followed each: for a context position j that is the input token at j + 1 (fairseq
        pads the context's targets)."""
        tokens = sample["net_input"]["src_tokens"].to(target.device)
        memory_targets = target.clone()
        memory = torch.zeros_like(target, dtype=torch.bool)
        for i, s, n in spans:
            memory[i, :s + n] = True
            if s > 0:
                memory_targets[i, :s] = tokens[i, 1:s + 1]
        return memory, memory_targets

    @staticmethod
    def _scored_mask(spans, target):
        mask = torch.zeros_like(target, dtype=torch.bool)
        for i, s, n in spans:
            mask[i, s:s + n] = True
        return mask

    def summary(self):
        """Base-LM and final perplexity over every scored token (inf if any token got p = 0)."""
        return self.tally.summary()

    def close(self):
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
            self._model = None
        if self._cache_capture is not None:
            self._cache_capture.remove()
            self._cache_capture = None


class FeatureTap:
    """Within `with FeatureTap(model, top_k) as tap:`, every log-probability tensor the model's
    `get_normalized_probs` returns is reduced to the LM features (`knnlm.features`) on the way
    out; `tap.result((B, T))` puts them together as (B, T, F).

    fairseq's SequenceScorer gathers only the targets' log-probs, and may split the positions
    into softmax batches (--softmax-batch) of flattened rows: the batches come in row order, so
    their features concatenate to the (B * T) positions in order either way.
    """

    def __init__(self, model, top_k):
        self.model, self.top_k, self.chunks = model, top_k, []

    def __enter__(self):
        self._had = "get_normalized_probs" in vars(self.model)
        original = self.model.get_normalized_probs

        def tapped(net_output, log_probs, sample=None):
            out = original(net_output, log_probs, sample=sample)
            lp = out if log_probs else out.log()
            self.chunks.append(lm_features(lp.detach(), self.top_k).reshape(-1, 1 + self.top_k))
            return out

        self._original = original
        self.model.get_normalized_probs = tapped
        return self

    def __exit__(self, *exc):
        if self._had:
            self.model.get_normalized_probs = self._original
        else:
            del self.model.get_normalized_probs

    def result(self, shape):
        feats = torch.cat(self.chunks) if self.chunks else torch.empty(0, 1 + self.top_k)
        if feats.shape[0] != shape[0] * shape[1]:
            raise RuntimeError(f"LM features for {feats.shape[0]} positions, expected {shape[0]} x {shape[1]}")
        return feats.view(*shape, 1 + self.top_k)
