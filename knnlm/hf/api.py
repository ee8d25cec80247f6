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

from knnlm.errors import ConfigError
from knnlm.evaluation import check_model

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
        self.knn.close()
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


# attach's keyword names of before the options object -> RetrievalOptions fields
_ALIASES = {"temperature": "knn_temp", "nprobe": "probe", "sim_func": "knn_sim_func", "k_factor": "knn_k_factor",
            "gpu": "knn_gpu", "in_memory": "move_dstore_to_mem", "allow_model_mismatch": "knn_allow_model_mismatch",
            "search": "knn_search", "executor": "knn_executor"}


def attach(model, datastore, index=None, *, keytype=DEFAULT_KEYTYPE, tokenizer=None, options=None, **settings):
    """Make `model`'s forward (and so generate) the kNN-LM's; returns an `Attached`.

    datastore: a prefix (or shard manifest) or an opened datastore; index: a path (or None for
    `knn_search="exact"`). settings: any `knnlm.RetrievalOptions` field (k=1024, lmbda=0.25,
    knn_search="exact", knn_exact_dtype="fp16", ...; temperature, nprobe, sim_func, k_factor,
    gpu, in_memory and allow_model_mismatch are accepted as short names), or a whole
    `options=RetrievalOptions(...)`. The datastore must come from this model (weights
    fingerprint, key type and dimension; the tokenizer's fingerprint too when `tokenizer` is given).
    """
    import dataclasses

    from knnlm.options import RetrievalOptions
    from knnlm.retrieval.factory import build

    fields = {f.name for f in dataclasses.fields(RetrievalOptions)}
    values = {}
    for name, value in settings.items():
        field = _ALIASES.get(name, name)
        if field not in fields:
            raise ConfigError(f"attach() got an unknown setting {name!r} (a knnlm.RetrievalOptions field)")
        values[field] = value
    opts = dataclasses.replace(options or RetrievalOptions(), knnlm=True, **values)
    if index is not None:  # a path, or a FAISS index object (the faiss strategy takes either)
        opts = dataclasses.replace(opts, indexfile=index)
    if isinstance(datastore, str):
        opts = dataclasses.replace(opts, dstore_filename=datastore)
    elif opts.dstore_filename is None:
        opts = dataclasses.replace(opts, dstore_filename=datastore.prefix)
    knn = build(opts, None if isinstance(datastore, str) else datastore)
    check_model(knn, model_identity(model, tokenizer), keytype=keytype,
                allow_model_mismatch=opts.knn_allow_model_mismatch)
    capture = break_into(model, keytype)
    return Attached(model, knn, capture)
