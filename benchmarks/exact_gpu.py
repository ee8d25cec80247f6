"""ExactRetriever (--knn-search exact) on a synthetic datastore generated on the device.

    python -m benchmarks.exact_gpu                      # 10M x 1024 fp16 keys, k=1024 (one H200: ~21 GB)
    python -m benchmarks.exact_gpu --tiny               # 20K x 64 on whatever device (CI runs this)
    python -m benchmarks.exact_gpu --rows 2000000 --dim 768 --queries 8192 --batch 2048 --k 256

Keys are clustered Gaussians (a few thousand centers), generated block by block on the device
from fixed seeds and handed to the retriever as a datastore-like object whose `keys[a:b]` is
a device tensor: nothing crosses the host, nothing is written to disk. Queries are fixed
(noisy copies of keys). Timed: loading the keys into the retriever's resident layout, then
the search of every query batch (after one warm-up batch), synchronised. Checked: for
`--check` queries, the ids and distances against brute force in float64 on the device.
Only torch is needed (no faiss, no fairseq).
"""

import argparse
import math
import sys
import time

import torch

from knnlm.retrieval.exact import ExactRetriever

BLOCK = 1 << 16  # rows generated per seed


class SyntheticKeys:
    """(rows, dim) clustered keys, generated on `device` in blocks of BLOCK rows, each from its own seed."""

    def __init__(self, rows, dim, device, dtype=torch.float16, centers=4096, seed=0):
        self.shape, self.dtype, self.device, self.seed = (rows, dim), dtype, torch.device(device), seed
        g = torch.Generator(device=self.device).manual_seed(seed)
        self.centers = torch.randn(min(centers, rows), dim, generator=g, device=self.device)

    def block(self, b):
        g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + b + 1)
        n = min(BLOCK, self.shape[0] - b * BLOCK)
        which = torch.randint(0, len(self.centers), (n,), generator=g, device=self.device)
        noise = torch.randn(n, self.shape[1], generator=g, device=self.device) * 0.5
        return (self.centers[which] + noise).to(self.dtype)

    def __getitem__(self, sl):
        a, b = sl.start or 0, min(sl.stop if sl.stop is not None else self.shape[0], self.shape[0])
        parts = [self.block(i)[max(a - i * BLOCK, 0):b - i * BLOCK] for i in range(a // BLOCK, (b - 1) // BLOCK + 1)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def gather(self, ids):
        """Rows `ids` (1-D tensor), each block generated once."""
        out = torch.empty(len(ids), self.shape[1], dtype=self.dtype, device=self.device)
        blocks = ids // BLOCK
        for b in blocks.unique().tolist():
            sel = (blocks == b).nonzero()[:, 0]
            out[sel] = self.block(b)[ids[sel] - b * BLOCK]
        return out

    def __len__(self):
        return self.shape[0]


class SyntheticDatastore:
    """What ExactRetriever reads of a datastore: size, dim, prefix, meta, keys[a:b], vals[a:b]."""

    def __init__(self, rows, dim, device, vocab=50000):
        self.keys = SyntheticKeys(rows, dim, device)
        g = torch.Generator(device=torch.device(device)).manual_seed(7)
        self.vals = torch.randint(0, vocab, (rows,), generator=g, device=torch.device(device), dtype=torch.int32)
        self.prefix, self.meta = f"synthetic-{rows}x{dim}", {"dict_size": vocab}

    size = property(lambda self: self.keys.shape[0])
    dim = property(lambda self: self.keys.shape[1])

    def gather_keys(self, ids):  # only for --dtype bf16 (fp16 keys re-score from the resident copy)
        return self.keys.gather(torch.as_tensor(ids).reshape(-1).to(self.keys.device)).cpu().numpy()


def brute_force(store, q, k, sim):
    """float64 exact top k of q against every key, block by block on the keys' device."""
    q64 = q.double()
    best_d = best_i = None
    for b in range(math.ceil(store.size / BLOCK)):
        keys = store.keys.block(b).double()
        d = q64 @ keys.T if sim == "dot" else (q64 ** 2).sum(1, keepdim=True) - 2 * q64 @ keys.T + (keys ** 2).sum(1)
        i = torch.arange(b * BLOCK, b * BLOCK + len(keys), device=d.device).expand_as(d)
        if best_d is not None:
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
        best_d, pos = d.topk(min(k, d.shape[1]), dim=1, largest=sim == "dot")
        best_i = i.gather(1, pos)
    return best_d, best_i


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="20,000 x 64 keys, 256 queries, k=32: seconds on a CPU")
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--queries", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2048, help="queries per retrieve() call (an eval_lm batch)")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--sim", default="l2", choices=["l2", "dot"])
    p.add_argument("--devices", default=None, help="comma list (default: cuda:0 if CUDA, else cpu)")
    p.add_argument("--check", type=int, default=64, help="queries checked against float64 brute force")
    a = p.parse_args(argv)
    if a.tiny:
        a.rows, a.dim, a.queries, a.batch, a.k, a.check = 20_000, 64, 256, 128, 32, 256
    devices = a.devices.split(",") if a.devices else ["cuda:0" if torch.cuda.is_available() else "cpu"]
    dev = torch.device(devices[0])
    torch.manual_seed(0)
    store = SyntheticDatastore(a.rows, a.dim, dev)
    t0 = time.perf_counter()
    r = ExactRetriever(store, k=a.k, sim_func=a.sim, dtype=a.dtype, devices=devices)
    sync(dev)
    load = time.perf_counter() - t0
    resident = sum(s.keys.numel() * s.keys.element_size() for s in r.shards)
    g = torch.Generator(device=dev).manual_seed(123)
    rows = torch.randint(0, a.rows, (a.queries,), generator=g, device=dev)
    q = store.keys.gather(rows).float() + torch.randn(a.queries, a.dim, generator=g, device=dev) * 0.5
    r.retrieve(q[:a.batch], nearest_first=False)  # warm-up (kernels, allocator)
    sync(dev)
    t0 = time.perf_counter()
    for s in range(0, a.queries, a.batch):
        nb = r.retrieve(q[s:s + a.batch], nearest_first=False)
    sync(dev)
    search = time.perf_counter() - t0
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"exact search: {a.rows:,} x {a.dim} keys as {r.dtype_name_resolved} on {', '.join(r.devices)} ({gpu}), "
          f"{resident / 2 ** 20:,.1f} MiB resident; k={a.k} ({a.sim}); load {load:.2f} s; "
          f"{a.queries:,} queries in batches of {a.batch}: {search:.3f} s, {a.queries / search:,.0f} queries/s, "
          f"{1e3 * search / math.ceil(a.queries / a.batch):.1f} ms per batch")
    if dev.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(dev) / 2 ** 30:.2f} GiB")
    n = min(a.check, a.queries)
    nb = r.retrieve(q[:n], nearest_first=True)
    ref_d, ref_i = brute_force(store, q[:n], a.k, a.sim)
    hits = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(nb.ids.cpu(), ref_i.cpu()))
    err = ((nb.distances.double() - ref_d).abs() / ref_d.abs().clamp(min=1.0)).max().item()
    print(f"recall vs brute force: {hits / (n * a.k):.4f} over {n} queries; max relative distance error "
          f"{err:.2e}; uncertified by the bound: {r.stats['uncertified']} of {r.stats['queries']} queries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
