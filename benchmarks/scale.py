"""A WikiText-103-shaped datastore larger than memory: what each stage costs as it grows.

    .venv/bin/python -m benchmarks.scale                 # full size: >= 2x this machine's RAM of keys
    .venv/bin/python -m benchmarks.scale --tiny          # the same code on a few MB, in seconds (tests)
    .venv/bin/python -m benchmarks.scale --keys 4000000  # any size (rounded to a multiple of 8)

Makes a synthetic datastore shaped like the paper's WikiText-103 one (1,024-d float16 keys,
int32 values) with the library's writer (knnlm.dump.DumpSession), in four shards of 1/8, 1/8,
1/4 and 1/2 of the rows; shard manifests (knnlm.store.sharded) give the nested sizes 1/8, 1/4,
1/2 and 1 without copying anything. Keys have the structure of real ones: the demo's 256-d
keys (demo_runs/austen/dstore, when `make demo` has finished; otherwise a seeded low-rank
generator) projected to 1,024-d by a fixed random matrix, tiled in datastore order with noise
from a bank of Gaussian rows; values are the demo's next tokens at the same rows (Zipfian).
Queries are fresh tiles of the same base keys with fresh noise (held out).

Then, at each size, the real tools:
  * dump rate of the writer (rows/s into DumpSession.add, generation timed apart);
  * knnlm-build-index (the command, on the 1/8 shard: train + add, its peak RSS), then the
    library's own add_rows for the next shards (add rate as the index grows);
  * FAISS search (k, nprobe) = the cost of `--knn-sim-func do_not_recomp_l2`;
  * exact recompute (`--knn-sim-func l2`, FaissRetriever.exact_distances) from memory-mapped
    keys, cold (the file's pages evicted: MADV_DONTNEED on our maps, then
    POSIX_FADV_DONTNEED) and warm, before and after this session's fix (threaded gathers,
    MADV_RANDOM past memory), paired and interleaved, results compared bit for bit;
  * --move-dstore-to-mem (Datastore.open(in_memory=True)) where the keys fit in available
    memory: load time and recompute rate;
  * knnlm-reduce (PCA) on the 1/8 shard and the recompute from the reduced keys;
  * fp32 keys (FAISS's fused in-place kernel) vs fp16 keys (gathered) on one in-RAM slice;
  * the paper's IVF4096,PQ64: its add rate and one k-means iteration, measured on samples,
    to project its build on 1M and 103M keys.
Every timing prints the load average; /proc/meminfo's Cached is printed around cold runs.
Peak RSS: the process's VmHWM per stage (reset through /proc/self/clear_refs; it counts the
key pages mapped in, which the kernel may drop at will) and the tools' own ru_maxrss.
The synthetic files are deleted at the end (--keep to keep them); tables go to OUT/scale.md.
"""

import argparse
import glob
import json
import math
import mmap
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, md_table, run_tool

GiB = 2**30


def log(msg=""):
    print(msg, flush=True)


def load():
    return "%.1f" % os.getloadavg()[0]


def meminfo(field):
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def gib(b):
    return f"{b / GiB:.2f} GiB"


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    st = os.statvfs(str(REPO))
    return {"cpu": cpu, "cores": os.cpu_count(), "ram": meminfo("MemTotal"),
            "disk_free": st.f_bavail * st.f_frsize, "disk_total": st.f_blocks * st.f_frsize}


# --------------------------------------------------------------------------- base keys

def base_keys(demo_dir, d_base_fallback, n_base_fallback, vocab_fallback, seed):
    """(base keys float32 (Nb, d_b), values (Nb,), dict_size, where from)."""
    from knnlm.store import open_datastore

    for meta in sorted(glob.glob(os.path.join(demo_dir, "dstore", "*_meta.json"))):
        prefix = meta[: -len("_meta.json")]
        try:
            ds = open_datastore(prefix)
        except Exception:  # noqa: BLE001 - incomplete or being written: fall back
            continue
        if ds.meta.get("split") not in (None, "train"):
            continue
        return (np.asarray(ds.keys, np.float32), np.asarray(ds.vals), int(ds.meta.get("dict_size") or ds.vals.max() + 1),
                f"demo datastore {prefix} ({ds.size:,} x {ds.dim})")
    rng = np.random.default_rng(seed)
    # Low rank with a decaying spectrum, plus isotropic noise: roughly what LM states look like.
    r = d_base_fallback // 4
    basis = rng.standard_normal((r, d_base_fallback)).astype(np.float32) * (1.0 / np.arange(1, r + 1) ** 0.5)[:, None].astype(np.float32)
    x = rng.standard_normal((n_base_fallback, r)).astype(np.float32) @ basis
    x += 0.1 * rng.standard_normal(x.shape).astype(np.float32)
    vals = np.minimum(rng.zipf(1.2, n_base_fallback) - 1, vocab_fallback - 1).astype(np.int32)
    return x, vals, vocab_fallback, f"seeded low-rank generator ({n_base_fallback:,} x {d_base_fallback}; no demo datastore)"


class KeyMaker:
    """Row i of the datastore: P[i mod Nb] + noise, P = base keys projected to `dim`; the
    noise of a block of rows is a window of a bank of Gaussian rows at a random offset (two
    memory passes per row: generating must not be slower than the writer it feeds)."""

    def __init__(self, base, vals, dim, seed, noise=0.3, bank_rows=1 << 17):
        rng = np.random.default_rng(seed)
        w = rng.standard_normal((base.shape[1], dim)).astype(np.float32) / math.sqrt(base.shape[1])
        self.p = np.empty((len(base), dim), np.float32)
        for s in range(0, len(base), 1 << 16):
            self.p[s:s + (1 << 16)] = base[s:s + (1 << 16)] @ w
        self.vals = vals
        self.sigma = noise * float(np.std(self.p[: 1 << 16]))
        nb = min(bank_rows, 4 * len(base))
        self.bank = np.concatenate([(self.sigma * rng.standard_normal((nb, dim))).astype(np.float32)] * 2)
        self.rng = rng
        self.dim = dim

    def rows(self, start, n):
        x = np.empty((n, self.dim), np.float32)
        nb, done = len(self.p), 0
        while done < n:  # P in order, wrapping around
            j = (start + done) % nb
            c = min(n - done, nb - j)
            x[done:done + c] = self.p[j:j + c]
            done += c
        half = len(self.bank) // 2
        for s in range(0, n, half):
            o = int(self.rng.integers(half))
            c = min(half, n - s)
            x[s:s + c] += self.bank[o:o + c]
        return x, self.vals[(start + np.arange(n, dtype=np.int64)) % nb]

    def queries(self, n, seed):
        rng = np.random.default_rng(seed)
        j = rng.integers(len(self.p), size=n)
        q = self.p[j].astype(np.float32) + self.sigma * rng.standard_normal((n, self.dim)).astype(np.float32)
        return np.ascontiguousarray(q)


# --------------------------------------------------------------------------- page cache

def evict(datastores):
    """Drop the keys' pages: unmap them from our maps (MADV_DONTNEED; mapped pages cannot be
    evicted) and ask the kernel to drop them from the page cache (POSIX_FADV_DONTNEED)."""
    files = set()
    for ds in datastores:
        for s in getattr(ds, "shards", [ds]):
            mm = getattr(s.keys, "_mmap", None)
            if mm is not None:
                mm.madvise(mmap.MADV_DONTNEED)
            files.add(f"{s.prefix}_keys.npy")
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextmanager
def patched(threads=None, advise=False):
    """The library as before this session's fix, in part or whole: `threads` reading threads
    (1: as before), and with `advise` the kernel's read-around kept whatever the size."""
    import knnlm.retrieval.faiss_search as fs
    import knnlm.store.datastore as dsm

    old = dsm.GATHER_IO_THREADS, fs.advise_random_beyond_memory
    if threads is not None:
        dsm.GATHER_IO_THREADS = threads
    if advise:
        fs.advise_random_beyond_memory = lambda ds: None
    try:
        yield
    finally:
        dsm.GATHER_IO_THREADS, fs.advise_random_beyond_memory = old


def timed_recompute(retriever, q, ids, budget_s, block):
    """exact_distances over blocks of queries until done or `budget_s` is spent: (queries done,
    seconds, distances of those queries)."""
    out, t0, done = [], time.perf_counter(), 0
    for s in range(0, len(q), block):
        out.append(retriever.exact_distances(q[s:s + block], ids[s:s + block]).numpy())
        done = s + len(out[-1])
        if time.perf_counter() - t0 > budget_s:
            break
    return done, time.perf_counter() - t0, np.concatenate(out)


# --------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a few MB, seconds: the same code (tests)")
    p.add_argument("--keys", type=int, default=None, help="full size in rows (default: 2x RAM of keys)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--out-dir", default=str(REPO / "bench_runs" / "scale"))
    p.add_argument("--demo-dir", default=str(REPO / "demo_runs" / "austen"))
    p.add_argument("--queries", type=int, default=1024, help="queries for search and warm recompute")
    p.add_argument("--cold-queries", type=int, default=256, help="queries for cold (disk-bound) recompute")
    p.add_argument("--cold-budget-s", type=float, default=40.0, help="a cold run stops after this (rate over what ran)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved before/after rounds")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--probe", type=int, default=16)
    p.add_argument("--factory", default="PCA32,IVF{ncentroids},PQ{code_size}")
    p.add_argument("--ncentroids", type=int, default=512)
    p.add_argument("--code-size", type=int, default=8)
    p.add_argument("--n-train", type=int, default=65536)
    p.add_argument("--pca-dim", type=int, default=128)
    p.add_argument("--min-free-gib", type=float, default=15.0, help="disk left free for others")
    p.add_argument("--keep", action="store_true", help="keep the synthetic datastore and index")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    if a.tiny:
        a.dim, a.queries, a.cold_queries, a.k, a.probe = 64, 64, 32, 64, 4
        a.ncentroids, a.code_size, a.n_train, a.pca_dim, a.rounds = 16, 8, 2048, 16, 1
        a.keys = a.keys or 32768
    out = Path(a.out_dir)
    work = out / "data"
    out.mkdir(parents=True, exist_ok=True)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    t_start = time.perf_counter()
    report = []  # markdown lines

    def section(title, header=None, rows=None, note=None):
        lines = [f"\n#### {title}\n"] + ([note + "\n"] if note else []) + ([md_table(header, rows)] if header else [])
        report.extend(lines)
        log("\n".join(lines))

    import faiss

    from knnlm.dump import DumpSession
    from knnlm.index.steps import add_rows
    from knnlm.provenance import ModelIdentity
    from knnlm.retrieval.faiss_search import FaissRetriever
    from knnlm.store import Datastore
    from knnlm.store.sharded import open_manifest, write_manifest

    # --tiny: one thread; OpenMP's many tiny parallel regions crawl on an oversubscribed host
    threads = 1 if a.tiny else (os.cpu_count() or 1)
    faiss.omp_set_num_threads(threads)
    m = machine()
    row_bytes = a.dim * 2
    if a.keys is None:
        a.keys = math.ceil(2 * m["ram"] / row_bytes / 8 / 1e5) * 8 * 100000  # >= 2x RAM, a round number
    n = a.keys - a.keys % 8
    need = n * (row_bytes + 4) * 1.05 + n // 8 * (a.pca_dim * 2 + 4) + n * 24
    if need > m["disk_free"] - a.min_free_gib * GiB:
        raise SystemExit(f"scale.py: {n:,} keys need ~{gib(need)} but only {gib(m['disk_free'])} are free "
                         f"and {a.min_free_gib} GiB must stay free; pass a smaller --keys")
    shard_rows = [n // 8, n // 8, n // 4, n // 2]
    offsets = np.cumsum([0] + shard_rows)
    log(f"scale.py: {n:,} keys x {a.dim} fp16 = {gib(n * row_bytes)} of keys (RAM {gib(m['ram'])}, "
        f"disk free {gib(m['disk_free'])}); {m['cpu']}, {m['cores']} cores; load {load()}")
    report.append(f"Machine: {m['cpu']}, {m['cores']} cores, {gib(m['ram'])} RAM, disk {gib(m['disk_total'])} "
                  f"({gib(m['disk_free'])} free at start); faiss {faiss.__version__}, {threads} threads. "
                  f"Command: `{' '.join([os.path.relpath(sys.executable, REPO), '-m', 'benchmarks.scale'] + (argv if argv is not None else sys.argv[1:]))}`; "
                  f"load average at start {load()}.")

    # ---- base keys and the generator
    base, vals, dict_size, source = base_keys(a.demo_dir, 256 if not a.tiny else 16, 1 << 18 if not a.tiny else 4096,
                                             10000 if not a.tiny else 500, a.seed)
    if a.tiny:
        base = base[:, :16] if base.shape[1] > 16 else base
        base, vals = base[:8192], vals[:8192]
    gen = KeyMaker(base, vals, a.dim, a.seed)
    del base
    report.append(f"Keys: {source}, projected to {a.dim}-d by a fixed Gaussian matrix, tiled in order with noise "
                  f"(sigma {gen.sigma:.3g}: 0.3 of the projected keys' std); values of "
                  f"the same rows ({dict_size:,} types). Queries: fresh tiles, fresh noise.")
    queries = gen.queries(a.queries, a.seed + 1)
    probe_keys = (gen.rows(0, 65536 if not a.tiny else 8192)[0], gen.rows(10**6, 16384 if not a.tiny else 2048)[0])

    # ---- 1. dump: the writer, shard by shard
    identity = ModelIdentity(dim=a.dim, dict_size=dict_size, dict_fingerprint="synthetic", model_fingerprint="synthetic")
    prefixes, dump_rows = [], []
    from tqdm import tqdm

    block = 1 << 16 if not a.tiny else 4096
    for si, rows in enumerate(shard_rows):
        prefix = str(work / f"shard{si}")
        session = DumpSession(prefix, keytype="synthetic", fp16=True, expected_size=rows,
                              extra={"synthetic": "benchmarks/scale.py", "split": "train"}).start(identity)
        t_gen = t_add = 0.0
        reset_hwm()
        with tqdm(total=rows, unit="key", unit_scale=True, desc=f"dump shard {si}", dynamic_ncols=True) as bar:
            for s in range(0, rows, block):
                t0 = time.perf_counter()
                x, v = gen.rows(int(offsets[si]) + s, min(block, rows - s))
                t1 = time.perf_counter()
                session.add(x, v)
                t_add += time.perf_counter() - t1
                t_gen += t1 - t0
                bar.update(len(x))
        t0 = time.perf_counter()
        session.finish()
        t_fin = time.perf_counter() - t0
        t0 = time.perf_counter()
        os.sync()  # what the writer left dirty in the page cache, on disk: part of the dump's cost
        t_sync = time.perf_counter() - t0
        w = t_add + t_fin + t_sync
        dump_rows.append([f"shard {si} ({rows:,} rows, {gib(rows * row_bytes)})", f"{t_gen:.1f}", f"{t_add:.1f}",
                          f"{t_fin + t_sync:.1f}", f"{rows / w:,.0f}", f"{rows * row_bytes / w / 2**20:,.0f}",
                          gib(hwm()), load()])
        prefixes.append(prefix)
    del gen  # its projected base keys: gigabytes the page cache and --move-dstore-to-mem can use
    section("Dump: the writer (DumpSession.add, fp16 keys)",
            ["shard", "generate s", "add s", "finish+sync s", "rows/s (add+finish+sync)", "MiB/s", "peak RSS", "load"],
            dump_rows)

    manifests = []
    for j in range(4):
        path = str(work / f"size{j}_shards.json")
        write_manifest(path, prefixes[: j + 1])
        manifests.append(path)
    sizes = [int(offsets[j + 1]) for j in range(4)]
    fractions = ["1/8", "1/4", "1/2", "1"]

    # ---- 2. index: the command on the 1/8 shard, then the library's add_rows for the rest
    index_path = str(work / "knn.index")
    cmd = ["knnlm-build-index", f"dstore_mmap={prefixes[0]}", f"faiss_index={index_path}",
           f"factory='{a.factory}'", f"ncentroids={a.ncentroids}", f"code_size={a.code_size}",
           f"num_keys_to_train={a.n_train}", f"probe={a.probe}", f"seed={a.seed}", f"threads={threads}",
           "num_keys_to_add_at_a_time=262144", "checkpoint_interval_s=100000"]
    evict([Datastore.open(prefixes[0])])
    wall, rss, _ = run_tool(cmd, out / "logs" / "build_index.log")
    imeta = json.load(open(index_path + ".meta.json"))
    build_rows = [[fractions[0], f"{sizes[0]:,}", f"train {imeta['train_seconds']:.1f} s on {imeta.get('n_train', a.n_train):,} keys; "
                   f"add {imeta['add_seconds']:.1f} s (knnlm-build-index, wall {wall:.1f} s)",
                   f"{sizes[0] / imeta['add_seconds']:,.0f}", gib(rss), load()]]
    index = faiss.read_index(index_path)
    log(f"index {imeta.get('factory')}: built on 1/8 in {wall:.1f} s")

    def set_probe(ix):
        faiss.ParameterSpace().set_index_parameter(ix, "nprobe", a.probe)

    set_probe(index)
    search_rows, cold_rows, warm_rows, mem_rows, ident = [], [], [], [], []
    for j in range(4):
        if j > 0:
            sh = Datastore.open(prefixes[j])
            evict([sh])
            reset_hwm()
            t0 = time.perf_counter()
            add_rows(index, sh.keys, 0, sh.size, id_offset=int(offsets[j]), chunk=262144, desc=f"add shard {j}")
            dt = time.perf_counter() - t0
            build_rows.append([fractions[j], f"{sizes[j]:,}", f"add {dt:.1f} s (add_rows, shard {j}: {sh.size:,} keys)",
                               f"{sh.size / dt:,.0f}", gib(hwm()), load()])
            del sh
        size = sizes[j]
        log(f"\n== size {fractions[j]}: {size:,} keys, {gib(size * row_bytes)}; load {load()}")

        # search (= the whole cost of do_not_recomp_l2)
        ds = open_manifest(manifests[j])
        r = FaissRetriever(index, ds, k=a.k, nprobe=a.probe, sim_func="l2")
        reset_hwm()
        t0 = time.perf_counter()
        _, ids = r.search(queries)
        ts = time.perf_counter() - t0
        search_rows.append([fractions[j], f"{size:,}", f"{a.queries / ts:,.1f}", f"{ts / a.queries * 1e3:.2f}",
                            f"{index.ntotal * (faiss.extract_index_ivf(index).code_size + 8) / GiB:.2f} GiB", gib(hwm()), load()])
        ids = np.ascontiguousarray(ids)

        # exact recompute from the memory map: cold, before vs after the fix, paired
        nc = min(a.cold_queries, a.queries)
        qc, ic = queries[:nc], ids[:nc]
        fits = size * row_bytes < meminfo("MemAvailable")
        times = {"before": [], "after": [], "other": []}
        ref = None
        blk = 16
        for rnd in range(a.rounds):
            for variant in (("before", "after", "other") if rnd % 2 == 0 else ("other", "after", "before")):
                # other: the read-around choice the library does not make at this size
                with patched(threads=1 if variant == "before" else None,
                             advise=variant == "before" or (variant == "other" and not fits)):
                    d = open_manifest(manifests[j])
                    rv = FaissRetriever(index, d, k=a.k, nprobe=a.probe, sim_func="l2")
                    if variant == "other" and fits:
                        d.advise_random()
                    evict([d, ds])
                    c0 = meminfo("Cached")
                    reset_hwm()
                    done, sec, dist = timed_recompute(rv, qc, ic, a.cold_budget_s, blk)
                    c1 = meminfo("Cached")
                times[variant].append((done, sec, hwm(), c1 - c0))
                if ref is not None:
                    common = min(len(ref), len(dist))
                    ident.append(bool(np.array_equal(ref[:common], dist[:common])))
                if ref is None or len(dist) > len(ref):
                    ref = dist
                log(f"  cold {variant:6s} round {rnd}: {done} queries in {sec:.1f} s = {done / sec:.1f} q/s, "
                    f"{done * a.k / sec:,.0f} keys/s; Cached +{(c1 - c0) / 2**20:,.0f} MiB; load {load()}")
                del rv, d
        other_name = "threads + MADV_RANDOM" if fits else "threads, kernel read-around"
        after_name = "threads, kernel read-around" if fits else "threads + MADV_RANDOM"

        def rate(v):
            return statistics.median(dn * a.k / s for dn, s, _, _ in times[v])

        pairs = [(dn_a / s_a) / (dn_b / s_b) for (dn_b, s_b, _, _), (dn_a, s_a, _, _)
                 in zip(times["before"], times["after"])]
        cold_rows.append([fractions[j], f"{size:,}", "yes" if fits else "no",
                          f"{rate('before'):,.0f}", f"{rate('after'):,.0f} ({after_name})",
                          f"{rate('other'):,.0f} ({other_name})", f"{statistics.median(pairs):.1f}x",
                          f"{max(t[3] for v in times.values() for t in v) / 2**20:,.0f} MiB",
                          gib(max(t[2] for v in times.values() for t in v)), load()])

        # warm: the same rows again, all in the page cache (read once more by the fixed code first)
        timed_recompute(FaissRetriever(index, ds, k=a.k, nprobe=a.probe, sim_func="l2"), qc, ic, 1e9, blk)
        warm = {}
        for variant in ("before", "after"):
            with patched(threads=1 if variant == "before" else None, advise=variant == "before"):
                d = open_manifest(manifests[j])
                rv = FaissRetriever(index, d, k=a.k, nprobe=a.probe, sim_func="l2")
                done, sec, _ = timed_recompute(rv, qc, ic, 1e9, blk)
            warm[variant] = done * a.k / sec
            del rv, d
        warm_rows.append([fractions[j], f"{size:,}", f"{warm['before']:,.0f}", f"{warm['after']:,.0f}",
                          f"{warm['after'] / warm['before']:.2f}x", load()])

        # --move-dstore-to-mem, where it fits
        need_b = size * row_bytes
        avail = meminfo("MemAvailable")
        if need_b < avail - 3 * GiB:
            evict([ds])
            reset_hwm()
            t0 = time.perf_counter()
            dm = open_manifest(manifests[j], in_memory=True)
            tl = time.perf_counter() - t0
            rm = FaissRetriever(index, dm, k=a.k, nprobe=a.probe, sim_func="l2")
            t0 = time.perf_counter()
            dmem = rm.exact_distances(queries, ids).numpy()
            tr = time.perf_counter() - t0
            # same distances as from the memory map (the first cold queries), bit for bit
            ident.append(bool(np.array_equal(dmem[: len(ref)], ref)))
            mem_rows.append([fractions[j], f"{size:,}", f"{tl:.1f} s ({need_b / tl / 2**20:,.0f} MiB/s)",
                             f"{a.queries * a.k / tr:,.0f}", gib(hwm()), load()])
            del rm, dm, dmem
        else:
            mem_rows.append([fractions[j], f"{size:,}", f"does not fit: {gib(need_b)} of keys, {gib(avail)} available",
                             "-", "-", load()])
        if j == 0:
            first_ids = ids
        del r, ds

    section("Index build", ["size", "keys", "step", "keys/s added", "peak RSS", "load"], build_rows,
            note=f"Factory `{imeta.get('factory')}`, {imeta.get('n_train', a.n_train):,} training keys, "
                 f"{threads} threads; the 1/8 row is the `knnlm-build-index` command ({' '.join(cmd[1:])}), "
                 f"the others add the next shard to the same index in this process with the library's add_rows.")
    section("Search: FAISS only (= the whole cost of `do_not_recomp_l2`)",
            ["size", "keys", "queries/s", "ms/query", "index in RAM", "peak RSS", "load"], search_rows,
            note=f"{a.queries:,} queries, k = {a.k}, nprobe = {a.probe}.")
    section("Exact recompute from memory-mapped keys, cold (pages evicted before every run)",
            ["size", "keys", "keys fit in RAM", "before: keys/s", "after: keys/s", "the other choice: keys/s",
             "after / before (paired median)", "Cached grew by (max)", "peak RSS", "load"], cold_rows,
            note=f"{min(a.cold_queries, a.queries)} queries x k = {a.k} keys each, {a.rounds} interleaved rounds "
                 f"(a run stops after {a.cold_budget_s:.0f} s; its rate is over the queries it did). Before: "
                 f"one thread reads, the kernel's read-around (read_ahead_kb "
                 f"{_read_ahead()}). After: {16} reading threads, and MADV_RANDOM when the keys exceed available "
                 f"memory. Results bit-identical across all variants: {all(ident)} ({len(ident)} comparisons).")
    section("Exact recompute, warm (the same rows again, from the page cache)",
            ["size", "keys", "before: keys/s", "after: keys/s", "after / before", "load"], warm_rows)
    section("`--move-dstore-to-mem` (keys loaded into RAM)",
            ["size", "keys", "load", "recompute keys/s", "peak RSS", "load avg"], mem_rows,
            note=f"{a.queries:,} queries x k = {a.k}; loaded only where the keys fit in available memory less 3 GiB.")

    # ---- PCA-reduced keys (knnlm-reduce) on the 1/8 shard
    pca_prefix = str(work / "shard0_pca")
    wall, rss, _ = run_tool(["knnlm-reduce", prefixes[0], pca_prefix, "--dim", str(a.pca_dim),
                             "--num-keys-to-train", str(min(a.n_train, shard_rows[0]))], out / "logs" / "reduce.log")
    dp = Datastore.open(pca_prefix)
    qp = dp.query_transform()(queries).numpy()
    rp = FaissRetriever(faiss.IndexFlatL2(a.pca_dim), dp, k=a.k, sim_func="l2")
    evict([dp])
    done, sec_c, _ = timed_recompute(rp, qp[:nc], first_ids[:nc], 1e9, 16)
    t0 = time.perf_counter()
    rp.exact_distances(qp, first_ids)
    sec_w = time.perf_counter() - t0
    d16 = open_manifest(manifests[0])
    r16 = FaissRetriever(index, d16, k=a.k, nprobe=a.probe, sim_func="l2")
    r16.exact_distances(queries[:nc], first_ids[:nc])
    t0 = time.perf_counter()
    r16.exact_distances(queries, first_ids)
    sec_16 = time.perf_counter() - t0
    pca_rows = [["1/8", f"{a.dim} -> {a.pca_dim} (PCA)", f"{wall:.1f} s ({shard_rows[0] / wall:,.0f} keys/s)", gib(rss),
                 gib(dp.keys_bytes), f"{nc * a.k / sec_c:,.0f}", f"{a.queries * a.k / sec_w:,.0f}",
                 f"{a.queries * a.k / sec_16:,.0f}", load()]]
    section("PCA-reduced keys (`knnlm-reduce`), 1/8 size",
            ["size", "keys", "knnlm-reduce wall", "its peak RSS", "reduced keys", "recompute cold keys/s",
             "warm keys/s", "full 1024-d fp16 warm keys/s", "load"], pca_rows)
    del rp, dp, r16, d16

    # ---- fp32 keys (FAISS's fused kernel, in place) vs fp16 (gathered), same in-RAM slice
    sl = min(shard_rows[0], (1 << 19) if not a.tiny else 8192)
    d16 = Datastore.open(prefixes[0])
    k16 = np.array(d16.keys[:sl])
    ids_s = first_ids % sl
    res = {}
    for name, keys in (("fp16 (gathered, torch)", k16), ("fp32 (FAISS fused, in place)", k16.astype(np.float32))):
        dsx = Datastore(f"{prefixes[0]}[:{sl}]", keys, np.asarray(d16.vals[:sl]), dict(d16.meta, size=sl))
        rx = FaissRetriever(faiss.IndexFlatL2(a.dim), dsx, k=a.k, sim_func="l2")
        best = []
        for _ in range(2):
            t0 = time.perf_counter()
            rx.exact_distances(queries, ids_s)
            best.append(time.perf_counter() - t0)
        res[name] = (min(best), keys.nbytes)
        del rx, dsx
    section(f"fp16 vs fp32 keys in RAM (first {sl:,} rows of shard 0; ids taken modulo that)",
            ["keys", "bytes", "recompute keys/s (best of 2)", "load"],
            [[k_, gib(b), f"{a.queries * a.k / s:,.0f}", load()] for k_, (s, b) in res.items()])
    del k16, d16

    # ---- the paper's factory, on samples
    report_paper = paper_probe(probe_keys, a)
    section("The paper's IVF4096,PQ64 on this machine (measured on samples, projected)",
            ["quantity", "measured", "projection"], report_paper)

    total = time.perf_counter() - t_start
    report.append(f"\nTotal {total / 60:.1f} min; load average at end {load()}.")
    if not a.keep:
        shutil.rmtree(work)
        report.append("The synthetic datastore, index and reduced keys were deleted.")
    text = "\n".join(report) + "\n"
    (out / "scale.md").write_text(text)
    (out / "identical.json").write_text(json.dumps({"bit_identical": all(ident), "comparisons": len(ident)}))
    log(f"\nwrote {out / 'scale.md'} ({total:.0f} s)")
    return 0 if all(ident) else 1


def _read_ahead():
    try:
        dev = os.stat(str(REPO)).st_dev
        path = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/queue/read_ahead_kb"
        if not os.path.exists(path):
            path = glob.glob("/sys/block/*/queue/read_ahead_kb")[0]
        return open(path).read().strip() + " KiB"
    except (OSError, IndexError):
        return "?"


def paper_probe(probe_keys, a):
    """IVF4096,PQ64 (the paper's) at this dimension: add rate with a quantizer taken from a
    sample (adding costs the same whatever the centroids), one k-means iteration's time."""
    import faiss

    nlist, m = (4096, 64) if not a.tiny else (64, 4)
    x, xa = probe_keys
    n_pts, add_n = len(x), len(xa)
    x = np.ascontiguousarray(x[np.random.default_rng(3).permutation(n_pts)])
    km = faiss.Kmeans(a.dim, nlist, niter=1, max_points_per_centroid=1 << 30, seed=1)
    t0 = time.perf_counter()
    km.train(x)
    t_iter = time.perf_counter() - t0
    flops = 2.0 * n_pts * nlist * a.dim
    gflops = flops / t_iter / 1e9
    index = faiss.index_factory(a.dim, f"IVF{nlist},PQ{m}")
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    ivf.quantizer.add(km.centroids)
    ivf.quantizer.is_trained = True
    ivf.by_residual = True
    ivf.do_polysemous_training = False  # as knnlm-build-index does: scoring never uses it
    q_sub = x[:min(n_pts, 4096)]  # 16 per PQ centroid: enough to time it (FAISS warns)
    t0 = time.perf_counter()
    index.train(q_sub)  # the quantizer already holds centroids: this trains the PQ only
    t_pq = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(xa)
    t_add = time.perf_counter() - t0
    rate = add_n / t_add
    # FAISS's IVF training: 10 k-means iterations (Level1Quantizer cp.niter) on at most 256
    # points per centroid (1,048,576 for 4096 lists).
    niter = ivf.cp.niter
    pts = min(10**6, ivf.cp.max_points_per_centroid * nlist)
    t_train_1m = niter * 2.0 * pts * nlist * a.dim / (gflops * 1e9)
    return [
        ["one k-means iteration", f"{t_iter:.1f} s for {n_pts:,} x {nlist} x {a.dim} ({gflops:.1f} GFLOP/s)",
         f"IVF training on 1M keys ({niter} iterations, {pts:,} points): {t_train_1m / 60:.1f} min"],
        ["PQ training", f"{t_pq:.1f} s on {len(q_sub):,} residuals", "grows linearly with the sample"],
        ["adding", f"{rate:,.0f} keys/s ({add_n:,} keys)",
         f"1M keys: {1e6 / rate / 60:.1f} min; 103M (WikiText-103): {103e6 / rate / 3600:.1f} h"],
    ]


if __name__ == "__main__":
    sys.exit(main())
