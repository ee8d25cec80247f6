"""The identity of a fairseq model as the core records and checks it (one helper for the task and knnlm-check)."""

from knnlm.provenance import ModelIdentity, dictionary_fingerprint, model_fingerprint

from .hooks import key_dim


def model_identity(model, dictionary):
    """Key dimension, dictionary size and fingerprint, weights fingerprint."""
    return ModelIdentity(
        dim=key_dim(model),
        dict_size=len(dictionary),
        dict_fingerprint=dictionary_fingerprint(dictionary.symbols),
        model_fingerprint=model_fingerprint(model.named_parameters()),
    )
