"""fairseq `--user-dir` for kNN-LM: registers the `knnlm` task.

    fairseq-eval-lm DATA --path CKPT --user-dir fairseq_plugins --task knnlm ...

`KNNSequenceScorer` is importable from here for researchers who drive fairseq from Python.
"""

from . import _compat  # noqa: F401  (numpy 2 alias fairseq still uses)
from .sequence_scorer import KNNSequenceScorer  # noqa: F401
from .task import KNNLanguageModelingTask, KNNLMConfig  # noqa: F401
