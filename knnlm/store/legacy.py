"""The original kNN-LM code's raw datastore format: P_keys.npy and P_vals.npy written by
np.memmap with no .npy header and no metadata (their size, dimension and dtype are given)."""

import os

import numpy as np

from ..errors import CorruptError, KNNLMError


def open_raw(prefix, files, dstore_size, dim, fp16, in_memory, load_keys=True):
    """(keys, vals, meta) of a raw datastore, memory-mapped (or copied into RAM with in_memory)."""
    if dstore_size is None or dim is None:
        raise KNNLMError(
            f"datastore {prefix} is in the original code's raw format (no .npy header, no "
            f"metadata): give its size and dimension (--dstore-size N --dimension D, and "
            f"--dstore-fp16 if it was dumped so)"
        )
    kdt = np.float16 if fp16 else np.float32
    vdt = np.int16 if fp16 else np.int64  # what the original dump wrote
    for what, dt, width in (("keys", kdt, dim), ("vals", vdt, 1)):
        if what == "keys" and not load_keys:
            continue
        need = dstore_size * width * np.dtype(dt).itemsize
        have = os.path.getsize(files[what])
        if have < need:
            raise CorruptError(
                f"raw datastore {files[what]} holds {have:,} bytes but {dstore_size:,} x {width} "
                f"{np.dtype(dt).name} needs {need:,}: truncated, or wrong size/dimension/fp16"
            )
    keys = np.memmap(files["keys"], dtype=kdt, mode="r", shape=(dstore_size, dim)) if load_keys else None
    vals = np.memmap(files["vals"], dtype=vdt, mode="r", shape=(dstore_size, 1))[:, 0]
    if in_memory:
        keys, vals = (None if keys is None else np.array(keys)), np.array(vals)
    meta = {"size": dstore_size, "dim": dim, "legacy": True, "complete": True, "keytype": None}
    return keys, vals, meta
