"""`attach`: turn a Hugging Face causal LM into its kNN-LM in place, and back.

    knn = knnlm.hf.attach(model, "dstore/train", "dstore/knn.index", k=1024, lmbda=0.25, tokenizer=tok)
    out = model(input_ids, labels=input_ids)   # out.logits: log p_kNN-LM (B, T, V); out.loss its NLL
    model.generate(input_ids, max_new_tokens=20)   # samples / searches the kNN-LM distribution
    knn.detach()                               # the plain model again, exactly

While attached, `model.forward` returns the interpolated next-token log-probabilities in
`logits` (a full distribution per position: convenient, not the cheap path; `knnlm-hf eval`
scores only each target's probability) and, given `labels`, their mean NLL in `loss`.
"""

import functools

from knnlm import KNNLM, FaissRetriever, open_datastore
from knnlm.errors import ConfigError

from .hooks import break_into
from .identity import model_identity
from .layers import DEFAULT_KEYTYPE


class Attached:
    """What `attach` returns: the `KNNLM` (`.knn`) and `detach()`."""

    def __init__(self, model, knn, capture):
        self.model, self.knn, self.capture = model, knn, capture
        self._had_forward = "forward" in model.__dict__
        self._old_forward = model.__dict__.get("forward")
        plain = model.forward

        @functools.wraps(plain)  # generate() reads forward's signature (logits_to_keep, ...)
        def forward(*args, **kwargs):
            labels = kwargs.pop("labels", None)
            out = plain(*args, **kwargs)
            keys = capture.pop()
            logits = out.logits
            b, t, v = logits.shape
            queries = keys[:, -t:].reshape(b * t, -1)
            lp = knn.next_token_log_probs(queries, logits.float().log_softmax(-1).reshape(b * t, v))
            out.logits = lp.view(b, t, v)
            if labels is not None:
                if t != labels.shape[1]:
                    raise ConfigError("labels given with logits_to_keep: the loss needs every position's logits")
                target = labels[:, 1:].to(lp.device)
                picked = out.logits[:, :-1].gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                keep = target.ne(-100)
                out.loss = -(picked * keep).sum() / keep.sum().clamp(min=1)
            return out

        model.forward = forward
        self.attached = True

    def detach(self):
        """Remove the hooks and the forward wrapper: the model is the plain model again."""
        if not self.attached:
            return
        self.capture.remove()
        if self._had_forward:
            self.model.forward = self._old_forward
        else:
            del self.model.forward
        self.attached = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False


def attach(model, datastore, index, *, k=1024, lmbda=0.25, temperature=1.0, nprobe=32, sim_func="l2",
           k_factor=1.0, keytype=DEFAULT_KEYTYPE, tokenizer=None, allow_model_mismatch=False, gpu=False,
           in_memory=False):
    """Make `model`'s forward (and so generate) the kNN-LM's; returns an `Attached`.

    datastore: a prefix (or shard manifest) or an opened datastore; index: a path or a FAISS
    index built from it. The datastore must come from this model (weights fingerprint, key
    type and dimension; the tokenizer's fingerprint too when `tokenizer` is given).
    """
    store = open_datastore(datastore, in_memory=in_memory) if isinstance(datastore, str) else datastore
    identity = model_identity(model, tokenizer)
    store.check_compatible(keytype=keytype, allow_model_mismatch=allow_model_mismatch, **identity.as_dict())
    retriever = FaissRetriever(index, store, k=k, nprobe=nprobe, sim_func=sim_func, gpu=gpu, k_factor=k_factor)
    knn = KNNLM(retriever, lmbda=lmbda, temperature=temperature)
    capture = break_into(model, keytype)
    return Attached(model, knn, capture)

