"""A Hugging Face tokenizer's token strings for the neighbor explorer (`knnlm-explain --tokenizer`).

Each id is decoded on its own (`tokenizer.decode([id])`), so a byte-level BPE piece shows its
own leading space and pieces join with nothing between them; the fingerprint is the one
`knnlm-hf dump` records (`knnlm.hf.identity.tokenizer_fingerprint`)."""

import os

from knnlm.errors import ConfigError
from knnlm.explain.vocab import Vocab

from .identity import tokenizer_fingerprint


def read_tokenizer(path):
    """A tokenizer directory or hub-style name saved locally -> Vocab."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from {path} ({e.__class__.__name__}: {str(e)[:200]}); "
                          f"--tokenizer takes the directory the model's tokenizer was saved to") from None
    n = len(tok)
    pieces = [tok.decode([i], clean_up_tokenization_spaces=False) for i in range(n)]
    newline = [i for i, p in enumerate(pieces) if p == "\n"]
    return Vocab(pieces, joiner="", newline=newline, fingerprint=tokenizer_fingerprint(tok),
                 source=os.path.abspath(path) if os.path.exists(path) else path)
