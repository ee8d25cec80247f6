"""A random fraction of a datastore, as a new complete datastore (the paper's Figure 2a).

    knnlm-subset PREFIX FRACTION OUT_PREFIX [--seed S] [--overwrite]     (or python -m knnlm.subset)

Keeps exactly round(FRACTION * N) rows, drawn uniformly without replacement and kept in their
original order, streamed block by block: memory is one block of keys whatever N is. The
output carries the source's metadata (key type, dictionary and model fingerprints, what was
dumped) plus `subset_of`, `fraction`, `seed`; OUT_PREFIX_source_rows.npy holds, for each
row, its row in the source. The same (source size, FRACTION, seed) always selects the same rows.
"""

import argparse
import math
import os
import sys

import numpy as np

from ..errors import ConfigError
from ..lifecycle import run_main
from .derive import copy_rows, derived_writer, open_source

# The random stream is drawn per block of this many source rows: a constant, so that the
# selection depends only on (N, fraction, seed), never on memory settings. 65,536 rows of
# 1024 fp32 keys are 256 MiB at most.
BLOCK_ROWS = 1 << 16
# numpy's hypergeometric sampler needs ngood + nbad below this.
_HYPERGEOMETRIC_MAX = 10**9


def subset_size(total, fraction):
    """Rows kept: round(fraction * total), at least 1."""
    if not (0.0 < fraction <= 1.0) or not math.isfinite(fraction):
        raise ConfigError(f"FRACTION must lie in (0, 1], got {fraction}")
    return max(1, min(total, int(round(fraction * total))))


def select_rows(total, n, seed):
    """Yield (block start, sorted rows within the block) choosing n of `total` rows uniformly.

    Sequential sampling: the number kept from each block is hypergeometric given how many are
    still to pick among the rows left, so every n-subset is equally likely and exactly n are
    kept without ever holding all N row ids.
    """
    if not 0 < n <= total:
        raise ConfigError(f"cannot choose {n} of {total} rows")
    rng = np.random.default_rng(seed)
    need = n
    for start in range(0, total, BLOCK_ROWS):
        c = min(BLOCK_ROWS, total - start)
        left = total - start  # rows not yet visited, this block included
        if need == 0:
            return
        if left < _HYPERGEOMETRIC_MAX:
            m = int(rng.hypergeometric(c, left - c, need))
        else:  # above numpy's limit a binomial is indistinguishable; the clip keeps n exact
            m = int(rng.binomial(need, c / left))
        m = min(max(m, need - (left - c)), c, need)
        if m:
            yield start, np.sort(rng.choice(c, size=m, replace=False))
        need -= m


def make_subset(prefix, fraction, out_prefix, *, seed=1, overwrite=False):
    """Write the subset datastore at out_prefix; returns its metadata."""
    src = open_source(prefix, out_prefix, "a subset")
    n = subset_size(src.size, fraction)
    writer = derived_writer(src, out_prefix, expected_size=n, overwrite=overwrite, side_files=("source_rows.npy",),
                            subset_of=os.path.abspath(prefix), subset_of_fingerprint=src.fingerprint,
                            subset_of_size=src.size, fraction=float(fraction), seed=int(seed),
                            source_rows_file=os.path.basename(f"{out_prefix}_source_rows.npy"))  # next to the keys
    blocks = (rows + start for start, rows in select_rows(src.size, n, seed))  # sorted within each block
    return copy_rows(src, writer, blocks, side=("source_rows.npy", lambda ids: ids, (np.int64, (), n)))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m knnlm.subset", description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", metavar="PREFIX", help="source datastore prefix (PREFIX_keys.npy ...)")
    p.add_argument("fraction", metavar="FRACTION", type=float, help="fraction of rows to keep, in (0, 1]")
    p.add_argument("out_prefix", metavar="OUT_PREFIX", help="prefix of the new datastore")
    p.add_argument("--seed", type=int, default=1, help="seed of the row selection (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete datastore at OUT_PREFIX")
    args = p.parse_args(argv)
    return run_main("knnlm.subset", lambda: _run(args))


def _run(args):
    meta = make_subset(args.prefix, args.fraction, args.out_prefix, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.out_prefix}: {meta['size']:,} of {meta['subset_of_size']:,} entries "
          f"(fraction {args.fraction:g}, seed {args.seed})")


if __name__ == "__main__":
    sys.exit(main())
