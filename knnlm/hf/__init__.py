"""The Hugging Face front-end: kNN-LM for `transformers` causal LMs (needs the `hf` extra).

    layers.py      where the key is, one row per model_type (gpt2, gpt_neox, llama, mistral, qwen2, opt)
    hooks.py       break_into / break_out: forward hooks capturing the key as (B, T, D)
    windows.py     the sliding windows of HF's "Perplexity of fixed-length models" guide
    identity.py    the model's identity: key dimension, tokenizer and weights fingerprints
    generation.py  KNNLogitsProcessor: model.generate from the interpolated distribution
    api.py         attach(model, datastore, index, ...) / detach(): the model's own forward, kNN-LM'd
    cli.py         the knnlm-hf command: dump, eval, generate, check

Like fairseq_plugins/, it reaches the core only through its public objects (KNNLM,
DumpSession, open_datastore, RetrievalOptions and build, ModelIdentity, the errors).
"""

from .hooks import KeyCapture, break_into, break_out
from .layers import KEYTYPES, LAYERS

__all__ = ["KEYTYPES", "LAYERS", "KeyCapture", "attach", "break_into", "break_out"]


def attach(model, datastore, index=None, **kwargs):
    """See knnlm.hf.api.attach (imported on first use: it loads FAISS)."""
    from .api import attach as _attach

    return _attach(model, datastore, index, **kwargs)
