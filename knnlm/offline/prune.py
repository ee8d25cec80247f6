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

This module opens the index and is the command; the datastore's half (the neighbor table, the
merging, writing the merged datastore) is knnlm.store.prune.
"""

import argparse
import sys

import numpy as np

from ..errors import ConfigError
from ..index import load_index
from ..index.faiss_utils import set_nprobe
from ..lifecycle import run_main
# The whole method under one name: the datastore's half is re-exported.
from ..store.prune import BLOCK_ROWS, greedy_merge, neighbor_table, open_prunable, prune_with_index

__all__ = ["BLOCK_ROWS", "greedy_merge", "main", "neighbor_table", "prune"]


def prune(prefix, index_path, out_prefix, *, k=5, seed=1, nprobe=32, overwrite=False):
    """Write the merged datastore at out_prefix; returns its metadata."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"--k must be an integer of at least 1, got {k!r}")
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or nprobe < 1:
        raise ConfigError(f"--probe must be an integer of at least 1 (IVF lists visited per search), got {nprobe!r}")
    src = open_prunable(prefix, out_prefix, overwrite)
    index = load_index(index_path, datastore=src)
    set_nprobe(index, nprobe)
    return prune_with_index(src, index, out_prefix, prefix=prefix, index_path=index_path, k=k, seed=seed,
                            overwrite=overwrite)


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
