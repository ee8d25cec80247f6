"""Where kNN retrieval time goes after FAISS: each stage of knnlm.Retriever timed in-process,
with the two session-4 changes on and off side by side on the same batches.

    .venv/bin/python -m benchmarks.retrieval_stages INDEX [--k-factor 2] \
        [--queries bench_runs/index_choice_demo/valid_keys.npy] [--n 0] [--batch 4096] \
        [--dstore demo_runs/austen/dstore/train]

Queries: the first --n rows (0: all) of an .npy of the valid split's keys (the one
benchmarks/index_choice.py dumps), in eval-sized batches. Each batch is searched by FAISS once;
then both variants recompute, select and gather values from that same FAISS result, in
alternating order batch by batch:

  before: the fused recompute one block of 4M pairs at a time, and the k kept sorted nearest
          first (the behaviour before session 4, still what an export asks for);
  after:  blocks of 2M pairs, two at a time (one block's sort overlaps the other's FAISS
          kernel), and the k kept in any order (what the scorer asks for).

The two must keep the same neighbors with the same distances (checked on every batch).
"""

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import knnlm.retrieval.faiss_search as retrieval
from knnlm.index import load_index
from knnlm.store.datastore import Datastore

VARIANTS = {  # name -> (SORT_BLOCK_PAIRS, RECOMPUTE_BLOCKS_IN_FLIGHT, nearest_first)
    "before": (1 << 22, 1, True),
    "after": (retrieval.SORT_BLOCK_PAIRS, retrieval.RECOMPUTE_BLOCKS_IN_FLIGHT, False),
}


def stages(r, q, ids, variant):
    """Retriever r's steps after FAISS search, timed: ({stage: seconds}, dists, ids)."""
    block_pairs, in_flight, nearest_first = VARIANTS[variant]
    retrieval.SORT_BLOCK_PAIRS, retrieval.RECOMPUTE_BLOCKS_IN_FLIGHT = block_pairs, in_flight
    t0 = time.perf_counter()
    valid, safe = r._valid_ids(ids)
    d = r._fused_distances(q, safe)
    t1 = time.perf_counter()
    if r.k_search > r.k:
        d, ids = r._keep_nearest(d, ids, valid, nearest_first)
        valid, safe = r._valid_ids(ids)
    t2 = time.perf_counter()
    r.datastore.gather_vals(safe)
    t3 = time.perf_counter()
    return dict(recompute=t1 - t0, keep=t2 - t1, values=t3 - t2), torch.as_tensor(d), ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index")
    p.add_argument("--dstore", default="demo_runs/austen/dstore/train")
    p.add_argument("--queries", default="bench_runs/index_choice_demo/valid_keys.npy")
    p.add_argument("--n", type=int, default=0)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--k-factor", type=float, default=1.0)
    a = p.parse_args(argv)

    import faiss

    ds = Datastore.open(a.dstore, in_memory=True)  # as --move-dstore-to-mem
    Q = np.load(a.queries, mmap_mode="r")
    n = len(Q) if a.n <= 0 else min(a.n, len(Q))
    index = load_index(a.index, datastore=ds)
    # One Retriever per variant over the same index: each keeps its own recompute thread pool.
    rs = {v: retrieval.FaissRetriever(index, ds, k=a.k, nprobe=a.nprobe, k_factor=a.k_factor) for v in VARIANTS}
    r = rs["after"]
    total = {v: defaultdict(float) for v in VARIANTS}
    search = 0.0
    for b, s in enumerate(range(0, n, a.batch)):
        q = np.ascontiguousarray(Q[s:s + a.batch], dtype=np.float32)
        t0 = time.perf_counter()
        _, ids = r.index.search(q, r.k_search)
        search += time.perf_counter() - t0
        out = {}
        for v in (list(VARIANTS) if b % 2 == 0 else list(VARIANTS)[::-1]):
            t, d, i = stages(rs[v], q, ids.copy(), v)
            out[v] = (d, i)
            for k, x in t.items():
                total[v][k] += x
        (d0, i0), (d1, i1) = out.values()
        if not (torch.equal(d0.sort(1).values, d1.sort(1).values) and np.array_equal(np.sort(i0, 1), np.sort(i1, 1))):
            raise SystemExit(f"batch {b}: the variants kept different neighbors")

    print(f"{n:,} queries in batches of {a.batch}, k {a.k}, k-factor {a.k_factor:g} ({r.k_search} candidates), "
          f"nprobe {a.nprobe}, {Path(a.index).name}; datastore {ds.size:,} x {ds.dim}; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads, torch {torch.get_num_threads()} threads\n")
    print(f"FAISS search (shared by both): {search:.2f} s\n")
    print("| stage | before s | after s | before / after |")
    print("|---|---:|---:|---:|")
    for k in ("recompute", "keep", "values"):
        if k != "keep" or r.k_search > r.k:
            print(f"| {k} | {total['before'][k]:.2f} | {total['after'][k]:.2f} | "
                  f"{total['before'][k] / max(total['after'][k], 1e-9):.2f}x |")
    tb, ta = sum(total["before"].values()), sum(total["after"].values())
    print(f"| all after FAISS | {tb:.2f} | {ta:.2f} | {tb / ta:.2f}x |")


if __name__ == "__main__":
    main()
