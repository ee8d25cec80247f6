"""Recall of the approximate index, and what our builder costs over bare FAISS.

    python -m benchmarks.recall --synthetic 200000 256            # a synthetic datastore
    python -m benchmarks.recall runs/dstore --index runs/dstore_knn.index --queries q.npy
    python -m benchmarks.recall runs/dstore --ncentroids 4096 --code-size 64 --probe 8,32,128

Prints recall@k (k = 8, 64, 1024) of the IVFPQ index against exact search (chunked
IndexFlatL2 over every key), and, when it builds the index itself, the build time of
knnlm-build-index beside bare FAISS train+add+write on the same sample, chunks and threads,
as a ratio. Queries: --queries (an .npy of shape (Q, D)), else held-out keys for a synthetic
datastore, else keys sampled from the datastore (those are in the index, which flatters
recall@8 a little: each finds itself).
"""

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from knnlm.index import builder as ib
from knnlm.index import load_index, read_index_meta
from knnlm.store.sharded import open_datastore
from knnlm.store.writer import DatastoreWriter

EXACT_CHUNK = 1 << 18  # keys per exact-search block


def synthetic(prefix, n, d, n_queries, seed):
    """Clustered keys with a decaying spectrum (real LM states have low intrinsic dimension)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(16, n // 200), d)).astype(np.float32) * 2
    scale = (np.arange(1, d + 1) ** -0.5).astype(np.float32) * 3  # per-dimension spread, power law
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0].astype(np.float32)  # spread not axis-aligned

    def draw(m):
        return centers[rng.integers(0, len(centers), m)] + (rng.normal(size=(m, d)).astype(np.float32) * scale) @ basis

    w = DatastoreWriter(prefix, d, keytype="synthetic", dict_size=50000, dict_fingerprint="synthetic",
                        expected_size=n, overwrite=True)
    for s in range(0, n, 100_000):
        m = min(100_000, n - s)
        w.add(draw(m), rng.integers(0, 50000, m))
    w.finalize()
    return draw(n_queries)  # held out: drawn alike, not in the datastore


def exact_search(ds, queries, k, metric):
    """Exact top-k over every key, a block at a time, merged in a FAISS result heap."""
    import faiss
    from tqdm import tqdm

    heap = faiss.ResultHeap(len(queries), k, keep_max=metric == "ip")
    ids = np.arange(ds.size)
    for s in tqdm(range(0, ds.size, EXACT_CHUNK), desc="exact search", unit="block"):
        block = ds.gather_keys(ids[s:s + EXACT_CHUNK]).astype(np.float32)
        flat = faiss.IndexFlatL2(ds.dim) if metric == "l2" else faiss.IndexFlatIP(ds.dim)
        flat.add(block)
        dist, nn = flat.search(queries, min(k, len(block)))
        heap.add_result(dist, np.where(nn >= 0, nn + s, -1))
    heap.finalize()
    return heap.I


def bare_faiss(ds, plan, out_path):
    """The same build with FAISS alone: sample, train, add in chunks, write. Returns (train_s, add_s, write_s)."""
    import faiss

    t0 = time.perf_counter()
    rows = np.sort(np.random.default_rng(plan.seed).choice(ds.size, plan.n_train, replace=False))
    x = ds.gather_keys(rows).astype(np.float32)
    metric = faiss.METRIC_L2 if plan.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    index = faiss.index_factory(ds.dim, plan.factory, metric)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False  # as the builder does
    index.train(x)
    del x
    t1 = time.perf_counter()
    for s in range(0, ds.size, plan.chunk):
        e = min(ds.size, s + plan.chunk)
        index.add_with_ids(np.array(ds.keys[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
    t2 = time.perf_counter()
    faiss.write_index(index, out_path)
    return t1 - t0, t2 - t1, time.perf_counter() - t2


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("prefix", nargs="?", help="datastore prefix or shard manifest (omit with --synthetic)")
    p.add_argument("--synthetic", nargs=2, type=int, metavar=("N", "D"), help="make a synthetic datastore of N keys of dimension D")
    p.add_argument("--index", help="an existing index to measure (default: build one here)")
    p.add_argument("--queries", help="an .npy file of queries, shape (Q, D)")
    p.add_argument("--num-queries", type=int, default=500)
    p.add_argument("--ks", default="8,64,1024", help="comma-separated k values")
    p.add_argument("--probe", default="32", help="nprobe value(s), comma-separated")
    p.add_argument("--ncentroids", type=int, default=4096)
    p.add_argument("--code-size", type=int, default=64)
    p.add_argument("--factory", default="IVF{ncentroids},PQ{code_size}")
    p.add_argument("--metric", default="l2", choices=ib.METRICS)
    p.add_argument("--chunk", type=int, default=500_000, help="keys added at a time")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-baseline", action="store_true", help="skip the bare-FAISS build")
    p.add_argument("--repeat", type=int, default=1, help="build this many times each, keep the fastest")
    p.add_argument("--workdir", help="where synthetic data and built indexes go (default: a temporary folder)")
    args = p.parse_args(argv)
    if (args.prefix is None) == (args.synthetic is None):
        p.error("give a datastore prefix or --synthetic N D (one of them)")
    if args.index and args.synthetic:
        p.error("--index measures an existing index: give its datastore prefix, not --synthetic")
    ib.setup_logging()
    logging.getLogger("knnlm").setLevel(logging.WARNING)

    import faiss

    faiss.omp_set_num_threads(args.threads)
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="knnlm-recall-")
        work = Path(tmp.name)

    queries, source = None, None
    if args.synthetic:
        n, d = args.synthetic
        prefix = str(work / f"synthetic_{n}x{d}")
        print(f"writing a synthetic datastore of {n:,} x {d} to {prefix} ...", file=sys.stderr)
        queries, source = synthetic(prefix, n, d, args.num_queries, args.seed), "held-out synthetic"
    else:
        prefix = args.prefix
    ds = open_datastore(prefix)
    if args.queries:
        queries, source = np.load(args.queries).astype(np.float32), args.queries
    elif queries is None:
        rows = np.sort(np.random.default_rng(args.seed + 1).choice(ds.size, min(args.num_queries, ds.size), replace=False))
        queries, source = ds.gather_keys(rows).astype(np.float32), "sampled from the datastore (in the index)"
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != ds.dim:
        p.error(f"queries of shape {queries.shape} do not match the datastore's dimension {ds.dim}")

    summary, bare = None, None
    if args.index:
        index_path = args.index
    else:
        index_path = str(work / "bench.index")
        cfg = {
            "dstore_mmap": prefix, "faiss_index": index_path, "factory": args.factory,
            "ncentroids": args.ncentroids, "code_size": args.code_size, "metric": args.metric,
            "seed": args.seed, "num_keys_to_add_at_a_time": args.chunk, "threads": args.threads,
            "overwrite": True,
        }
        plan = ib.make_plan(cfg)
        # Alternate the two builds and keep each one's fastest run: this evens out a busy machine.
        for r in range(args.repeat):
            if not args.no_baseline:
                print(f"building with bare FAISS ({r + 1}/{args.repeat}) ...", file=sys.stderr)
                t = bare_faiss(ds, plan, str(work / "bare.index"))
                bare = t if bare is None or sum(t) < sum(bare) else bare
            print(f"building with knnlm-build-index ({r + 1}/{args.repeat}) ...", file=sys.stderr)
            with contextlib.redirect_stdout(sys.stderr):  # its own summary table: keep stdout for ours
                s = ib.build_index(cfg)
            summary = s if summary is None or s["wall_seconds"] < summary["wall_seconds"] else summary
    index = load_index(index_path, ds)
    meta = read_index_meta(index_path)

    ks = [k for k in map(int, args.ks.split(",")) if k <= ds.size]
    exact = exact_search(ds, queries, max(ks), meta.get("metric", args.metric))
    ivf = faiss.extract_index_ivf(index)
    print(f"\nrecall@k of {meta.get('factory')} against exact search, {len(queries)} queries ({source}),"
          f" {ds.size:,} keys x {ds.dim}")
    print("  nprobe  " + "".join(f"{'recall@' + str(k):>13}" for k in ks) + f"{'search ms/query':>18}")
    for probe in map(int, args.probe.split(",")):
        ivf.nprobe = probe
        t0 = time.perf_counter()
        _, approx = index.search(queries, max(ks))
        ms = (time.perf_counter() - t0) * 1000 / len(queries)
        recalls = [np.mean([len(np.intersect1d(a[:k], b[:k])) / k for a, b in zip(approx, exact)]) for k in ks]
        print(f"  {probe:>6}  " + "".join(f"{r:>13.3f}" for r in recalls) + f"{ms:>18.2f}")

    if summary is not None:
        m, n = summary["meta"], summary["rows_added"]
        print(f"\nbuild time, {args.threads} threads, best of {args.repeat} ({m['factory']}, "
              f"{m['n_train']:,} training keys, {n:,} keys added)")
        print(f"  {'':<18}{'train':>9}{'add':>9}{'total':>9}{'keys/s (add)':>14}")
        ours = summary["wall_seconds"]
        print(f"  {'knnlm-build-index':<18}{summary['train_seconds']:>8.1f}s{summary['add_seconds']:>8.1f}s"
              f"{ours:>8.1f}s{n / summary['add_seconds']:>14,.0f}")
        if bare is not None:
            bt, ba, bw = bare
            print(f"  {'bare FAISS':<18}{bt:>8.1f}s{ba:>8.1f}s{bt + ba + bw:>8.1f}s{n / ba:>14,.0f}")
            print(f"  knnlm-build-index / bare FAISS: {ours / (bt + ba + bw):.2f}x  (totals: sampling, train, "
                  f"add, writing; ours also checkpoints the trained index and writes metadata)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
