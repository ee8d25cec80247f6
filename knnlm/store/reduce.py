"""Keys of lower dimension (He, Neubig, Berg-Kirkpatrick, EMNLP 2021, §5): PCA or OPQ.

    knnlm-reduce PREFIX OUT_PREFIX --dim D' [--method pca|opq] [--num-keys-to-train N] [--seed S]

A FAISS linear transform (faiss.PCAMatrix, or faiss.OPQMatrix: a rotation, d' = d) is trained
on a seeded sample of the keys and applied to every key, streamed in blocks. OUT_PREFIX is a
complete datastore of the reduced keys (the same values, in the same order) with the transform
in OUT_PREFIX_transform.faiss; its metadata names the source, the method and the dimensions.
Build its index as any datastore's; scoring with it transforms each query the same way before
searching and before the exact recompute, which then reads the reduced keys.
"""

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

from ..errors import ConfigError, DiskSpaceError
from ..lifecycle import run_main
from .derive import check_out_prefix, derived_writer, open_source

BLOCK_ROWS = 1 << 16
METHODS = ("pca", "opq")


def train_transform(keys_sample, dim_out, method):
    import faiss

    d = keys_sample.shape[1]
    if method == "pca":
        t = faiss.PCAMatrix(d, dim_out)
    elif method == "opq":
        if dim_out != d or d % 8:
            raise ConfigError(f"--method opq rotates the keys for product quantization: it keeps the dimension "
                              f"({d}, divisible by 8); use --method pca to reduce it")
        t = faiss.OPQMatrix(d, d // 8)
    else:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    t.train(np.ascontiguousarray(keys_sample, dtype=np.float32))
    return t


def reduce_keys(prefix, out_prefix, dim, *, method="pca", n_train=1_000_000, seed=1, overwrite=False):
    """Write the reduced datastore at out_prefix; returns its metadata."""
    import faiss

    src = open_source(prefix, out_prefix, "a reduced copy")
    if src.meta.get("transform"):
        raise ConfigError(f"datastore {prefix} already holds transformed keys; reduce the original "
                          f"({src.meta['transform'].get('source')})")
    if not 1 <= dim <= src.dim:
        raise ConfigError(f"--dim must lie in [1, {src.dim}] (the keys' dimension), got {dim}")
    check_out_prefix(out_prefix, overwrite, ("transform.faiss",))  # before training, not after
    rng = np.random.default_rng(seed)
    n = min(n_train, src.size)
    rows = np.sort(rng.choice(src.size, size=n, replace=False))
    transform = train_transform(np.asarray(src.gather_keys(rows), dtype=np.float32), dim, method)
    del rows
    tfile = f"{out_prefix}_transform.faiss"
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    transform_meta = {"method": method, "d_in": int(src.dim), "d_out": int(dim), "file": os.path.basename(tfile),
                      "n_train": int(n), "seed": int(seed), "source": os.path.abspath(prefix),
                      "source_fingerprint": src.fingerprint}
    writer = derived_writer(src, out_prefix, dim=dim, expected_size=src.size, overwrite=overwrite,
                            transform=transform_meta, side_files=("transform.faiss",))
    try:
        try:
            faiss.write_VectorTransform(transform, writer.side_path("transform.faiss"))
        except RuntimeError as e:  # FAISS's word for a failed write
            raise DiskSpaceError(f"reduced datastore {out_prefix}: FAISS could not write {tfile} "
                                 f"({str(e).strip().splitlines()[-1] if str(e).strip() else 'write failed'}): the disk "
                                 f"is full, a file-size limit was reached or the place is not writable; nothing "
                                 f"complete was replaced. Free space or write elsewhere, then run it again") from None
        with tqdm(total=src.size, unit="key", unit_scale=True, desc=f"{method} {src.dim} -> {dim}") as bar:
            for s in range(0, src.size, BLOCK_ROWS):
                x = np.ascontiguousarray(np.asarray(src.keys[s:s + BLOCK_ROWS], dtype=np.float32))
                writer.add(transform.apply(x), np.asarray(src.vals[s:s + BLOCK_ROWS]))
                bar.update(len(x))
        return writer.finalize()
    except BaseException:
        writer.abandon()
        raise


def main(argv=None):
    p = argparse.ArgumentParser(prog="knnlm-reduce", description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", metavar="PREFIX", help="source datastore prefix")
    p.add_argument("out_prefix", metavar="OUT_PREFIX", help="prefix of the reduced datastore")
    p.add_argument("--dim", type=int, required=True, help="dimension of the reduced keys")
    p.add_argument("--method", choices=METHODS, default="pca", help="pca (default) or opq (a rotation, same dimension)")
    p.add_argument("--num-keys-to-train", type=int, default=1_000_000, help="keys sampled to train the transform")
    p.add_argument("--seed", type=int, default=1, help="seed of the sample (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a complete datastore at OUT_PREFIX")
    args = p.parse_args(argv)
    return run_main("knnlm-reduce", lambda: _run(args))


def _run(args):
    meta = reduce_keys(args.prefix, args.out_prefix, args.dim, method=args.method,
                       n_train=args.num_keys_to_train, seed=args.seed, overwrite=args.overwrite)
    t = meta["transform"]
    print(f"wrote {args.out_prefix}: {meta['size']:,} keys, {t['method']} {t['d_in']} -> {t['d_out']}, "
          f"{meta['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    sys.exit(main())
