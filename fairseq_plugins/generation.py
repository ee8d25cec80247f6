"""kNN-LM generation: the interpolated distribution over the whole vocabulary.

fairseq's SequenceGenerator asks `model.get_normalized_probs` for next-token log-probs
after each decoder step. `KNNLMForGeneration` wraps a trained LM (sharing its decoder, so
no weights are copied) and answers with `knnlm.KNNLM.next_token_log_probs`, the query being
the key captured at the last position of that step.
"""

import torch
from fairseq.models import FairseqLanguageModel

from .hooks import KeyCapture


class KNNLMForGeneration(FairseqLanguageModel):
    """model: a fairseq LM; knn: a `knnlm.KNNLM` over a datastore dumped from it."""

    def __init__(self, model, knn, *, keytype="last_ffn_input"):
        super().__init__(model.decoder)
        self.lm = model
        self.knn = knn
        self.capture = KeyCapture(model, keytype)

    def max_positions(self):
        return self.lm.max_positions()

    def max_decoder_positions(self):
        return self.lm.max_decoder_positions()

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        lm = self.lm.get_normalized_probs(net_output, log_probs=True, sample=sample).float()
        keys = self.capture.pop()  # (B, T, C) of this step; T = 1 with incremental decoding
        steps = lm.size(1)
        queries = keys[:, -steps:].reshape(-1, keys.size(-1))
        out = self.knn.next_token_log_probs(queries, lm.reshape(-1, lm.size(-1))).view_as(lm)
        return out if log_probs else out.exp()

    @torch.no_grad()
    def next_token_log_probs(self, tokens):
        """(B, T) token ids -> (B, V) interpolated log-probs of the next token (for Python users)."""
        net_output = self.decoder(tokens)
        return self.get_normalized_probs((net_output[0][:, -1:], *net_output[1:]), log_probs=True)[:, -1]
