"""Would overlapping FAISS search with the LM forward pay on this machine?

    .venv/bin/python -m benchmarks.overlap [--demo-dir demo_runs/austen] [--rounds 2]

The demo's LM forwards an 8,192-token batch (32 x 256) while a thread searches the demo's index
for 4,096 of the dumped datastore's keys (k = 1,024, nprobe = 32): one after the other with
2 threads each, at once with 2 threads each, and at once with 1 thread each. If the cores idled
during either stage, "at once" would beat "one after the other".
"""
import argparse
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from fairseq import checkpoint_utils

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--demo-dir", default="demo_runs/austen")
p.add_argument("--rounds", type=int, default=2)
a = p.parse_args()
demo = Path(a.demo_dir)
models, _, _ = checkpoint_utils.load_model_ensemble_and_task([str(demo / "checkpoints" / "checkpoint_last.pt")],
                                                             arg_overrides={"data": str(demo / "data-bin")})
m = models[0].eval()
toks = torch.randint(4, len(m.decoder.dictionary), (32, 256), generator=torch.Generator().manual_seed(0))
q = np.ascontiguousarray(np.load(demo / "dstore" / "train_keys.npy", mmap_mode="r")[:4096], dtype=np.float32)
ix = faiss.read_index(str(demo / "dstore" / "train_knn.index"))
faiss.extract_index_ivf(ix).nprobe = 32


def forward():
    with torch.no_grad():
        out = m(toks)[0]
        m.get_normalized_probs((out, None), log_probs=True)


def search():
    ix.search(q, 1024)


def threads(n):
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def one_after_the_other(n):
    threads(n)
    t0 = time.perf_counter()
    forward()
    t1 = time.perf_counter()
    search()
    return t1 - t0, time.perf_counter() - t1


def at_once(n):
    threads(n)
    th = threading.Thread(target=search)  # FAISS and torch both release the GIL in their kernels
    t0 = time.perf_counter()
    th.start()
    forward()
    th.join()
    return time.perf_counter() - t0


forward()  # warm up both
search()
for _ in range(a.rounds):
    f, s = one_after_the_other(2)
    print(f"one after the other, 2 threads each: forward {f:.2f} s + search {s:.2f} s = {f + s:.2f} s")
    print(f"at once, 2 threads each:             {at_once(2):.2f} s")
    print(f"at once, 1 thread each:              {at_once(1):.2f} s")
    f, s = one_after_the_other(1)
    print(f"  (alone with 1 thread: forward {f:.2f} s, search {s:.2f} s)")
