"""Fingerprints and versions that tie a datastore and an index to what made them."""

import hashlib
import importlib.metadata


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
