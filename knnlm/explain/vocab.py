"""Token strings of a fairseq dictionary (dict.txt), read without fairseq.

fairseq's `Dictionary` holds four special symbols first (<s>, <pad>, </s>, <unk>: ids 0-3),
then one entry per line of dict.txt, "WORD COUNT" with an optional " #fairseq:overwrite" flag.
Its fingerprint (`knnlm.provenance.dictionary_fingerprint` of the symbols in id order) is the
one a fairseq datastore records, so a dictionary that is not the datastore's is refused by it.
"""

import os

from ..errors import ConfigError, CorruptError
from ..provenance import dictionary_fingerprint

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
EOS = "</s>"
_OVERWRITE = "#fairseq:overwrite"


class Vocab:
    """Token strings by id, and how to show them as text.

    pieces: the string of each id; joiner: what goes between two tokens (" " for words, "" for
    subwords, whose pieces carry their own spaces); newline: ids shown as a line break;
    fingerprint: what a datastore records as dict_fingerprint (None: unknown)."""

    def __init__(self, pieces, *, joiner, newline=(), fingerprint=None, source=""):
        self.pieces, self.joiner = list(pieces), joiner
        self.newline = sorted(int(i) for i in newline)
        self.fingerprint, self.source = fingerprint, source

    def __len__(self):
        return len(self.pieces)

    def text(self, ids):
        """The decoded text of a sequence of ids (for tables and tests)."""
        return self.joiner.join("\n" if int(i) in self.newline else self.pieces[int(i)] for i in ids)


def read_dict(path):
    """A fairseq dict.txt -> Vocab (words joined by spaces, </s> shown as a line break)."""
    if not os.path.isfile(path):
        raise ConfigError(f"no dictionary at {path} (--dict: the dict.txt that fairseq-preprocess wrote)")
    symbols = list(SPECIALS)
    seen = set(symbols)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            overwrite = line.endswith(" " + _OVERWRITE)
            if overwrite:
                line = line[:-len(_OVERWRITE) - 1]
            word, sep, count = line.rpartition(" ")
            if not sep or not count.lstrip("-").isdigit():
                raise CorruptError(f"{path}, line {n}: expected 'WORD COUNT', got {line[:80]!r}; "
                                   f"is this a fairseq dict.txt?")
            if word in seen and not overwrite:
                raise CorruptError(f"{path}, line {n}: duplicate word {word!r} (fairseq refuses it too)")
            if word not in seen:
                symbols.append(word)
                seen.add(word)
    return Vocab(symbols, joiner=" ", newline=[SPECIALS.index(EOS)],
                 fingerprint=dictionary_fingerprint(symbols), source=os.path.abspath(path))
