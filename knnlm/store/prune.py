"""Datastore pruning by greedy merging (He, Neubig, Berg-Kirkpatrick, EMNLP 2021, §6).

    knnlm-prune PREFIX INDEX OUT_PREFIX [--k 5] [--seed 1] [--probe 32] [--overwrite]

Every entry's k nearest neighbors are found with INDEX (built from PREFIX). The entries are
then visited in a seeded random order; an entry still in the datastore absorbs each of its
neighbors that carries the same value and has absorbed nothing and been absorbed by nothing
yet: that neighbor leaves the datastore and the entry's weight grows by one. OUT_PREFIX is a
complete datastore of the entries left, in their original order, with OUT_PREFIX_weights.npy
(int32, one per entry: how many original entries it stands for) and OUT_PREFIX_source_rows.npy
(int64, one per entry: its row in PREFIX). Scoring weighs each
neighbor's softmax term by it, p(k_i) ∝ w_i exp(-d_i / T) (`knnlm.KNNLM`), so an entry that
absorbed m others counts as they would have, had they all been retrieved at its distance.

The order is random within blocks of rows and over blocks, so the neighbor table is read
block by block from disk; memory holds the values and weights (8 bytes an entry), never the keys.
"""

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

from ..artefacts import AtomicOutput
from ..errors import ConfigError
from ..lifecycle import run_main
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


def prune(prefix, index_path, out_prefix, *, k=5, seed=1, nprobe=32, overwrite=False):
    """Write the merged datastore at out_prefix; returns its metadata."""
    from ..index import load_index
    from ..index.faiss_utils import set_nprobe

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"--k must be an integer of at least 1, got {k!r}")
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise ConfigError(f"--probe must be an integer of at least 1 (IVF lists visited per search), got {nprobe!r}")
    src = open_source(prefix, out_prefix, "a pruned copy")
    check_out_prefix(out_prefix, overwrite, ("weights.npy",))  # before the search, not after it
    if src.meta.get("weights_file"):
        raise ConfigError(f"datastore {prefix} is already pruned: prune the original it came from "
                          f"({src.meta.get('pruned_from')})")
    index = load_index(index_path, datastore=src)
    set_nprobe(index, nprobe)
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


def main(argv=None):
    p = argparse.ArgumentParser(prog="knnlm-prune", description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", metavar="PREFIX", help="source datastore prefix")
    p.add_argument("index", metavar="INDEX", help="an index built from PREFIX (finds each entry's neighbors)")
    p.add_argument("out_prefix", metavar="OUT_PREFIX", help="prefix of the pruned datastore")
    p.add_argument("--k", type=int, default=5, help="neighbors each entry may absorb (default %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the visiting order (default %(default)s)")
    p.add_argument("--probe", type=int, default=32, help="IVF lists visited per search (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete datastore at OUT_PREFIX")
    args = p.parse_args(argv)
    return run_main("knnlm-prune", lambda: _run(args))


def _run(args):
    meta = prune(args.prefix, args.index, args.out_prefix, k=args.k, seed=args.seed, nprobe=args.probe,
                 overwrite=args.overwrite)
    print(f"wrote {args.out_prefix}: {meta['size']:,} of {meta['pruned_from_size']:,} entries "
          f"({100 * meta['size'] / meta['pruned_from_size']:.1f}%), weights in {meta['weights_file']}")


if __name__ == "__main__":
    sys.exit(main())
