"""A Hugging Face model's identity as the core records and checks it."""

from knnlm.provenance import ModelIdentity, dictionary_fingerprint, model_fingerprint

from .layers import key_dim


def tokenizer_fingerprint(tokenizer):
    """Hash of the vocabulary in id order plus the special tokens: two tokenizers agree only if
    every id means the same token."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = [f"{name}={value}" for name, value in sorted(tokenizer.special_tokens_map.items())]
    return dictionary_fingerprint([str(t) for t in vocab] + ["\x00special"] + special)


def output_vocab_size(model):
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def model_identity(model, tokenizer=None):
    """Key dimension, output vocabulary size, tokenizer fingerprint (None without a tokenizer:
    then nothing checks it), weights fingerprint."""
    return ModelIdentity(
        dim=key_dim(model),
        dict_size=output_vocab_size(model),
        dict_fingerprint=None if tokenizer is None else tokenizer_fingerprint(tokenizer),
        model_fingerprint=model_fingerprint(model.named_parameters()),
    )
