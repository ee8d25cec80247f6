"""The FAISS retrieval strategy: index search, then optional exact distances from the datastore.

No fairseq here: queries come in as arrays or tensors, neighbors go out as tensors on the
queries' device.
"""

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import os

import numpy as np
import torch

from ..errors import ConfigError, CorruptError
from ..timing import timed
from ..index import load_index
from ..index.load import check_metric
from ..index.faiss_utils import FAISS_GPU_MAX_K, maybe_to_gpu, set_nprobe
from .base import Neighbors, Retriever, check_common, check_k_factor
from .registry import register_strategy

logger = logging.getLogger(__name__)

# Bytes of gathered keys per recompute chunk: large enough to amortise, small enough for RAM.
RECOMPUTE_CHUNK_BYTES = 64 << 20
# (query, neighbor) pairs sorted together by the fused recompute: 2M pairs take ~50 MB of
# int64 bookkeeping while sorting, and split a 4096-token eval batch at k = 1024 in two.
SORT_BLOCK_PAIRS = 1 << 21
# Fused-recompute blocks in flight at once: one block's numpy bookkeeping (single-threaded)
# overlaps another's FAISS kernel (benchmarks/README.md, step 14).
RECOMPUTE_BLOCKS_IN_FLIGHT = 2
# Below this many queries a block is recomputed in its own order: sorting its pairs by id costs
# more than the cache reuse it buys (RetoMaton's and adaptive retrieval's small searches).
SORT_MIN_ROWS = int(os.environ.get("KNNLM_SORT_MIN_ROWS", 256))


def available_memory():
    """MemAvailable of /proc/meminfo in bytes, or None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def advise_random_beyond_memory(datastore):
    """Memory-mapped keys larger than the memory available now cannot stay in the page cache:
    the recompute's reads of them are random, and the kernel's read-around on each page fault
    would read (and evict) megabytes for one 2-4 KiB key. Keys that fit keep the read-around,
    which warms the cache far faster than single pages (benchmarks/README.md, Scale)."""
    avail = available_memory()
    if avail is not None and getattr(datastore, "keys_bytes", 0) > avail and datastore.advise_random():
        logger.info("datastore %s: %.1f GiB of keys, %.1f GiB of memory available: reading keys at random "
                    "(no read-around)", datastore.prefix, datastore.keys_bytes / 2**30, avail / 2**30)


@register_strategy("faiss")
class FaissRetriever(Retriever):
    """Search `index` for the k nearest datastore entries of each query.

    sim_func: "l2" recomputes exact squared L2 from the full-precision keys (the paper's
    WikiText-103 setting), "do_not_recomp_l2" keeps FAISS's quantized distances, "dot"
    recomputes inner products.

    k_factor > 1 (FAISS's IndexRefine idea, on our datastore's keys): FAISS returns
    ceil(k * k_factor) candidates, their exact distances are computed, and the k nearest are
    kept. It lets a coarse but fast index (4-bit fast-scan PQ) match or beat the recall of
    8-bit PQ at k (benchmarks/README.md); it needs exact distances (l2 or dot).
    """

    def __init__(self, index, datastore, *, k=1024, nprobe=32, sim_func="l2", gpu=False, k_factor=1.0,
                 allow_index_without_fingerprint=False):
        check_common(datastore, k, sim_func)
        if nprobe < 1:
            raise ConfigError(f"--probe must be at least 1, got {nprobe}")
        check_k_factor(k_factor, sim_func)
        if isinstance(index, str):
            index = load_index(index, datastore=datastore, sim_func=sim_func,
                               allow_without_fingerprint=allow_index_without_fingerprint)
        else:
            check_metric(index, sim_func)  # an inner-product index serves dot only, an L2 one l2
        if index.d != datastore.dim:
            raise ConfigError(
                f"index has dimension {index.d} but datastore {datastore.prefix} has {datastore.dim}"
            )
        self.datastore = datastore
        self.k, self.nprobe, self.sim_func = k, nprobe, sim_func
        self.k_search = min(datastore.size, math.ceil(k * k_factor))  # candidates asked of FAISS
        self.recompute = sim_func != "do_not_recomp_l2"
        self.index = index
        self._pool = None  # threads of the fused recompute, started on first use
        if self.recompute:
            advise_random_beyond_memory(datastore)
        set_nprobe(index, nprobe)
        if gpu:
            self.index = self._to_gpu(index)

    @classmethod
    def validate_options(cls, opts):
        if not opts.dstore_filename or not opts.indexfile:
            raise ConfigError("--knnlm needs both --dstore-filename PREFIX and --indexfile INDEX")
        check_k_factor(opts.knn_k_factor, opts.knn_sim_func)

    @classmethod
    def from_options(cls, opts, datastore):
        return cls(opts.indexfile, datastore, k=opts.k, nprobe=opts.probe, sim_func=opts.knn_sim_func,
                   gpu=opts.knn_gpu, k_factor=opts.knn_k_factor,
                   allow_index_without_fingerprint=opts.knn_allow_index_without_fingerprint)

    def _to_gpu(self, index):
        if self.k_search > FAISS_GPU_MAX_K:
            raise ConfigError(
                f"--k {self.k} (x --knn-k-factor: {self.k_search} candidates) is above FAISS's GPU limit "
                f"of {FAISS_GPU_MAX_K} neighbors (per GPU shard too); lower --k, search on the CPU (drop --knn-gpu), "
                f"or search exactly on the GPU (--knn-search exact, no such limit)"
            )
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        gpu_index, on_gpu = maybe_to_gpu(index, True, "--knn-gpu: searching", device=device, all_gpus=True)
        if on_gpu:
            set_nprobe(gpu_index, self.nprobe)
        return gpu_index

    def _host_queries(self, queries):
        """(N, D) queries as a C-contiguous float32 numpy array on the host: one copy off a GPU
        at most, none at all for float32 CPU tensors or arrays."""
        if torch.is_tensor(queries):
            q = queries.detach()
            q = (q if q.dtype == torch.float32 else q.float()).cpu().numpy()
        else:
            q = np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.datastore.dim:
            raise ConfigError(f"queries of shape {q.shape} do not match the datastore's dimension {self.datastore.dim}")
        if not np.isfinite(q).all():  # one vectorised pass; FAISS would return garbage neighbors
            bad = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
            raise CorruptError(f"query {bad} of this batch is not finite (NaN/inf in the model's "
                               f"states): the kNN-LM cannot score it; check the model and its precision")
        return np.ascontiguousarray(q)

    def search(self, queries):
        """(N, D) queries -> (distances (N, k) float32, ids (N, k) int64) from FAISS (k_search
        candidates with k_factor > 1)."""
        return self.index.search(self._host_queries(queries), self.k_search)

    def retrieve(self, queries, context=None, *, nearest_first=True):
        """(N, D) queries -> Neighbors on the queries' device.

        distances: exact squared L2 or inner products if recomputing, else FAISS's;
        values: the datastore's next tokens; valid: False where FAISS found fewer than k;
        ids: the datastore rows (-1 where missing).
        nearest_first (k_factor > 1 only): the k kept come sorted by exact distance, as an
        export needs (its k sweeps take each row's first k); False leaves them in any order,
        which no score depends on, and keeps them about 3x faster. With k_factor 1 the order is
        FAISS's. The context is unused.
        """
        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        q = self._host_queries(queries)  # searched and (on the fast path) recomputed on the host
        with timed("search"):
            dists, ids = self.index.search(q, self.k_search)
        valid, safe_ids = self._valid_ids(ids)
        if self.recompute:
            with timed("recompute"):
                dists = self._fused_distances(q, safe_ids)
                if dists is None:  # keys that FAISS cannot read in place: gather them, compute on `device`
                    on_device = queries if torch.is_tensor(queries) and queries.device.type != "cpu" else None
                    dists = self._gathered_distances(q if on_device is None else on_device, safe_ids)
                if self.k_search > self.k:
                    dists, ids = self._keep_nearest(dists, ids, valid, nearest_first)
                    valid, safe_ids = self._valid_ids(ids)
        self._check_distances(dists, valid)
        vals = np.asarray(self.datastore.gather_vals(safe_ids))
        dict_size = self.datastore.meta.get("dict_size")
        if dict_size is not None and len(vals) and (vals.max() >= dict_size or vals.min() < 0):
            raise CorruptError(f"datastore {self.datastore.prefix} holds values outside its dictionary of {dict_size}")
        dists = torch.from_numpy(dists) if isinstance(dists, np.ndarray) else dists
        return Neighbors(
            distances=dists.to(device),
            values=torch.from_numpy(vals.astype(np.int64, copy=False)).to(device),
            valid=torch.from_numpy(valid).to(device),
            ids=torch.from_numpy(ids).to(device),
        )

    def _check_distances(self, dists, valid):
        """Stop, by name, on a NaN/inf distance to a found neighbor (a NaN key in the datastore or
        a damaged index): one isfinite over the batch."""
        finite = torch.isfinite(dists) if torch.is_tensor(dists) else torch.from_numpy(np.isfinite(dists))
        if not valid.all():
            finite = finite | torch.from_numpy(~valid).to(finite.device)
        if not bool(finite.all()):
            raise CorruptError(
                f"a neighbor distance is not finite (NaN/inf) for datastore {self.datastore.prefix}: "
                f"its keys or the index hold NaN/inf values; run knnlm-check, dump the datastore and "
                f"build the index again")

    @staticmethod
    def _valid_ids(ids):
        """FAISS ids (-1 where it found no neighbor) -> (valid mask, ids safe to read: row 0 there)."""
        valid = ids >= 0
        return valid, ids if valid.all() else np.where(valid, ids, 0)

    def _keep_nearest(self, dists, ids, valid, nearest_first=True):
        """The k of the k_search candidates nearest by exact distance: (dists, ids), nearest first
        if asked (sorting the k kept costs twice as much as finding them)."""
        d = torch.from_numpy(dists) if isinstance(dists, np.ndarray) else dists
        dot = self.sim_func == "dot"
        if not valid.all():  # rare (a tiny datastore or list): missing slots sort last, ids stay -1
            mask = torch.from_numpy(~valid).to(d.device)
            d = d.masked_fill(mask, float("-inf") if dot else float("inf"))
            ids = np.where(valid, ids, -1)
        d, pos = d.topk(self.k, dim=1, largest=dot, sorted=nearest_first)
        return d, torch.from_numpy(ids).gather(1, pos.cpu()).numpy()

    def exact_distances(self, queries, ids):
        """Exact squared L2 (or inner product) in fp32 against the full-precision keys: (N, k) on the CPU."""
        q = self._host_queries(queries)
        ids = np.asarray(ids, dtype=np.int64)
        out = self._fused_distances(q, ids)
        if out is None:
            return self._gathered_distances(q, ids).cpu()
        return torch.from_numpy(out)

    # ---- recomputing distances ----

    def _key_sources(self):
        """[(id offset, key array)] if every key array can be read in place by FAISS, else None."""
        if not hasattr(self, "_sources"):
            ds = self.datastore
            parts = [(int(off), s.keys) for off, s in zip(ds.offsets, ds.shards)] if hasattr(ds, "shards") else [(0, ds.keys)]
            ok = all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 2
                     and a.flags.c_contiguous for _, a in parts)
            self._sources = parts if ok else None
        return self._sources

    def _fused_distances(self, q, ids):
        """Exact distances by FAISS's fused gather-and-distance kernels, reading each key in place
        from the (memory-mapped) datastore into no buffer; None where the keys are not float32
        arrays in one piece per shard (fp16, say), or for negative ids.

        The (id, position) pairs of a block of queries are first sorted by id, so that a key that
        several queries retrieved (most are, in a batch of thousands of tokens) is read from
        memory once and reused from cache, and the datastore is read in ascending order. The
        per-pair sum is the direct sum((k - q)^2) (or k.q) in float32, OpenMP-parallel; two
        blocks run at once, so one block's sort overlaps the other's kernel.
        """
        sources = self._key_sources()
        if sources is None or (ids.size and ids.min() < 0):
            return None
        import faiss

        ids = np.asarray(ids, dtype=np.int64)
        n, k = ids.shape
        out = np.empty((n, k), dtype=np.float32)
        rows_per_block = max(1, SORT_BLOCK_PAIRS // max(k, 1))
        threads = faiss.omp_get_max_threads()  # OpenMP settings are per thread: carry the caller's

        def block(s):
            faiss.omp_set_num_threads(threads)
            b_ids = ids[s:s + rows_per_block]
            m = b_ids.size
            if len(sources) == 1 and len(b_ids) < SORT_MIN_ROWS:  # few queries share few keys: no sort
                qi = np.repeat(np.arange(s, s + len(b_ids), dtype=np.int64), k)
                self._pairwise_sorted(q, qi, np.ascontiguousarray(b_ids.reshape(-1)), out[s:s + len(b_ids)].reshape(-1),
                                      sources)
                return
            # One sort key per pair: the id above the position's bits (< 2^63 for any datastore
            # below 2^41 rows); shifts and masks split it again, cheaper than a division.
            shift = int(m - 1).bit_length()
            pairs = (b_ids.reshape(-1) << shift) | np.arange(m, dtype=np.int64)
            pairs.sort()
            rows, pos = pairs >> shift, pairs & ((1 << shift) - 1)
            del pairs
            qi = pos // k + s  # the query of each pair
            dist = np.empty(m, dtype=np.float32)
            self._pairwise_sorted(q, qi, rows, dist, sources)
            out[s:s + len(b_ids)].reshape(-1)[pos] = dist  # blocks write disjoint rows

        starts = range(0, n, rows_per_block)
        if len(starts) == 1:
            block(0)
        else:  # numpy and FAISS release the GIL: the blocks' threads really run side by side
            if self._pool is None:
                self._pool = ThreadPoolExecutor(RECOMPUTE_BLOCKS_IN_FLIGHT, thread_name_prefix="knnlm-recompute")
            for _ in self._pool.map(block, starts):
                pass  # re-raises a block's exception here
        return out

    def _pairwise_sorted(self, q, qi, rows, dist, sources):
        """dist[p] = the exact distance of query qi[p] to datastore row rows[p] (rows ascending),
        by FAISS's fused kernel over each shard's keys in place."""
        import faiss

        pairwise = faiss.pairwise_indexed_inner_product if self.sim_func == "dot" else faiss.pairwise_indexed_L2sqr
        ptr = faiss.swig_ptr
        bounds = np.searchsorted(rows, [off for off, _ in sources] + [self.datastore.size])
        for (off, keys), a, b in zip(sources, bounds[:-1], bounds[1:]):
            if b > a:
                r = np.ascontiguousarray(rows[a:b] - off if off else rows[a:b])
                pairwise(self.datastore.dim, int(b - a), ptr(q), ptr(np.ascontiguousarray(qi[a:b])), ptr(keys),
                         ptr(r), ptr(dist[a:b]))

    def pair_distances(self, queries, qi, ids):
        """Exact distances of P (query, row) pairs: query qi[p] to datastore row ids[p] -> (P,) on
        the CPU; the same kernel, and so the same numbers, as `exact_distances`."""
        q = self._host_queries(queries)
        ids = np.asarray(ids, dtype=np.int64)
        sources = self._key_sources()
        if sources is None or (ids.size and ids.min() < 0):
            return super().pair_distances(q, qi, ids)
        order = np.argsort(ids, kind="stable")  # each key read once, the datastore in ascending order
        dist = np.empty(len(ids), dtype=np.float32)
        self._pairwise_sorted(q, np.asarray(qi, dtype=np.int64)[order], ids[order], dist, sources)
        out = np.empty_like(dist)
        out[order] = dist
        return torch.from_numpy(out)

    def _gathered_distances(self, queries, ids):
        """Gather keys with datastore.gather_keys in chunks and compute on the queries' device.

        queries: a numpy array or a tensor (a CUDA tensor keeps the arithmetic on its GPU: each
        chunk of gathered keys crosses to it once, in the keys' own dtype). Returns a tensor.
        """
        q = queries.detach().float() if torch.is_tensor(queries) else torch.from_numpy(np.asarray(queries, np.float32))
        n, k = ids.shape
        d = self.datastore.dim
        out = torch.empty(n, k, dtype=torch.float32, device=q.device)
        rows = max(1, RECOMPUTE_CHUNK_BYTES // (k * d * 4))
        for s in range(0, n, rows):
            chunk_ids = ids[s:s + rows]
            keys = torch.from_numpy(self.datastore.gather_keys(chunk_ids.reshape(-1)))
            keys = keys.to(q.device).float().view(len(chunk_ids), k, d)  # a fresh buffer we may overwrite
            qs = q[s:s + rows].unsqueeze(1)
            if self.sim_func == "dot":
                out[s:s + rows] = keys.mul_(qs).sum(-1)
            else:
                out[s:s + rows] = keys.sub_(qs).pow_(2).sum(-1)
        return out
