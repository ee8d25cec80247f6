"""What does serving the datastore's shards from Ray actors cost on one machine?

    unshare -n bash -c 'ip link set lo up && .venv/bin/python -m benchmarks.ray_overhead \\
        [--demo-dir demo_runs/austen] [--workdir bench_runs/ray_overhead] [--rounds 5] [--batches 4]'

The demo's datastore is cut into 3 contiguous shards (bench_runs/, never git); two indexes are
built over them with the demo's settings (IVF1024,PQ64, 200K training keys): one merged on
disk (merge=ondisk) and one kept in 3 parts (merge=none). The eval loop is the demo's: batches
of 32 blocks x 256 tokens of the valid text (8,192 tokens), the LM forward (fairseq, CPU), the
last 128 positions of each block scored (4,096 tokens) with k = 1,024, nprobe = 32, exact L2.
Three routes score the same batches:
    merged  FaissRetriever on the merged index (today's single-index search)
    local   ShardedRetriever over the parts, one thread per shard (--knn-executor local)
    ray     ShardedRetriever over the parts, one Ray actor per shard on a local Ray instance
            (--knn-executor ray): the queries put once per batch, results merged by FAISS
Rounds interleave the routes (order rotated each round); each route's eval time per round is
reported with the median of the paired ratios against `local`. Also: bytes moved per batch,
the per-shard search cost, and a WIKI-3B projection from it (labelled as such).
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from knnlm import KNNLM, FaissRetriever, open_datastore
from knnlm.index.builder import build_index
from knnlm.retrieval.sharded_search import ShardedRetriever
from knnlm.store import Datastore, DatastoreWriter

N_SHARDS = 3
BLOCKS, TPS, CONTEXT = 32, 256, 128
K, PROBE = 1024, 32


def split(demo, work):
    """The demo's datastore as 3 contiguous shards (rows in order) and their manifest."""
    prefix = str(work / "dstore" / "all")
    if os.path.exists(prefix + "_shards.json"):
        return prefix
    src = Datastore.open(str(demo / "dstore" / "train"))
    bounds = np.linspace(0, src.size, N_SHARDS + 1).astype(int)
    shards = []
    for i in range(N_SHARDS):
        p = str(work / "dstore" / f"shard{i}")
        m = src.meta
        w = DatastoreWriter(p, src.dim, keytype=m.get("keytype"), dict_size=m.get("dict_size"),
                            dict_fingerprint=m.get("dict_fingerprint"), model_fingerprint=m.get("model_fingerprint"))
        w.add(np.asarray(src.keys[bounds[i]:bounds[i + 1]]), np.asarray(src.vals[bounds[i]:bounds[i + 1]]))
        w.finalize()
        shards.append(p)
    from knnlm.store.sharded import manifest_path, write_manifest

    write_manifest(manifest_path(prefix), shards)
    return prefix


def build(prefix, work, train_keys):
    out = {}
    for name, extra in (("merged", {}), ("parts", {"merge": "none"})):
        out[name] = str(work / f"{name}.index")
        done = os.path.exists(out[name] + (".shards.json" if name == "parts" else ".meta.json"))
        if not done:
            t0 = time.perf_counter()
            build_index({"dstore_mmap": prefix, "faiss_index": out[name], "ncentroids": 1024, "code_size": 64,
                         "num_keys_to_train": train_keys, "seed": 1, **extra})
            print(f"built {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def lm_batches(demo, n_batches):
    """The demo LM and `n_batches` batches of valid text: (tokens (B, T), targets (B, CONTEXT))."""
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(demo / "checkpoints" / "checkpoint_last.pt")], arg_overrides={"data": str(demo / "data-bin")})
    m = models[0].eval()
    d = task.source_dictionary
    text = (demo / "corpus" / "valid.txt").read_text().split("\n")
    ids = torch.cat([d.encode_line(line, add_if_not_exist=False) for line in text if line.strip()])
    step = TPS - CONTEXT  # each block scores its last CONTEXT tokens, as eval_lm's context window does
    starts = list(range(0, len(ids) - TPS - 1, step))[:BLOCKS * n_batches]
    batches = []
    for b in range(0, len(starts), BLOCKS):
        blk = torch.stack([ids[s:s + TPS + 1] for s in starts[b:b + BLOCKS]])
        batches.append(blk)
    return m, batches


def forward(m, blk):
    """LM forward of one batch: (queries (n, D) = the final layer's FFN input, targets, log p_LM)."""
    box = {}
    h = m.decoder.layers[-1].fc1.register_forward_pre_hook(lambda mod, args: box.__setitem__("k", args[0]))
    try:
        with torch.no_grad():
            out = m(blk[:, :-1])
            lp = m.get_normalized_probs(out, log_probs=True)[:, -CONTEXT:]
    finally:
        h.remove()
    keys = box["k"]
    keys = keys.transpose(0, 1) if keys.shape[0] == TPS else keys  # fairseq layers run T x B x C
    targets = blk[:, -CONTEXT:]
    q = keys[:, -CONTEXT:].reshape(-1, keys.shape[-1]).float().contiguous()
    return q, targets.reshape(-1), lp.gather(-1, targets[..., None]).reshape(-1)


def run_route(retriever, m, batches):
    knn = KNNLM(retriever, lmbda=0.25)
    t0 = time.perf_counter()
    lm_s = 0.0
    for blk in batches:
        t1 = time.perf_counter()
        q, targets, lp = forward(m, blk)
        lm_s += time.perf_counter() - t1
        knn.score(q, targets, lp)
    return time.perf_counter() - t0, lm_s, knn.summary()["ppl"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="demo_runs/austen")
    p.add_argument("--workdir", default="bench_runs/ray_overhead")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=4, help="eval batches per route and round")
    p.add_argument("--train-keys", type=int, default=200000)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    demo, work = Path(a.demo_dir), Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prefix = split(demo, work)
    idx = build(prefix, work, a.train_keys)
    ds = open_datastore(prefix + "_shards.json", in_memory=True)  # the demo's move_dstore_to_mem
    torch.set_num_threads(os.cpu_count() or 1)
    m, batches = lm_batches(demo, a.batches)
    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores; {len(batches)} batches of "
          f"{BLOCKS}x{TPS} tokens ({BLOCKS * CONTEXT} scored each)", flush=True)
    routes = {
        "merged": FaissRetriever(idx["merged"], ds, k=K, nprobe=PROBE),
        "local": ShardedRetriever(idx["parts"], ds, k=K, nprobe=PROBE, executor="local", in_memory=True),
        "ray": ShardedRetriever(idx["parts"], ds, k=K, nprobe=PROBE, executor="ray", in_memory=True),
    }
    names = list(routes)
    for name in names:  # warm: page cache, Ray workers, FAISS threads
        run_route(routes[name], m, batches[:1])
    times = {n: [] for n in names}
    lm_times, ppls = {n: [] for n in names}, {}
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            s, lm_s, ppl = run_route(routes[name], m, batches)
            times[name].append(s)
            lm_times[name].append(lm_s)
            ppls[name] = ppl
        print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names) +
              f"  (load {os.getloadavg()[0]:.1f})", flush=True)
    ray_r = routes["ray"]
    batches_seen = ray_r.batches
    out = {
        "cores": os.cpu_count(), "load_after": os.getloadavg(), "rounds": a.rounds, "batches": len(batches),
        "eval_seconds": times, "lm_seconds": lm_times, "perplexity": ppls,
        "median_seconds": {n: statistics.median(times[n]) for n in names},
        "paired_median_ratio_vs_local": {n: statistics.median(t / l for t, l in zip(times[n], times["local"]))
                                         for n in names},
        "bytes_per_batch": {"queries_put": ray_r.bytes_put / batches_seen,
                            "results_returned": ray_r.bytes_returned / batches_seen},
    }
    out["projection"] = project(routes["local"], m, batches[0], ds)
    for r_ in routes.values():
        getattr(r_, "close", lambda: None)()
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


def project(local, m, blk, ds):
    """Per-shard search cost measured here, and a WIKI-3B projection for 8 and 32 nodes from it.

    A PROJECTION, not a measurement: the IVF-PQ scan scales with the codes scanned per query
    (nprobe x shard size / ncentroids), the recompute with k x key dimension; WIKI-3B: 2.87B keys
    of dimension 1024, IVF4096,PQ64 (the paper's), nprobe 32, k 1024, keys in RAM on each node."""
    q, _, _ = forward(m, blk)
    qn = np.ascontiguousarray(q.numpy())
    s = local.searchers[0]
    reps = []
    for _ in range(3):
        t0 = time.perf_counter()
        d, ids = s.faiss.index.search(qn, s.k_search)
        t1 = time.perf_counter()
        s.faiss._fused_distances(qn, np.where(ids >= 0, ids, 0))
        t2 = time.perf_counter()
        reps.append((t1 - t0, t2 - t1))
    scan_s, recompute_s = (statistics.median(x) for x in zip(*reps))
    n = len(qn)
    shard_keys = s.faiss.datastore.size
    codes_per_query = PROBE * shard_keys / 1024
    scan_rate = codes_per_query * n / scan_s  # codes per second, one shard's threads
    recompute_rate = n * s.k_search * ds.dim / recompute_s  # key dimensions per second
    out = {"measured": {"shard_keys": shard_keys, "queries": n, "threads": s.threads, "scan_seconds": scan_s,
                        "recompute_seconds": recompute_s, "codes_per_second": scan_rate,
                        "key_dims_per_second": recompute_rate}}
    wiki_keys, dim = 2.87e9, 1024
    for nodes in (8, 32):
        codes = PROBE * (wiki_keys / nodes) / 4096
        scan = n * codes / scan_rate
        recompute = n * K * dim / recompute_rate
        moved = n * dim * 4 + nodes * n * K * (4 + 8 + 4 + 8)  # queries once; per shard d, ids, exact, values
        out[f"wiki3b_{nodes}_nodes"] = {"per_node_scan_s": scan, "per_node_recompute_s": recompute,
                                        "per_batch_s_at_these_threads": scan + recompute,
                                        "bytes_per_batch": moved, "note": "PROJECTION from the per-shard cost measured here"}
    return out


if __name__ == "__main__":
    main()
