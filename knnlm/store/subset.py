"""A random fraction of a datastore, as a new complete datastore (the paper's Figure 2a).

    python -m knnlm.subset PREFIX FRACTION OUT_PREFIX [--seed S] [--overwrite]

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

from ..errors import ConfigError, KNNLMError
from .datastore import Datastore, DatastoreWriter
from .npy import GrowingNpy

# The random stream is drawn per block of this many source rows: a constant, so that the
# selection depends only on (N, fraction, seed), never on memory settings. 65,536 rows of
# 1024 fp32 keys are 256 MiB at most.
BLOCK_ROWS = 1 << 16
# numpy's hypergeometric sampler needs ngood + nbad below this.
_HYPERGEOMETRIC_MAX = 10**9
# Metadata the writer sets itself; everything else is copied from the source.
_WRITER_FIELDS = {"format_version", "uuid", "complete", "size", "dim", "keys_dtype", "vals_dtype",
                  "keytype", "dict_size", "dict_fingerprint", "model_fingerprint", "started",
                  "finished", "versions", "bytes"}


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
    if prefix.endswith(".json"):
        raise ConfigError(f"{prefix} is a shard manifest: take the subset of each shard instead")
    src = Datastore.open(prefix)
    if src.meta.get("legacy") or src.meta.get("dict_fingerprint") is None:
        raise KNNLMError(
            f"datastore {prefix} has no metadata (the original code's raw format): a subset "
            f"could not say which model and dictionary it belongs to; dump it with this code"
        )
    if os.path.abspath(out_prefix) == os.path.abspath(prefix):
        raise ConfigError(f"OUT_PREFIX {out_prefix} is the source datastore itself; choose another prefix")
    n = subset_size(src.size, fraction)
    m = src.meta
    extra = {key: value for key, value in m.items() if key not in _WRITER_FIELDS}
    extra.update(subset_of=os.path.abspath(prefix), subset_of_fingerprint=src.fingerprint,
                 subset_of_size=src.size, fraction=float(fraction), seed=int(seed),
                 source_rows_file=os.path.basename(f"{out_prefix}_source_rows.npy"))  # next to the keys
    writer = DatastoreWriter(
        out_prefix, src.dim, keytype=m["keytype"], fp16=m["keys_dtype"] == "float16",
        dict_size=m["dict_size"], dict_fingerprint=m["dict_fingerprint"],
        model_fingerprint=m.get("model_fingerprint"), expected_size=n, overwrite=overwrite,
        extra=extra,
    )
    rows_file = GrowingNpy(f"{out_prefix}_source_rows.npy", np.int64, (), n)
    try:
        for start, rows in select_rows(src.size, n, seed):
            ids = rows + start  # sorted: the memory map is read forward, only the pages needed
            writer.add(np.asarray(src.keys[ids]), np.asarray(src.vals[ids]))
            rows_file.append(ids)
        rows_file.close()
        return writer.finalize()
    except BaseException:
        rows_file.abandon()
        writer.abandon()
        raise


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m knnlm.subset", description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", metavar="PREFIX", help="source datastore prefix (PREFIX_keys.npy ...)")
    p.add_argument("fraction", metavar="FRACTION", type=float, help="fraction of rows to keep, in (0, 1]")
    p.add_argument("out_prefix", metavar="OUT_PREFIX", help="prefix of the new datastore")
    p.add_argument("--seed", type=int, default=1, help="seed of the row selection (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete datastore at OUT_PREFIX")
    args = p.parse_args(argv)
    try:
        meta = make_subset(args.prefix, args.fraction, args.out_prefix, seed=args.seed, overwrite=args.overwrite)
    except KNNLMError as e:
        print(f"knnlm.subset: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_prefix}: {meta['size']:,} of {meta['subset_of_size']:,} entries "
          f"(fraction {args.fraction:g}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
