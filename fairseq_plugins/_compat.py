"""Keep fairseq's main branch working on numpy 2.

fairseq's `TokenBlockDataset(break_mode="eos")` (used by `fairseq-interactive` and
`--sample-break-mode eos` for language models) still names `np.compat.long`, which numpy
2.0 removed. Restore just that alias, and only where it is missing.
"""

import types

import numpy as np

if not hasattr(np, "compat"):
    np.compat = types.SimpleNamespace(long=np.int64)
