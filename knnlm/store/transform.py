"""The query side of a datastore of reduced keys (knnlm.store.reduce): the same FAISS transform."""

import os

import numpy as np

from ..errors import ConfigError, CorruptError


class QueryTransform:
    """The transform of a reduced datastore, applied to queries: (N, d_in) -> (N, d_out) float32."""

    def __init__(self, datastore):
        import faiss

        t = datastore.meta["transform"]
        path = os.path.join(os.path.dirname(os.path.abspath(datastore.prefix)), t["file"])
        if not os.path.exists(path):
            raise CorruptError(f"datastore {datastore.prefix}: its key transform {path} is missing; reduce again")
        self.vt = faiss.read_VectorTransform(path)
        self.d_in, self.d_out = int(t["d_in"]), int(t["d_out"])

    def __call__(self, queries):
        import torch

        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        q = queries.detach().float().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries, np.float32)
        if q.shape[-1] != self.d_in:
            raise ConfigError(f"queries of dimension {q.shape[-1]} for keys reduced from dimension {self.d_in}")
        return torch.from_numpy(self.vt.apply(np.ascontiguousarray(q))).to(device)
