"""Which IVFPQ index for a datastore: search time vs kNN-LM perplexity, side by side.

    .venv/bin/python -m benchmarks.index_choice [--demo-dir demo_runs/austen] \
        [--factories IVF1024,PQ64 IVF4096,PQ64] [--queries 16384] [--nprobe 32 ...]

Uses the demo's model, training datastore, valid-split export and tuned lambda/T (`make demo`).
The valid split is dumped once (its keys are the queries, in the export's order); each factory
is built with knnlm-build-index (the demo's own index is reused for its factory); then, in this
process and on the same queries, each (index, nprobe, k-factor) retrieves k = 1024 neighbors
in batches of 4,096 like fairseq-eval-lm's through knnlm.Retriever (FAISS search, exact
distances, with a k-factor above 1 the k nearest of k x factor candidates; "retrieval s" is
all of it), and the interpolated perplexity is computed with the export's LM
log-probabilities. Recall@8 and @1024 against
exact brute-force neighbors (faiss IndexFlatL2 over the whole datastore) on the first
--recall-queries queries.
"""

import argparse
import json
import math
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import BIN, REPO

BATCH = 4096


def sh(cmd, log):
    with open(log, "w") as f:
        subprocess.run([str(c) for c in cmd], check=True, stdout=f, stderr=subprocess.STDOUT)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="demo_runs/austen")
    p.add_argument("--work", default="bench_runs/index_choice")
    p.add_argument("--factories", nargs="+", default=["IVF1024,PQ64", "IVF4096,PQ64"])
    p.add_argument("--nprobe", nargs="+", type=int, default=[32])
    p.add_argument("--k-factors", nargs="+", type=float, default=[1.0],
                   help="--knn-k-factor values: candidates = k x factor, re-ranked by exact distance")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--queries", type=int, default=16384)
    p.add_argument("--recall-queries", type=int, default=1024)
    p.add_argument("--tokens-per-sample", type=int, default=256, help="as the demo's export was made")
    p.add_argument("--context-window", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8192)
    a = p.parse_args(argv)

    import faiss

    from knnlm.store.datastore import Datastore
    from knnlm.offline.export import load_export
    from knnlm.retrieval import FaissRetriever
    from knnlm.scoring import interpolate, knn_log_prob, neighbor_scores

    demo, work = Path(a.demo_dir), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    best = json.loads((demo / "tune" / "best.json").read_text())
    lmbda, temp = best["best_lambda"], best["best_temperature"]
    train = Datastore.open(str(demo / "dstore" / "train"), in_memory=True)
    export = load_export(str(demo / "export_valid"))

    # The queries: the valid split's keys, dumped with the export's settings (same order).
    qprefix = work / "valid"
    if not Path(f"{qprefix}_meta.json").exists():
        print("dumping the valid split's keys ...", flush=True)
        sh([BIN / "fairseq-eval-lm", demo / "data-bin", "--path", demo / "checkpoints" / "checkpoint_last.pt",
            "--user-dir", REPO / "fairseq_plugins", "--task", "knnlm", "--gen-subset", "valid",
            "--tokens-per-sample", a.tokens_per_sample, "--context-window", a.context_window,
            "--max-tokens", a.max_tokens,
            "--cpu", "--num-workers", 0, "--save-knnlm-dstore", "--dstore-mmap", qprefix, "--overwrite"],
           work / "dump_valid.log")
    qds = Datastore.open(str(qprefix))
    n = min(a.queries, qds.size)
    queries = np.array(qds.keys[:n], dtype=np.float32)
    targets = torch.from_numpy(np.array(qds.vals[:n], dtype=np.int64))
    lp_lm = torch.from_numpy(np.array(export.lp_lm[:n]))
    assert np.array_equal(targets.numpy(), np.array(export.targets[:n])), "dump and export disagree"

    # Exact neighbors for recall, brute force.
    nr = min(a.recall_queries, n)
    flat = faiss.IndexFlatL2(train.dim)
    flat.add(np.asarray(train.keys, dtype=np.float32))
    _, exact_ids = flat.search(queries[:nr], a.k)
    del flat

    rows = []
    for factory in a.factories:
        index_path = demo / "dstore" / "train_knn.index"
        meta = json.loads(Path(f"{index_path}.meta.json").read_text()) if Path(f"{index_path}.meta.json").exists() else {}
        if meta.get("factory") != factory:
            index_path = work / (factory.replace(",", "_") + ".index")
            if not index_path.exists():
                print(f"building {factory} ...", flush=True)
                t0 = time.perf_counter()
                sh([BIN / "knnlm-build-index", f"dstore_mmap={demo / 'dstore' / 'train'}", f"faiss_index={index_path}",
                    f"factory='{factory}'", "num_keys_to_train=200000", "seed=1"], work / f"build_{index_path.stem}.log")
                print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
        index = faiss.read_index(str(index_path))  # each Retriever below sets its own nprobe on it
        for nprobe in a.nprobe:
            for kf in a.k_factors:
                r = FaissRetriever(index, train, k=a.k, nprobe=nprobe, sim_func="l2", k_factor=kf)
                r(queries[:256])  # warm up
                t_ret = 0.0
                lp = torch.empty(n)
                for s in range(0, n, BATCH):
                    t0 = time.perf_counter()
                    dist, vals, valid, ids = r(queries[s:s + BATCH], return_ids=True)
                    t_ret += time.perf_counter() - t0
                    lp_knn = knn_log_prob(neighbor_scores(dist, "l2", temp), vals, targets[s:s + BATCH], valid)
                    lp[s:s + BATCH] = interpolate(lp_lm[s:s + BATCH], lp_knn, lmbda)
                    if s == 0:  # nearest first by exact distance, for recall@m
                        order = np.argsort(dist[:nr].numpy(), axis=1, kind="stable")
                        ids0 = np.take_along_axis(ids[:nr].numpy(), order, 1)
                rec = [np.mean([len(set(ids0[i, :m]) & set(exact_ids[i, :m])) / m for i in range(nr)]) for m in (8, a.k)]
                rows.append((factory, nprobe, kf, t_ret, math.exp(-lp.mean().item()), *rec))
                print(f"  {factory} nprobe={nprobe} k-factor={kf:g}: retrieval {t_ret:.2f} s, ppl {rows[-1][4]:.3f}", flush=True)

    base = math.exp(-lp_lm.mean().item())
    print(f"\n{n:,} valid queries, k={a.k}, datastore {train.size:,} x {train.dim}, lambda={lmbda}, T={temp}; "
          f"LM perplexity on them {base:.3f}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads\n")
    print("| index | nprobe | k-factor | retrieval s | queries/s | kNN-LM ppl | recall@8 | recall@%d |" % a.k)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for f, npb, kf, tr, ppl, r8, rk in rows:
        print(f"| {f} | {npb} | {kf:g} | {tr:.2f} | {n / tr:,.0f} | {ppl:.3f} | {r8:.3f} | {rk:.3f} |")


if __name__ == "__main__":
    main()
