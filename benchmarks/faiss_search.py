"""Where FAISS's own search time goes: seconds per batch of queries vs k, for each index given.

    .venv/bin/python -m benchmarks.faiss_search INDEX [INDEX ...] [--queries Q.npy] [--n 8192] \
        [--ks 1 8 64 256 1024 2048] [--nprobe 32] [--implems 0 10 12 13 14 15] \
        [--qbs 0 16 32 64 --rounds 3]

Queries: the first --n rows of --queries (an .npy of shape (Q, D), e.g. the valid split's keys
that benchmarks/index_choice.py dumps to bench_runs/index_choice_demo/valid_keys.npy). For each
index: one search of all of them per k, the coarse quantizer alone (nprobe lists), and, for
4-bit fast-scan indexes, FAISS's other search implementations (`implem`) at the two largest k,
and with --qbs, query block sizes timed over interleaved rounds.
One process, one thread setting (FAISS's default), so the rows compare with each other.
"""

import argparse
import time

import faiss
import numpy as np


def timed(f, *args):
    t0 = time.perf_counter()
    f(*args)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("indexes", nargs="+")
    p.add_argument("--queries", default="bench_runs/index_choice_demo/valid_keys.npy")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--ks", nargs="+", type=int, default=[1, 8, 64, 256, 1024, 2048])
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--implems", nargs="+", type=int, default=[0, 10, 12, 13, 14, 15])
    p.add_argument("--qbs", nargs="+", type=int, default=[],
                   help="fast-scan query block sizes (`qbs`, 0 = FAISS's choice) to time at the two largest k, "
                        "each --rounds times, interleaved")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)

    q = np.ascontiguousarray(np.load(a.queries, mmap_mode="r")[:a.n], dtype=np.float32)
    print(f"{len(q):,} queries, nprobe {a.nprobe}, faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads\n")
    print("| index | " + " | ".join(f"k={k}" for k in a.ks) + " | coarse quantizer |")
    print("|---|" + "---:|" * (len(a.ks) + 1))
    fast_scan = []
    for path in a.indexes:
        loaded = faiss.read_index(path)
        index = faiss.downcast_index(faiss.extract_index_ivf(loaded))  # keep `loaded`: it owns it
        index.nprobe = a.nprobe
        index.search(q[:256], max(a.ks))  # warm up
        times = [timed(index.search, q, k) for k in a.ks]
        coarse = timed(index.quantizer.search, q, a.nprobe)
        print(f"| {path} | " + " | ".join(f"{t:.2f}" for t in times) + f" | {coarse:.2f} |")
        if hasattr(index, "implem"):
            fast_scan.append((path, loaded, index))

    big = sorted(a.ks)[-2:]
    if fast_scan:
        print(f"\nFast-scan search implementations (`implem`; 0 = FAISS's choice), seconds at k = {big}:\n")
        print("| index | implem | " + " | ".join(f"k={k}" for k in big) + " |")
        print("|---|---:|" + "---:|" * len(big))
    for path, _, index in fast_scan:
        for implem in a.implems:
            index.implem = implem
            try:
                cells = [f"{timed(index.search, q, k):.2f}" for k in big]
            except RuntimeError as e:  # not every implementation serves every index or k
                cells = [f"refused: {str(e).strip().splitlines()[-1][:60]}"] * len(big)
            print(f"| {path} | {implem} | " + " | ".join(cells) + " |")
        index.implem = 0

    if fast_scan and a.qbs:
        print(f"\nFast-scan query block size (`qbs`; 0 = FAISS's choice), seconds at k = {big}, "
              f"{a.rounds} interleaved rounds (min / median):\n")
        print("| index | qbs | " + " | ".join(f"k={k}" for k in big) + " |")
        print("|---|---:|" + "---:|" * len(big))
    for path, _, index in fast_scan if a.qbs else ():
        seen = {(qbs, k): [] for qbs in a.qbs for k in big}
        for _ in range(a.rounds):
            for qbs in a.qbs:
                index.qbs = qbs
                for k in big:
                    seen[qbs, k].append(timed(index.search, q, k))
        for qbs in a.qbs:
            cells = [f"{min(seen[qbs, k]):.2f} / {float(np.median(seen[qbs, k])):.2f}" for k in big]
            print(f"| {path} | {qbs} | " + " | ".join(cells) + " |")
        index.qbs = 0


if __name__ == "__main__":
    main()
