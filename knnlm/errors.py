"""Errors a user can act on.

Each message names what is wrong, which file, what was expected and how to fix it. Our
command-line tools print them as one line and exit with code 2; under fairseq's commands
(`fairseq-eval-lm --task knnlm ...`) they are printed as one line too, and fairseq exits 1.
"""


class KNNLMError(Exception):
    """Base class: a problem with the user's input, not a bug."""


class IncompleteError(KNNLMError):
    """A dump, export or index build that did not finish."""


class MismatchError(KNNLMError):
    """Two artefacts (model, datastore, index) that do not belong together."""


class CorruptError(KNNLMError):
    """A file that is truncated, unreadable or holds impossible values."""


class ConfigError(KNNLMError, ValueError):
    """An option out of range, or a combination of options that cannot work."""


class DiskSpaceError(KNNLMError, OSError):
    """Not enough free disk for what is about to be written."""


class MemorisationError(MismatchError):
    """Scoring the text the datastore was dumped from: the perplexity would measure memorisation."""


class InputError(KNNLMError, ValueError):
    """Tensors handed to the Python API that cannot be what it asks for (knnlm.validation)."""


class OutputExistsError(ConfigError):
    """An output path already holds something the command may replace only with --overwrite."""
