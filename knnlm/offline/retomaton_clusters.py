"""RetoMaton's optional states (Alon et al., ICML 2022, §3): datastore entries clustered by k-means
over their keys, so that a pointer also brings the other members of its cluster.

    knnlm-retomaton-cluster PREFIX OUT.npy --clusters C [--sample N] [--niter 20] [--seed 1]

k-means (faiss.Kmeans) is trained on a seeded sample of the keys, then every entry is assigned
to its nearest centroid, streamed in blocks. OUT.npy holds one int32 cluster id per entry;
OUT.npy.meta.json names the datastore (prefix and fingerprint), C, the sample and the seed, and
is written last: a file of another datastore, or an incomplete one, is refused by name.
`--retomaton-cluster OUT.npy` (or `RetrievalOptions(retomaton=True, retomaton_cluster="OUT.npy")`) uses it.
"""

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from ..artefacts import AtomicOutput, read_json
from ..errors import ConfigError, CorruptError, IncompleteError, MismatchError
from ..lifecycle import run_main

BLOCK_ROWS = 1 << 16


def meta_path(path):
    return f"{path}.meta.json"


def cluster_datastore(prefix, out, n_clusters, *, sample=200_000, niter=20, seed=1, overwrite=False):
    """Write the cluster of every entry of datastore `prefix` to `out` (.npy); returns the metadata."""
    import faiss

    from ..store.datastore import Datastore

    ds = Datastore.open(str(prefix))
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or \
            not 1 <= n_clusters <= min(sample, ds.size):
        raise ConfigError(f"--clusters must lie in [1, {min(sample, ds.size):,}] (the keys sampled), got {n_clusters}")
    if os.path.abspath(out) in {os.path.abspath(p) for p in (f"{prefix}_keys.npy", f"{prefix}_vals.npy", f"{prefix}_meta.json")}:
        raise ConfigError(f"OUT {out} is a file of the datastore {prefix} itself; choose another path")
    # Both files are written under temporary names and moved into place only once whole: an
    # existing OUT (any file) is replaced only with --overwrite, and even then not before.
    output = AtomicOutput([out, meta_path(out)], what=f"RetoMaton clusters {out}", overwrite=overwrite,
                          describe_existing=lambda p: (f"{out} already holds clusters" if os.path.exists(meta_path(out))
                                                       else f"{p} already exists and is not a clusters file of "
                                                            f"this command (another tool's file, or a datastore's)"))
    with output:
        rng = np.random.default_rng(seed)
        n = min(sample, ds.size)
        rows = np.sort(rng.choice(ds.size, size=n, replace=False))
        x = np.ascontiguousarray(np.asarray(ds.gather_keys(rows), dtype=np.float32))
        km = faiss.Kmeans(ds.dim, int(n_clusters), niter=int(niter), seed=int(seed), verbose=False)
        km.train(x)
        del x
        ids = np.lib.format.open_memmap(output.path(out), mode="w+", dtype=np.int32, shape=(ds.size,))
        for s in tqdm(range(0, ds.size, BLOCK_ROWS), desc="assigning entries to clusters", unit="block"):
            keys = np.ascontiguousarray(np.asarray(ds.keys[s:s + BLOCK_ROWS], dtype=np.float32))
            ids[s:s + len(keys)] = km.index.search(keys, 1)[1][:, 0]
        ids.flush()
        del ids
        meta = {"kind": "retomaton-clusters", "method": "kmeans", "datastore": os.path.abspath(ds.prefix),
                "datastore_fingerprint": ds.fingerprint, "size": int(ds.size), "clusters": int(n_clusters),
                "sample": int(n), "niter": int(niter), "seed": int(seed), "complete": True}
        with open(output.path(meta_path(out)), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
        # The old metadata goes first: a reader never pairs new ids with old metadata.
        output.commit(before=lambda: os.path.exists(meta_path(out)) and os.remove(meta_path(out)))
    return meta


def load_clusters(path, datastore):
    """(N,) int64 cluster ids of `datastore`'s entries from a knnlm-retomaton-cluster file."""
    if not os.path.exists(meta_path(path)):
        raise IncompleteError(f"RetoMaton clusters {path}: no {meta_path(path)} (not written by "
                              f"knnlm-retomaton-cluster, or interrupted): cluster again")
    meta = read_json(meta_path(path), f"RetoMaton clusters {path}")
    if meta.get("kind") != "retomaton-clusters" or not meta.get("complete"):
        raise IncompleteError(f"RetoMaton clusters {path}: incomplete or not a clusters file; cluster again")
    if meta.get("datastore_fingerprint") != datastore.fingerprint:
        raise MismatchError(f"RetoMaton clusters {path} belong to datastore {meta.get('datastore')} (fingerprint "
                            f"{meta.get('datastore_fingerprint')}), not {datastore.prefix} ({datastore.fingerprint}): "
                            f"cluster this datastore with knnlm-retomaton-cluster")
    try:
        ids = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise CorruptError(f"RetoMaton clusters {path} are unreadable ({e}); cluster again") from None
    if ids.shape != (datastore.size,):
        raise CorruptError(f"RetoMaton clusters {path} hold {ids.shape} ids for {datastore.size:,} entries; cluster again")
    return np.asarray(ids, dtype=np.int64)


class ClusterMembers:
    """The entries of each cluster, in row order (a CSR table), and the extension of pointers by them."""

    def __init__(self, clusters):
        self.of = np.asarray(clusters, dtype=np.int64)
        self.rows = np.argsort(self.of, kind="stable")
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(self.of))])

    def extend(self, pointers, limit):
        """The pointers (nearest first), then the other members of their clusters: clusters with
        more pointers first (ties: the cluster of the nearer pointer first), members in row
        order, no entry twice, at most `limit` in all."""
        p = np.asarray(pointers, dtype=np.int64)
        if len(p) >= limit or len(p) == 0:
            return p[:limit]
        cl = self.of[p]
        uniq, first, counts = np.unique(cl, return_index=True, return_counts=True)
        parts, room = [p], limit - len(p)
        for c in uniq[np.lexsort((first, -counts))]:
            members = self.rows[self.starts[c]:self.starts[c + 1]]
            members = members[~np.isin(members, p)][:room]
            parts.append(members)
            room -= len(members)
            if room <= 0:
                break
        return np.concatenate(parts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="knnlm-retomaton-cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", metavar="PREFIX", help="datastore prefix")
    p.add_argument("out", metavar="OUT.npy", help="where the cluster ids go (and OUT.npy.meta.json)")
    p.add_argument("--clusters", type=int, required=True, help="number of k-means clusters (states)")
    p.add_argument("--sample", type=int, default=200_000, help="keys sampled to train k-means (default %(default)s)")
    p.add_argument("--niter", type=int, default=20, help="k-means iterations (default %(default)s)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT (only once the new one is whole)")
    a = p.parse_args(argv)
    return run_main("knnlm-retomaton-cluster", lambda: _run(a))


def _run(a):
    meta = cluster_datastore(a.prefix, a.out, a.clusters, sample=a.sample, niter=a.niter, seed=a.seed,
                             overwrite=a.overwrite)
    sizes = np.bincount(np.load(a.out), minlength=meta["clusters"])
    print(f"wrote {a.out}: {meta['size']:,} entries in {meta['clusters']:,} clusters (sizes: median "
          f"{int(np.median(sizes))}, max {int(sizes.max())}, empty {int((sizes == 0).sum())})")


if __name__ == "__main__":
    sys.exit(main())
