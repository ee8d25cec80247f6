"""kNN-LM generation with `model.generate`: a LogitsProcessor that replaces the next-token
scores with the interpolated log-distribution (`knnlm.KNNLM.next_token_log_probs`).

    capture = break_into(model, keytype)
    out = model.generate(ids, logits_processor=[KNNLogitsProcessor(knn, capture)], ...)

transformers runs custom processors after its own (repetition penalty, bad words, ...) and
before the sampling warpers (temperature, top-k, top-p), so those still apply to the kNN-LM
distribution. Tokens an earlier processor banned (-inf) stay banned (the rest renormalized).
Greedy, sampling and beam search all work: each step's keys are the rows of that step's forward.
"""

import torch
from transformers import LogitsProcessor


class KNNLogitsProcessor(LogitsProcessor):
    """knn: a `knnlm.KNNLM`; capture: a `knnlm.hf.hooks.KeyCapture` on the generating model."""

    def __init__(self, knn, capture):
        self.knn, self.capture = knn, capture

    def __call__(self, input_ids, scores):
        keys = self.capture.pop()  # (B, T, D) of this step's forward; T = 1 with the KV cache
        queries = keys[:, -1].reshape(scores.shape[0], -1)
        lm = scores.float().log_softmax(-1)
        out = self.knn.next_token_log_probs(queries, lm)
        banned = torch.isneginf(scores)
        if banned.any():
            out = out.masked_fill(banned, float("-inf")).log_softmax(-1)
        return out
