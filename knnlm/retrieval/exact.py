"""Exact nearest-neighbor search with torch, the datastore's keys resident on a device.

No index: every key is scored against every query by chunked matrix products (one GEMM per
chunk of keys, top-k per chunk, merged as it goes), then the candidates' distances are
recomputed exactly in fp32 from the full-precision keys. It runs on CUDA (fast) and on the
CPU (slowly; what the tests use), and shards the keys across several devices. It is the
"real mask" of Xu et al. (2023), Table 3: no approximate search between the query and its
true k nearest neighbors.

    retriever = ExactRetriever(datastore, k=1024, dtype="fp16", devices=["cuda:0", "cuda:1"])
    knn = KNNLM(retriever, lmbda=0.25, temperature=1.0)
"""

import contextlib
import logging
import math
import warnings

import numpy as np
import torch

from ..errors import ConfigError, CorruptError
from .base import Neighbors, Retriever, check_common
from .registry import register_strategy

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
EXACT_DTYPES = ("auto",) + tuple(DTYPES)
# Unit roundoff of each search dtype (half the distance between 1 and the next number).
_UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
_FINITE_MAX = {torch.float32: 3.4e38, torch.float16: 65504.0, torch.bfloat16: 3.38e38}
# Extra columns of the resident keys: the l2 term ||k||^2 rides in the matrix product (one
# column), padded so the row length stays a multiple of 8 (tensor-core friendly).
_PAD = 8
# Bytes a chunk of the search may take for its score matrix (queries x keys), per device.
SCORE_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
# A chunk of keys spans at least this many rows (fewer queries per block instead).
CHUNK_MIN_ROWS = 32768
# Host bytes of keys read from the memory map and copied to the device at once while loading.
LOAD_CHUNK_BYTES = 256 << 20
# Bytes of gathered keys per chunk of the exact fp32 re-scoring.
RESCORE_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 64 << 20}
# Candidates taken beyond k at least (candidate_margin's defaults), for half and for fp32 search.
HALF_MIN_MARGIN = 32
FP32_MIN_MARGIN = 8


def parse_devices(spec):
    """'--knn-exact-devices' text -> a device list, or None (the queries' device, chosen lazily).

    None/'' -> None; 'all' -> every visible CUDA device (['cpu'] if none); otherwise a comma
    list such as 'cuda:0,cuda:1' or 'cpu,cpu' (several CPU "devices" shard on one CPU)."""
    if spec is None or str(spec).strip() in ("", "auto", "none"):
        return None
    spec = str(spec).strip()
    if spec == "all":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    out = []
    for part in spec.split(","):
        part = part.strip()
        try:
            dev = torch.device(part)
        except RuntimeError as e:
            raise ConfigError(f"--knn-exact-devices: {part!r} is not a device (cpu, cuda, cuda:1, ...): {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--knn-exact-devices: {part!r} asked for, but torch sees no CUDA device")
        out.append(part)
    if not out:
        raise ConfigError(f"--knn-exact-devices: no device in {spec!r}")
    return out


def _tensor(a):
    """A chunk read from a datastore as a tensor: numpy arrays (memory maps) wrapped, tensors as they are
    (a datastore-like object may hold its keys as a tensor on a device: benchmarks/exact_gpu.py does)."""
    if torch.is_tensor(a):
        return a
    with warnings.catch_warnings():  # a read-only memory map: the tensor is only read, never written
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(np.asarray(a)))


def _read_rows(datastore, start, stop):
    """Keys of rows [start, stop) as a tensor (one read of the memory map per shard)."""
    if hasattr(datastore, "shards"):  # a ShardedDatastore: rows may straddle shards
        parts = []
        for off, shard in zip(datastore.offsets[:-1], datastore.shards):
            a, b = max(start, int(off)), min(stop, int(off) + shard.size)
            if a < b:
                parts.append(_tensor(shard.keys[a - int(off):b - int(off)]))
        return parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts])
    return _tensor(datastore.keys[start:stop])


def _read_vals(datastore, start, stop):
    if hasattr(datastore, "shards"):
        return _tensor(datastore.gather_vals(np.arange(start, stop, dtype=np.int64)))
    return _tensor(datastore.vals[start:stop])


def _keys_dtype(datastore):
    """The datastore's key dtype as numpy's (float16 or float32)."""
    dt = datastore.keys_dtype if hasattr(datastore, "keys_dtype") else datastore.keys.dtype
    if isinstance(dt, torch.dtype):
        return np.dtype({torch.float16: np.float16, torch.float32: np.float32}.get(dt, np.float64))
    return np.dtype(dt)


@contextlib.contextmanager
def _strict_matmuls():
    """cuBLAS as the error bound assumes it: fp32 accumulation all the way (no fp16/bf16 split-K
    reductions, no TF32 for fp32 products); torch's global settings are restored afterwards."""
    m = torch.backends.cuda.matmul
    names = ("allow_tf32", "allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")
    saved = {n: getattr(m, n) for n in names}
    try:
        for n in names:
            setattr(m, n, False)
        yield
    finally:
        for n, v in saved.items():
            setattr(m, n, v)


def _gib(n):
    return f"{n / 2 ** 30:.2f} GiB"


class _Shard:
    """Rows [start, stop) of the datastore resident on one device: keys (+ the l2 column), values."""

    def __init__(self, start, stop, device):
        self.start, self.stop, self.device = start, stop, torch.device(device)
        self.keys = None   # (n, D + pad) in the search dtype; columns D.. hold ||k||^2 / sigma (l2), zeros
        self.vals = None   # (n,) int64
        self.kmax = 0.0    # the largest key norm (the error bound needs it)
        self.sigma = 1.0   # ||k||^2 column scale (a power of two)

    @property
    def size(self):
        return self.stop - self.start


@register_strategy("exact")
class ExactRetriever(Retriever):
    """Exact k nearest neighbors by brute force on a device (CUDA or CPU), keys resident there.

    datastore: a `Datastore` or `ShardedDatastore` (keys fp16 or fp32, read in chunks from
        its memory map: never more than one chunk of LOAD_CHUNK_BYTES in host memory at once).
    k: neighbors per query (1 <= k <= datastore size; no other cap).
    sim_func: "l2" (squared L2, nearest = smallest) or "dot" (inner product, nearest =
        largest). "do_not_recomp_l2" (an index's quantized distances) means nothing here:
        there is no index, and it is refused by name; use "l2", which is exact anyway.
    dtype: the resident keys' dtype for the search pass: "fp16", "bf16", "fp32", or "auto"
        (fp16 on CUDA, fp32 on the CPU, where half-precision matrix products are slower).
    devices: where the keys live: None (the device of the first queries, loaded then), or a
        list such as ["cuda:0", "cuda:1"]; rows are split evenly across the list, each shard
        searched on its own device, and the shards' candidates merged. Several "cpu" entries
        shard on one CPU (the tests' stand-in for several GPUs).
    candidate_factor, candidate_margin: the search pass keeps
        m = max(ceil(k * candidate_factor), k + candidate_margin) candidates per shard, capped
        at the shard's size; defaults: factor 2 and margin 32 for fp16/bf16, factor 1 and
        margin 8 for fp32 (its products round too, far less).
    memory_budget: bytes each device may hold for this retriever (keys, values and the
        search's work buffers); a datastore that needs more is refused with the sizes. On
        CUDA the free memory (`torch.cuda.mem_get_info`) is also a bound; on the CPU only
        this budget is checked (None: no check).

    How a search goes. The keys k_j are resident as rows [k_j, ||k_j||^2 / sigma, 0...]; a
    query q becomes [q / s, -sigma / (2 s), 0...] with s = max(||q||, ...) a per-query
    positive scale (it keeps every number well inside fp16's range), so that one matrix
    product gives r'_j = (q.k_j - ||k_j||^2 / 2) / s = -(||q - k_j||^2 - ||q||^2) / (2 s):
    ordering by r' is ordering by distance (for dot the extra column is 0 and r' = q.k / s). Keys are taken in chunks of SCORE_CHUNK_BYTES of
    scores, the top m of each chunk merged into the running top m. Then the m candidates are
    re-scored exactly in fp32 (sum((k - q)^2), or q.k, from the full-precision keys: the
    resident ones when their dtype holds the datastore's losslessly, else the datastore's own
    keys, gathered) and the k nearest kept, sorted nearest first if asked. Half precision can
    therefore change WHICH keys are candidates, never the distances returned.

    The margin, and the bound. With unit roundoff u of the search dtype (2^-11 fp16, 2^-8
    bf16, 2^-24 fp32), fp32 accumulation of the products (cuBLAS and torch's CPU kernels do
    so for half inputs) and K = max_j ||k_j||, every approximate score r~_j = -2 s r'~_j
    differs from the true r_j = ||k_j||^2 - 2 q.k_j by at most

        E(q) = (4u + (D + 8) 2^-23) (2 ||q|| K + K^2)

    (each of q, k_j, the ||k||^2 column and the product's output is rounded once; the search
    turns off cuBLAS's reduced-precision reductions and TF32 while it runs). A key
    outside the true k nearest becomes a candidate instead of a true neighbor only if its
    r~ falls below the true neighbor's, i.e. only among keys whose exact r lies within 2 E(q)
    of the k-th nearest's; taking m >= k + (the number of such near-ties) candidates loses
    nothing. This is checked per query, a posteriori: with t the largest r~ among a shard's
    candidates (every key not taken has r~ >= t, so exact r >= t - E), the result is
    certified exact when t - E(q) >= r of the k-th neighbor kept (its exact distance minus
    ||q||^2; for dot, r = -q.k), or when a shard's m covers all its rows. `self.stats` counts
    the queries searched and those left uncertified: none, typically, for fp32 and fp16; bf16's
    8-bit mantissa makes E large enough that many queries stay unproven although the
    neighbors found are, in practice, the exact ones. Raise candidate_factor to prove more.
    """

    search_name = "exact"  # KNNLM.describe() adds it to the summary line's settings

    def __init__(self, datastore, *, k=1024, sim_func="l2", dtype="auto", devices=None, candidate_factor=None,
                 candidate_margin=None, memory_budget=None, score_chunk_bytes=None):
        if sim_func == "do_not_recomp_l2":
            raise ConfigError("--knn-search exact computes exact distances and has no index distances to keep: "
                              "--knn-sim-func do_not_recomp_l2 needs --knn-search faiss; use l2 (or dot)")
        check_common(datastore, k, sim_func)
        if dtype not in EXACT_DTYPES:
            raise ConfigError(f"--knn-exact-dtype must be one of {', '.join(EXACT_DTYPES)}, got {dtype!r}")
        if candidate_factor is not None and (not math.isfinite(candidate_factor) or candidate_factor < 1):
            raise ConfigError(f"the exact search's candidate_factor must be a finite number >= 1, got {candidate_factor}")
        if candidate_margin is not None and (int(candidate_margin) != candidate_margin or candidate_margin < 0):
            raise ConfigError(f"the exact search's candidate_margin must be a whole number >= 0, got {candidate_margin}")
        if memory_budget is not None and memory_budget <= 0:
            raise ConfigError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        if devices is not None and not list(devices):
            raise ConfigError("ExactRetriever: devices is an empty list")
        self.datastore, self.k, self.sim_func = datastore, int(k), sim_func
        self.dtype_name, self.candidate_factor, self.candidate_margin = dtype, candidate_factor, candidate_margin
        self.memory_budget, self.score_chunk_bytes = memory_budget, score_chunk_bytes
        self.stats = {"queries": 0, "uncertified": 0}
        self.shards = None
        self.devices = None if devices is None else [str(d) for d in devices]
        if self.devices is not None:
            self._load(self.devices)

    @classmethod
    def validate_options(cls, opts):
        if not opts.dstore_filename:
            raise ConfigError("--knnlm --knn-search exact needs --dstore-filename PREFIX (no index file)")
        if opts.knn_sim_func == "do_not_recomp_l2":
            raise ConfigError("--knn-search exact computes exact distances and has no index distances to keep: "
                              "--knn-sim-func do_not_recomp_l2 needs --knn-search faiss; use l2 (or dot)")
        if opts.no_load_keys:
            raise ConfigError("--knn-search exact searches the keys themselves: drop --no-load-keys")
        if opts.knn_k_factor != 1:
            raise ConfigError("--knn-k-factor re-ranks FAISS's candidates; --knn-search exact has no index to "
                              "re-rank: drop it")
        if opts.knn_exact_dtype not in EXACT_DTYPES:
            raise ConfigError(f"--knn-exact-dtype must be one of {', '.join(EXACT_DTYPES)}, got {opts.knn_exact_dtype!r}")

    @classmethod
    def from_options(cls, opts, datastore):
        return cls(datastore, k=opts.k, sim_func=opts.knn_sim_func, dtype=opts.knn_exact_dtype,
                   devices=parse_devices(opts.knn_exact_devices))

    # ---- loading ----

    def _resolve_dtype(self, devices):
        if self.dtype_name != "auto":
            return DTYPES[self.dtype_name]
        return torch.float16 if all(torch.device(d).type == "cuda" for d in devices) else torch.float32

    def _m(self, shard_size):
        half = self.dtype != torch.float32
        factor = self.candidate_factor if self.candidate_factor is not None else (2.0 if half else 1.0)
        margin = self.candidate_margin if self.candidate_margin is not None else (
            HALF_MIN_MARGIN if half else FP32_MIN_MARGIN)
        m = max(math.ceil(self.k * factor), self.k + int(margin))
        return min(m, shard_size)

    def _chunk_budget(self, device, table):
        if self.score_chunk_bytes is not None:
            return int(self.score_chunk_bytes)
        return table["cuda" if torch.device(device).type == "cuda" else "cpu"]

    def required_bytes(self, rows, device):
        """Bytes `rows` keys take on `device`: resident keys (D + 8 columns in the search
        dtype), values (int64) and the work buffers of one search chunk and one re-scoring chunk."""
        d = self.datastore.dim + _PAD
        item = torch.empty(0, dtype=self.dtype).element_size()
        return rows * (d * item + 8) + self._chunk_budget(device, SCORE_CHUNK_BYTES) \
            + self._chunk_budget(device, RESCORE_CHUNK_BYTES)

    def _check_memory(self, shards):
        """Refuse, before loading anything, a device that cannot hold its shards (several shards
        on one device add up; the work buffers are counted once, the shards being searched in turn)."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        rows = {}
        for s in shards:
            rows[s.device] = rows.get(s.device, 0) + s.size
        for device, n in rows.items():
            need = self.required_bytes(n, device)
            free, where = None, None
            if device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(device)
                where = "free"
            if self.memory_budget is not None and (free is None or self.memory_budget < free):
                free, where = int(self.memory_budget), "allowed (memory_budget)"
            if free is not None and need > free:
                raise ConfigError(
                    f"--knn-search exact: datastore {self.datastore.prefix} does not fit on {device}: its "
                    f"{n:,} x {self.datastore.dim} keys as {self.dtype_name_resolved} ({item} bytes each) need "
                    f"{need:,} bytes ({_gib(need)}, work buffers included) but {free:,} bytes ({_gib(free)}) are "
                    f"{where} there; shard it over more devices (--knn-exact-devices), use a smaller "
                    f"--knn-exact-dtype, or search an index (--knn-search faiss)")

    @property
    def dtype_name_resolved(self):
        return {v: n for n, v in DTYPES.items()}[self.dtype]

    def _load(self, devices):
        ds = self.datastore
        self.dtype = self._resolve_dtype(devices)
        bounds = np.linspace(0, ds.size, len(devices) + 1).round().astype(np.int64)
        shards = [_Shard(int(a), int(b), dev) for a, b, dev in zip(bounds[:-1], bounds[1:], devices) if b > a]
        self._check_memory(shards)
        src = _keys_dtype(ds)
        # Re-score from the resident keys when they hold the datastore's keys exactly.
        self.rescore_resident = self.dtype == torch.float32 or (src == np.float16 and self.dtype == torch.float16)
        dict_size = ds.meta.get("dict_size") if isinstance(getattr(ds, "meta", None), dict) else None
        for s in shards:
            self._load_shard(s, dict_size)
        self.shards = shards
        self.devices = [str(s.device) for s in shards]
        logger.info("exact search: %s keys of dimension %d resident as %s on %s", f"{ds.size:,}", ds.dim,
                    self.dtype_name_resolved, ", ".join(self.devices))

    def _load_shard(self, s, dict_size):
        ds, d, dt = self.datastore, self.datastore.dim, self.dtype
        keys = torch.zeros(s.size, d + _PAD, dtype=dt, device=s.device)
        sq = torch.empty(s.size, dtype=torch.float32, device=s.device)
        vals = torch.empty(s.size, dtype=torch.int64, device=s.device)
        rows = max(1, LOAD_CHUNK_BYTES // (d * _keys_dtype(ds).itemsize))
        for a in range(s.start, s.stop, rows):
            b = min(a + rows, s.stop)
            host = _read_rows(ds, a, b)
            chunk = host.to(s.device).float()
            if not torch.isfinite(chunk).all():
                raise CorruptError(f"datastore {ds.prefix} holds non-finite keys in rows {a:,}..{b - 1:,}")
            if dt != torch.float32 and chunk.abs().max().item() > _FINITE_MAX[dt]:
                raise ConfigError(f"--knn-exact-dtype {self.dtype_name_resolved}: keys of datastore {ds.prefix} "
                                  f"exceed its range ({_FINITE_MAX[dt]:g}); use bf16 or fp32")
            keys[a - s.start:b - s.start, :d] = chunk.to(dt)
            sq[a - s.start:b - s.start] = chunk.pow(2).sum(1)
            v = _read_vals(ds, a, b).to(s.device).long()
            if dict_size is not None and len(v) and (int(v.max()) >= dict_size or int(v.min()) < 0):
                raise CorruptError(f"datastore {ds.prefix} holds values outside its dictionary of {dict_size}")
            vals[a - s.start:b - s.start] = v
            del host, chunk
        kmax2 = float(sq.max()) if s.size else 0.0
        s.kmax = math.sqrt(kmax2)
        if self.sim_func == "l2":
            # ||k||^2 / sigma stays below 256: far inside fp16's range, its rounding relative.
            s.sigma = 2.0 ** max(0, math.ceil(math.log2(max(kmax2, 1.0) / 256.0)))
            keys[:, d] = (sq / s.sigma).to(dt)
        s.keys, s.vals = keys, vals

    # ---- searching ----

    def _query_rows(self, q, s):
        """(B, D) fp32 queries -> ((B, D + pad) rows in the search dtype on the shard's device, scale s (B,))."""
        d = self.datastore.dim
        qn = q.norm(dim=1)
        # s >= ||q|| keeps |q / s| <= 1; s >= K^2 / 60000 keeps ||k||^2 / (2 s) below 32,000.
        scale = torch.clamp(qn, min=max(s.kmax ** 2 / 60000.0, 1e-30))
        rows = torch.zeros(q.shape[0], d + _PAD, dtype=torch.float32, device=q.device)
        rows[:, :d] = q / scale[:, None]
        if self.sim_func == "l2":
            rows[:, d] = -s.sigma / (2 * scale)
        return rows.to(device=s.device, dtype=self.dtype), scale.to(s.device)

    def _search_shard(self, q, s):
        """Top m candidates of one shard, on its device: (ids (B, m) int64, rows of the shard, in
        any order; threshold (B,): the largest approximate r~ = ||k||^2 - 2 q.k (l2) or -q.k
        (dot) among them, +inf where every row of the shard is a candidate).

        Queries go in blocks small enough that a chunk of the score budget still spans at least
        CHUNK_MIN_ROWS keys (or 16 m): the GEMM stays large and the merges stay rare."""
        m = self._m(s.size)
        rows, scale = self._query_rows(q, s)
        n_q = rows.shape[0]
        per_score = torch.empty(0, dtype=self.dtype).element_size() + 4  # a score, and topk's work
        budget = self._chunk_budget(s.device, SCORE_CHUNK_BYTES)
        min_rows = min(s.size, max(16 * m, CHUNK_MIN_ROWS))
        block = max(1, min(n_q, budget // (min_rows * per_score)))
        ids = torch.empty(n_q, m, dtype=torch.int64, device=s.device)
        worst = torch.empty(n_q, dtype=torch.float32, device=s.device)
        for qa in range(0, n_q, block):
            ids[qa:qa + block], worst[qa:qa + block] = self._search_block(rows[qa:qa + block], s, m, budget, per_score)
        if m < s.size:  # the farthest candidate, back in r~ units: -2 s r' (l2), -s r' (dot)
            threshold = worst * scale * (-1.0 if self.sim_func == "dot" else -2.0)
        else:
            threshold = torch.full((n_q,), math.inf, device=s.device)
        return ids, threshold

    def _search_block(self, rows, s, m, budget, per_score):
        """One block of query rows against every chunk of the shard: (top-m rows (b, m), the smallest r' kept (b,))."""
        chunk = max(m, budget // max(1, rows.shape[0] * per_score))
        best_v = best_i = None
        for a in range(0, s.size, chunk):
            scores = rows @ s.keys[a:a + chunk].T           # (b, c): r' = -r / (2 s), larger is nearer
            v, i = scores.topk(min(m, scores.shape[1]), dim=1, largest=True, sorted=False)
            i += a
            if best_v is not None:
                v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
                if v.shape[1] > m:
                    v, pos = v.topk(m, dim=1, largest=True, sorted=False)
                    i = i.gather(1, pos)
            best_v, best_i = v, i
        return best_i, best_v.min(1).values.float()

    def _exact(self, q, local_ids, s):
        """Exact fp32 distances (squared L2 or q.k) of q (B, D) fp32 to the shard's rows local_ids (B, m)."""
        d = self.datastore.dim
        n_q, m = local_ids.shape
        out = torch.empty(n_q, m, dtype=torch.float32, device=s.device)
        per = max(1, self._chunk_budget(s.device, RESCORE_CHUNK_BYTES) // max(1, m * d * 4))
        for a in range(0, n_q, per):
            ids = local_ids[a:a + per]
            if self.rescore_resident:
                keys = s.keys[:, :d][ids.reshape(-1)].float()
            else:  # the datastore's own full-precision keys (host memory map), in ascending order
                host = self.datastore.gather_keys((ids.reshape(-1) + s.start).cpu().numpy())
                keys = torch.from_numpy(np.ascontiguousarray(host)).to(s.device).float()
            keys = keys.view(len(ids), m, d)
            qs = q[a:a + per].unsqueeze(1)
            out[a:a + per] = keys.mul_(qs).sum(-1) if self.sim_func == "dot" else keys.sub_(qs).pow_(2).sum(-1)
        return out

    def retrieve(self, queries, context=None, *, nearest_first=True):
        """(N, D) queries (tensor or array) -> Neighbors on the queries' device: exact fp32
        distances, values, valid (all True: k <= datastore size), ids; sorted nearest first
        if asked (else in any order). The context is unused."""
        if torch.is_tensor(queries):
            q = queries.detach()
        else:
            q = torch.from_numpy(np.ascontiguousarray(np.asarray(queries, dtype=np.float32)))
        device = q.device
        if q.ndim != 2 or q.shape[1] != self.datastore.dim:
            raise ConfigError(f"queries of shape {tuple(q.shape)} do not match the datastore's dimension "
                              f"{self.datastore.dim}")
        if self.shards is None:
            self._load([str(device)])
        q = q.float()
        dot = self.sim_func == "dot"
        dists, ids, thresholds = [], [], []
        with _strict_matmuls():
            per_shard = [self._search_shard(q.to(s.device), s) for s in self.shards]
        for s, (local, t) in zip(self.shards, per_shard):
            exact = self._exact(q.to(s.device), local, s)
            dists.append(exact.to(device))
            ids.append((local + s.start).to(device))
            thresholds.append(t.to(device))
        dists = dists[0] if len(dists) == 1 else torch.cat(dists, 1)
        ids = ids[0] if len(ids) == 1 else torch.cat(ids, 1)
        d, pos = dists.topk(self.k, dim=1, largest=dot, sorted=nearest_first)
        ids = ids.gather(1, pos)
        self._certify(q.to(device), d, torch.stack(thresholds, 1).min(1).values)
        vals = self._values(ids)
        return Neighbors(distances=d, values=vals, valid=torch.ones_like(ids, dtype=torch.bool), ids=ids)

    def _values(self, ids):
        if len(self.shards) == 1:
            s = self.shards[0]
            return s.vals[ids.to(s.device)].to(ids.device)
        out = torch.empty_like(ids)
        for s in self.shards:
            sel = (ids >= s.start) & (ids < s.stop)
            if sel.any():
                out[sel] = s.vals[(ids[sel] - s.start).to(s.device)].to(ids.device)
        return out

    def _certify(self, q, d, threshold):
        """Count queries whose result the error bound cannot prove exact (see the class docstring)."""
        self.stats["queries"] += q.shape[0]
        if not torch.isfinite(threshold).any():
            return  # every row was a candidate
        u = _UNIT_ROUNDOFF[self.dtype]
        kmax = max(s.kmax for s in self.shards)
        qn = q.norm(dim=1)
        err = (4 * u + (self.datastore.dim + _PAD) * 2.0 ** -23) * (2 * qn * kmax + kmax ** 2)
        worst = d.max(1).values if self.sim_func == "l2" else d.min(1).values  # the k-th neighbor kept
        r_k = worst - qn ** 2 if self.sim_func == "l2" else -worst
        self.stats["uncertified"] += int((threshold - err < r_k).sum())

    def exact_distances(self, queries, ids):
        """Exact fp32 squared L2 (or inner products) of queries (N, D) to global rows ids (N, k), on the CPU."""
        q = torch.as_tensor(np.asarray(queries, dtype=np.float32)) if not torch.is_tensor(queries) else queries.float()
        keys = torch.from_numpy(np.ascontiguousarray(self.datastore.gather_keys(np.asarray(ids).reshape(-1))))
        keys = keys.float().view(*np.asarray(ids).shape, -1)
        qs = q.cpu().unsqueeze(1)
        return (keys * qs).sum(-1) if self.sim_func == "dot" else (keys - qs).pow(2).sum(-1)
