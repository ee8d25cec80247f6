"""`KNNSequenceScorer`: fairseq's `SequenceScorer` plus a datastore dump or kNN-LM scoring.

The LM part is fairseq's own (`super().generate`), so without kNN the scores are stock
fairseq's bit for bit; this class only finds the positions fairseq scores, captures their
keys, and hands them to the core: a `knnlm.DumpSession` (dump) or a `knnlm.KNNLM` (scoring).
"""

import logging

import torch
from fairseq.sequence_scorer import SequenceScorer

from knnlm import Context
from knnlm.cache import CacheBatch
from knnlm.errors import ConfigError
from knnlm.retrieval.adaptive import context_tokens, lm_features
from knnlm.model import Tally
from knnlm.timing import timed

from .hooks import KeyCapture

logger = logging.getLogger(__name__)


class KNNSequenceScorer(SequenceScorer):
    """Scores targets like `SequenceScorer`; on the way, dumps keys or scores with an evaluation.

    evaluation: a `knnlm.evaluation.Evaluation` (kNN-LM, export, continuous cache) or None;
    dump: a `knnlm.DumpSession` (started with the model's identity at the first batch) or None.
    drop_first_block (dump): leave out the rows of blocks with no prior context, as the
    original code did. `on_first_batch(model)` runs once, before anything is scored: it returns
    the model's `knnlm.ModelIdentity` (compatibility checks, and what a dump records).
    """

    def __init__(self, tgt_dict, softmax_batch=None, *, keytype="last_ffn_input", evaluation=None, dump=None,
                 remove_bos=False, on_first_batch=None, drop_first_block=False, **kwargs):
        super().__init__(tgt_dict, softmax_batch, **kwargs)
        self.keytype = keytype
        self.evaluation, self.dump = evaluation, dump
        self.remove_bos = remove_bos
        self.on_first_batch = on_first_batch
        self.drop_first_block = drop_first_block
        self._capture = None
        self._cache_capture = None
        self._model = None
        # Our own tally (the evaluation's), so an infinite perplexity is reported instead of
        # skipped (eval_lm drops inf).
        self.tally = evaluation.tally if evaluation is not None else Tally()

    @property
    def needs(self):
        return self.evaluation.needs if self.evaluation is not None else set()

    @property
    def needs_keys(self):
        return self.dump is not None or (self.evaluation is not None and self.evaluation.needs_keys)

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
            cache_kt = self.evaluation.cache_keytype if self.evaluation is not None else self.keytype
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
        ev = self.evaluation
        if "lm_features" in self.needs and self.dump is None:
            # Features of the scored positions only (a context window's are never scored).
            with FeatureTap(models[0], ev.feature_top_k, self._scored_mask(self._spans(sample), sample["target"])) as tap:
                hypos = super().generate(models, sample, **kwargs)
            features = tap.result()  # (N, F), the scored positions in row order
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

        if self.dump is not None:
            kept = counted
            if self.drop_first_block:  # the original dump's: a block with no prior context is left out
                kept = counted & torch.cat([torch.full((n,), s > 0, dtype=torch.bool)
                                            for _, s, n in spans]).to(counted.device)
            self.dump.add(queries[kept], targets[kept])
            final = lp_lm
        else:
            context = Context()
            if "streams" in self.needs:  # each row is a stream of contiguous text
                context.lengths = [n for _, _, n in spans]
            if features is not None:
                if features.shape[0] != len(queries):
                    raise RuntimeError(f"LM features for {features.shape[0]} positions, {len(queries)} scored")
                context.lm_features = features
            if "context_tokens" in self.needs:
                # The tokens each prediction read last (input position t predicts target t).
                context.context_tokens = context_tokens(sample["net_input"]["src_tokens"], cols, rows=rows)
            cache = None
            if ev.cache is not None:
                memory, memory_targets = target.ne(self.pad), None
                if ev.cache.include_context:
                    memory, memory_targets = self._context_memory(sample, target, spans)
                cache = CacheBatch(cache_keys, target, self._scored_mask(spans, target), rows, cols,
                                   memory=memory, memory_targets=memory_targets)
            final = ev.score(queries, targets, lp_lm, context=context, count=counted, cache=cache)
        offset = 0
        for (i, s, n), h in zip(spans, hypos):
            scores = final[offset:offset + n].to(h[0]["positional_scores"].dtype)
            h[0]["positional_scores"] = scores
            h[0]["score"] = scores.sum() / max(n, 1)
            offset += n
        if self.dump is not None:
            self.tally.add(lp_lm[counted], final[counted.to(final.device)])
        return hypos

    def _spans(self, sample):
        """(row, start, length) of the positions fairseq's SequenceScorer will score: from the
        row's start index, as many as its target has non-pad tokens there."""
        target = sample["target"]
        start = sample["start_indices"] if "start_indices" in sample else [0] * target.size(0)
        return [(i, int(start[i]), int(target[i, int(start[i]):].ne(self.pad).sum())) for i in range(target.size(0))]

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
    """Within `with FeatureTap(model, top_k, keep) as tap:`, every log-probability tensor the
    model's `get_normalized_probs` returns is reduced to the LM features (`knnlm.retrieval.adaptive.features`)
    of the positions `keep` marks, on the way out; `tap.result()` puts them together as (N, F),
    the kept positions in row order.

    keep: (B, T) bool, the positions that are scored (a context window's are not: no features
    are computed for them). fairseq's SequenceScorer gathers only the targets' log-probs, and may
    split the positions into softmax batches (--softmax-batch) of flattened rows: the batches come
    in row order, so the flattened mask is walked along them either way.
    """

    def __init__(self, model, top_k, keep):
        self.model, self.top_k, self.chunks = model, top_k, []
        self.keep, self.offset = keep.reshape(-1), 0

    def __enter__(self):
        self._had = "get_normalized_probs" in vars(self.model)
        original = self.model.get_normalized_probs

        def tapped(net_output, log_probs, sample=None):
            out = original(net_output, log_probs, sample=sample)
            lp = (out if log_probs else out.log()).detach()
            lp = lp.reshape(-1, lp.shape[-1])
            n = lp.shape[0]
            keep = self.keep[self.offset:self.offset + n].to(lp.device)
            if keep.shape[0] != n:
                raise RuntimeError(f"LM features: {self.offset + n} positions, the batch has {self.keep.shape[0]}")
            self.offset += n
            with timed("features"):
                self.chunks.append(lm_features(lp, self.top_k, rows=keep.nonzero().squeeze(1)))
            return out

        self._original = original
        self.model.get_normalized_probs = tapped
        return self

    def __exit__(self, *exc):
        if self._had:
            self.model.get_normalized_probs = self._original
        else:
            del self.model.get_normalized_probs

    def result(self):
        if self.offset != self.keep.shape[0]:
            raise RuntimeError(f"LM features for {self.offset} positions, expected {self.keep.shape[0]}")
        return torch.cat(self.chunks) if self.chunks else torch.empty(0, 1 + self.top_k)
