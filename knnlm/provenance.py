"""Fingerprints and versions that tie a datastore and an index to what made them."""

import dataclasses
import hashlib
import importlib.metadata


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What a datastore records of the model that dumped it, and what scoring checks against.

    dim: the key dimension; dict_size and dict_fingerprint: the vocabulary (fairseq's
    dictionary, or a Hugging Face tokenizer); model_fingerprint: the weights (None if unknown).
    Each front-end computes it its own way; the core only compares.
    """

    dim: int
    dict_size: int
    dict_fingerprint: str
    model_fingerprint: object = None

    def as_dict(self):
        return dataclasses.asdict(self)


def versions():
    out = {}
    for name, dist in (("torch", "torch"), ("fairseq", "ve-fairseq"), ("faiss", "faiss-cpu"),
                       ("numpy", "numpy"), ("knnlm", "knnlm")):
        for candidate in (dist, name, "faiss-gpu", "faiss-gpu-cu12"):
            try:
                out[name] = importlib.metadata.version(candidate)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def dictionary_fingerprint(symbols):
    """Hash of the symbol list in order: two dictionaries agree only if every id means the same word."""
    h = hashlib.sha256()
    for s in symbols:
        h.update(s.encode("utf-8", "surrogatepass"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def model_fingerprint(named_parameters):
    """Hash of the weights rounded to fp16, so one checkpoint run in fp32 or fp16 agrees with itself."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(named_parameters, key=lambda kv: kv[0]):
        h.update(name.encode())
        t = p.detach().to("cpu", torch.float16).contiguous()
        h.update(t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
