"""Nearest-neighbor retrieval: FAISS search, then optional exact distances from the datastore.

No fairseq here: queries come in as arrays or tensors, neighbors go out as tensors on the
queries' device.
"""

import logging

import numpy as np
import torch

from .errors import ConfigError, CorruptError
from .index import load_index
from .scoring import SIM_FUNCS

logger = logging.getLogger(__name__)

FAISS_GPU_MAX_K = 2048
# Bytes of gathered keys per recompute chunk: large enough to amortise, small enough for RAM.
RECOMPUTE_CHUNK_BYTES = 64 << 20


class Retriever:
    """Search `index` for the k nearest datastore entries of each query.

    sim_func: "l2" recomputes exact squared L2 from the full-precision keys (the paper's
    WikiText-103 setting), "do_not_recomp_l2" keeps FAISS's quantized distances, "dot"
    recomputes inner products.
    """

    def __init__(self, index, datastore, *, k=1024, nprobe=32, sim_func="l2", gpu=False):
        if sim_func not in SIM_FUNCS:
            raise ConfigError(f"--knn-sim-func must be one of {', '.join(SIM_FUNCS)}, got {sim_func!r}")
        if k < 1:
            raise ConfigError(f"--k must be at least 1, got {k}")
        if k > datastore.size:
            raise ConfigError(f"--k {k} exceeds the {datastore.size:,} entries of datastore {datastore.prefix}")
        if nprobe < 1:
            raise ConfigError(f"--probe must be at least 1, got {nprobe}")
        if isinstance(index, str):
            index = load_index(index, datastore=datastore)
        if index.d != datastore.dim:
            raise ConfigError(
                f"index has dimension {index.d} but datastore {datastore.prefix} has {datastore.dim}"
            )
        self.datastore = datastore
        self.k, self.nprobe, self.sim_func = k, nprobe, sim_func
        self.recompute = sim_func != "do_not_recomp_l2"
        self.index = index
        self._set_nprobe(index, nprobe)
        if gpu:
            self.index = self._to_gpu(index)

    @staticmethod
    def _set_nprobe(index, nprobe):
        import faiss

        try:
            faiss.extract_index_ivf(index).nprobe = nprobe
        except RuntimeError:
            pass  # a flat index: nothing to probe

    def _to_gpu(self, index):
        import faiss

        if self.k > FAISS_GPU_MAX_K:
            raise ConfigError(
                f"--k {self.k} is above FAISS's GPU limit of {FAISS_GPU_MAX_K} neighbors; "
                f"lower --k or search on the CPU (drop --knn-gpu)"
            )
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            logger.warning("--knn-gpu: this faiss has no GPU support or sees no GPU; searching on the CPU")
            return index
        self._gpu_res = faiss.StandardGpuResources()
        options = faiss.GpuClonerOptions()
        options.useFloat16LookupTables = True  # PQ64 lookup tables do not fit shared memory in fp32
        gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, torch.cuda.current_device(), index, options)
        self._set_nprobe(gpu_index, self.nprobe)
        return gpu_index

    def search(self, queries):
        """(N, D) queries -> (distances (N, k) float32, ids (N, k) int64) from FAISS."""
        q = queries.detach().float().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.datastore.dim:
            raise ConfigError(f"queries of shape {q.shape} do not match the datastore's dimension {self.datastore.dim}")
        return self.index.search(np.ascontiguousarray(q), self.k)

    def __call__(self, queries):
        """(N, D) queries -> (distances, values, valid) as tensors on the queries' device.

        distances: exact squared L2 or inner products if recomputing, else FAISS's;
        values: the datastore's next tokens; valid: False where FAISS found fewer than k.
        """
        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        dists, ids = self.search(queries)
        valid = ids >= 0
        safe_ids = np.where(valid, ids, 0)
        vals = np.asarray(self.datastore.gather_vals(safe_ids))
        dict_size = self.datastore.meta.get("dict_size")
        if dict_size is not None and len(vals) and (vals.max() >= dict_size or vals.min() < 0):
            raise CorruptError(f"datastore {self.datastore.prefix} holds values outside its dictionary of {dict_size}")
        if self.recompute:
            q = queries.detach().float() if torch.is_tensor(queries) else torch.from_numpy(np.asarray(queries, np.float32))
            dists = self.exact_distances(q.cpu(), safe_ids)
        else:
            dists = torch.from_numpy(dists)
        return (
            dists.to(device),
            torch.from_numpy(vals.astype(np.int64, copy=False)).to(device),
            torch.from_numpy(valid).to(device),
        )

    def exact_distances(self, queries, ids):
        """Exact squared L2 (or inner product) in fp32 against the full-precision keys, in chunks."""
        n, k = ids.shape
        d = self.datastore.dim
        out = torch.empty(n, k, dtype=torch.float32)
        rows = max(1, RECOMPUTE_CHUNK_BYTES // (k * d * 4))
        for s in range(0, n, rows):
            chunk_ids = ids[s:s + rows]
            keys = torch.from_numpy(self.datastore.gather_keys(chunk_ids.reshape(-1))).float()
            keys = keys.view(len(chunk_ids), k, d)
            q = queries[s:s + rows].unsqueeze(1)
            if self.sim_func == "dot":
                out[s:s + rows] = (keys * q).sum(-1)
            else:
                out[s:s + rows] = (keys - q).pow_(2).sum(-1)
        return out
