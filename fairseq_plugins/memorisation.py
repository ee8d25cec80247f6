"""The token stream of the split fairseq-eval-lm is about to score, for the memorisation check
(`knnlm.memorisation.check_memorisation`): the binarized split's tokens in file order, each
line with its end-of-sentence token, the stream a dump of that split records as values."""

import numpy as np


def split_tokens(task, split):
    """(N,) int64: every token of `split` as loaded by the task, in order."""
    ds = task.dataset(split)
    while hasattr(ds, "dataset"):  # MonolingualDataset -> TokenBlockDataset -> the indexed dataset
        ds = ds.dataset
    buffer, index = getattr(ds, "_bin_buffer", None), getattr(ds, "_index", None)
    if buffer is not None and index is not None and hasattr(index, "dtype"):
        return np.frombuffer(buffer, dtype=index.dtype).astype(np.int64)  # the mmap'ed file, whole
    parts = [np.asarray(ds[i]).reshape(-1) for i in range(len(ds))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)
