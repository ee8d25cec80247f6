"""Datastore pruning by greedy merging (He, Neubig, Berg-Kirkpatrick, EMNLP 2021, §6): the
datastore's half. Each entry's neighbors come from any index-like object (FAISS's `search`);
opening the index and the `knnlm-prune` command are knnlm.offline.prune, so that the store layer
never imports the index layer.

The order is random within blocks of rows and over blocks, so the neighbor table is read
block by block from disk; memory holds the values and weights (8 bytes an entry), never the keys.
"""

import os

import numpy as np
from tqdm import tqdm

from ..artefacts import AtomicOutput
from ..errors import ConfigError
from .derive import check_out_prefix, copy_rows, derived_writer, open_source
from .npy import GrowingNpy

BLOCK_ROWS = 1 << 16


def neighbor_table(datastore, index, k, path, chunk=BLOCK_ROWS):
    """The k nearest other entries of every entry, (N, k) int64 at `path` (a .npy), by FAISS search."""
    table = GrowingNpy(path, np.int64, (k,), datastore.size)
    try:
        with tqdm(total=datastore.size, unit="key", unit_scale=True, desc="neighbors of every entry") as bar:
            for s in range(0, datastore.size, chunk):
                q = np.ascontiguousarray(np.asarray(datastore.keys[s:s + chunk], dtype=np.float32))
                _, ids = index.search(q, k + 1)
                rows = np.arange(s, s + len(q))[:, None]
                # Drop the entry itself wherever FAISS put it (ties can move it from the front).
                not_self = ids != rows
                first_k = np.cumsum(not_self, axis=1) <= k
                keep = not_self & first_k
                out = np.full((len(q), k), -1, dtype=np.int64)
                counts = keep.sum(1)
                out[np.arange(k)[None, :] < counts[:, None]] = ids[keep]
                table.append(out)
                bar.update(len(q))
        table.close()
    except BaseException:
        table.abandon()
        raise
    return np.load(path, mmap_mode="r")


def greedy_merge(vals, table, seed):
    """Weights (N,) int64 after greedy merging: 0 for entries absorbed, else 1 + what they absorbed."""
    n = len(vals)
    vals = np.asarray(vals)
    weights = np.ones(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(np.arange(0, n, BLOCK_ROWS))
    for b in tqdm(blocks, desc="greedy merging", unit="block"):
        nb = np.asarray(table[b:b + BLOCK_ROWS])
        order = rng.permutation(len(nb))
        for r in order.tolist():
            i = b + r
            if weights[i] <= 0:
                continue
            v = vals[i]
            for j in nb[r].tolist():
                if j >= 0 and weights[j] == 1 and vals[j] == v:
                    weights[j] = 0
                    weights[i] += 1
    return weights


def open_prunable(prefix, out_prefix, overwrite=False):
    """The datastore at `prefix`, once OUT_PREFIX may be written and it is not itself a pruned one."""
    src = open_source(prefix, out_prefix, "a pruned copy")
    check_out_prefix(out_prefix, overwrite, ("weights.npy",))  # before the search, not after it
    if src.meta.get("weights_file"):
        raise ConfigError(f"datastore {prefix} is already pruned: prune the original it came from "
                          f"({src.meta.get('pruned_from')})")
    return src


def prune_with_index(src, index, out_prefix, *, prefix, index_path, k=5, seed=1, overwrite=False):
    """Merge `src` (from open_prunable(prefix, ...)) along `index`'s neighbors and write the merged
    datastore at out_prefix; returns its metadata (which names `prefix` and `index_path`)."""
    # The neighbor table is scratch: a temporary name (removed on failure, on a signal, or by
    # the next run if this one is killed), never committed.
    legacy = f"{out_prefix}_neighbors.tmp.npy"  # what a killed run of an earlier version left
    if os.path.exists(legacy):
        os.remove(legacy)
    scratch = AtomicOutput([f"{out_prefix}_neighbors.npy"], what=f"pruned datastore {out_prefix}",
                           overwrite=True).begin()
    try:
        table = neighbor_table(src, index, k, scratch.path(f"{out_prefix}_neighbors.npy"))
        weights = greedy_merge(src.vals, table, seed)
        del table
    finally:
        scratch.abort()
    kept = np.flatnonzero(weights > 0)
    writer = derived_writer(src, out_prefix, expected_size=len(kept), overwrite=overwrite,
                            pruned_from=os.path.abspath(prefix), pruned_from_fingerprint=src.fingerprint,
                            pruned_from_size=src.size, prune_method="greedy-merge", prune_k=int(k),
                            prune_seed=int(seed), prune_index=os.path.abspath(index_path),
                            weights_file=os.path.basename(f"{out_prefix}_weights.npy"),
                            source_rows_file=os.path.basename(f"{out_prefix}_source_rows.npy"),
                            side_files=("weights.npy", "source_rows.npy"))
    # The source row of each entry: its text (the values before it) is read there
    # (knnlm-explain), the pruned rows no longer being contiguous text.
    np.save(writer.side_path("source_rows.npy"), kept.astype(np.int64))
    blocks = (kept[s:s + BLOCK_ROWS] for s in range(0, len(kept), BLOCK_ROWS))
    return copy_rows(src, writer, blocks, side=("weights.npy", lambda ids: weights[ids].astype(np.int32),
                                                (np.int32, (), len(kept))))
