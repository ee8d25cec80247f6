"""Searching an index kept in parts, one per datastore shard (`knnlm-build-index merge=none`).

Each shard is served by a `ShardSearcher`, which holds that shard's part of the index and a
memory map of that shard's keys: it searches its part and computes the exact distances of its
candidates from its own keys. `executor="local"` runs the searchers in threads of this
process; `executor="ray"` runs each in a Ray actor placed on the node holding the shard (the
custom resource `shard_k`, knnlm.cluster), and the queries of a batch are put into Ray's
object store once for all of them.

Merging gives exactly what one index built from the same trained quantizer finds: every part
was trained once, so an IVF query probes the same lists in each part, and the k_search
nearest by FAISS's distance over the whole index are the k_search nearest of the union of the
parts' k_search nearest. `faiss.merge_knn_results` takes those by FAISS's distance; the exact
distances ride along (each candidate's slot in the concatenated results is what is merged);
with k_factor > 1 the k nearest by exact distance are then kept, as FaissRetriever does.

Pipelining: `submit(queries)` starts a batch's search and returns at once (Ray ObjectRefs, or
thread futures); `collect(pending)` waits and merges. A front-end submits batch i, runs the
LM forward of batch i+1, then collects batch i. `retrieve` is the two back to back.

A shard that cannot answer (its actor died, its node left) is a ShardUnavailableError naming
the shard and its node: nothing is ever computed from the surviving shards alone.
"""

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .. import cluster
from ..errors import ConfigError, CorruptError, MismatchError
from ..index import shard_manifest
from .base import Neighbors, Retriever, check_common, check_k_factor
from .registry import register_strategy

logger = logging.getLogger(__name__)
# How long a shard's actor may take to be placed and to load its part of the index.
ACTOR_START_TIMEOUT_S = 600


class ShardSearcher:
    """One shard's part of the index and its keys: search, exact distances, values.

    Runs in a thread of the front-end's process or as a Ray actor on the shard's node.
    """

    def __init__(self, k, entry, *, k_search, nprobe, sim_func, metric, threads=None, in_memory=False, gpu=False):
        from ..index import load_index
        from ..store.datastore import Datastore
        from .faiss_search import FaissRetriever

        self.k = k
        self.offset = entry["offset"]
        self.threads = threads
        ds = Datastore.open(entry["datastore"], in_memory=in_memory, load_keys=sim_func != "do_not_recomp_l2")
        if ds.fingerprint != entry["datastore_fingerprint"]:
            raise MismatchError(
                f"shard {k}: datastore {ds.prefix} is not the dump its index part was built from "
                f"(fingerprint {ds.fingerprint}, the index manifest says {entry['datastore_fingerprint']}); "
                f"build the index again")
        index = load_index(entry["index"], datastore=ds, sim_func=sim_func)
        self.k_search = min(k_search, ds.size)
        # The FAISS strategy on this shard alone: its search and its fused exact recompute.
        self.faiss = FaissRetriever(index, ds, k=self.k_search, nprobe=nprobe, sim_func=sim_func, gpu=gpu)
        self.keep_max = metric == "ip"
        self.pad = -np.inf if self.keep_max else np.inf

    def where(self):
        """(node id, node address) where this searcher runs (None outside Ray)."""
        try:
            return cluster.where()
        except Exception:  # noqa: BLE001 - not in a Ray worker
            return None, None

    def search(self, q, k_search):
        """(n, D) float32 queries -> (faiss distances, global ids, exact distances or None, values),
        each (n, k_search), padded past the shard's size with (pad, -1)."""
        import faiss

        if self.threads:
            faiss.omp_set_num_threads(self.threads)
        f = self.faiss
        d, ids = f.index.search(q, self.k_search)
        valid = ids >= 0
        safe = np.where(valid, ids, 0)
        exact = None
        if f.recompute:
            exact = f._fused_distances(q, safe)
            if exact is None:
                exact = f._gathered_distances(q, safe).numpy()
        vals = np.asarray(f.datastore.gather_vals(safe)).astype(np.int64)
        gids = np.where(valid, ids + self.offset, -1)
        if self.k_search < k_search:  # a shard smaller than k_search: pad as FAISS pads
            extra = k_search - self.k_search
            pad = lambda a, v: np.pad(a, ((0, 0), (0, extra)), constant_values=v)  # noqa: E731
            d, gids, vals = pad(d, self.pad), pad(gids, -1), pad(vals, 0)
            exact = None if exact is None else pad(exact, 0.0)
        return d, gids, exact, vals


class _Pending:
    """A batch submitted to the shards: what `collect` waits on."""

    def __init__(self, parts, n, device, started):
        self.parts, self.n, self.device, self.started = parts, n, device, started


@register_strategy("faiss", when=lambda opts: _served_in_parts(opts))  # the faiss strategy, index in parts
class ShardedRetriever(Retriever):
    """The k nearest entries of a datastore whose index is kept in parts (an index manifest).

    index_manifest: INDEX.shards.json (or INDEX, whose manifest it is); datastore: the sharded
    datastore it indexes (checked by fingerprint). executor: "local" (threads) or "ray" (one
    actor per shard, on its node); None: "ray" when RAY_ADDRESS is set, else "local".
    """

    def __init__(self, index_manifest, datastore, *, k=1024, nprobe=32, sim_func="l2", k_factor=1.0,
                 executor=None, gpu=False, in_memory=False, threads=None, actor_cpus=0):
        check_common(datastore, k, sim_func)
        check_k_factor(k_factor, sim_func)
        if nprobe < 1:
            raise ConfigError(f"--probe must be at least 1, got {nprobe}")
        path = shard_manifest.find(index_manifest)
        if path is None:
            raise ConfigError(f"{index_manifest} is not an index kept in parts (no {shard_manifest.manifest_path(index_manifest)}): "
                              f"build it with knnlm-build-index 'shards=[...]' merge=none, or search it without --knn-executor")
        self.manifest_path = path
        self.manifest = shard_manifest.read(path, datastore)
        from ..index.load import SIM_FUNCS_OF_METRIC

        metric = self.manifest["metric"]
        if sim_func not in SIM_FUNCS_OF_METRIC.get(metric, ()):
            raise MismatchError(f"index {path} was built with metric {metric}; --knn-sim-func {sim_func} needs "
                                f"another (see knnlm-build-index metric=)")
        self.datastore, self.k, self.sim_func = datastore, k, sim_func
        self.nprobe, self.k_factor, self.metric = nprobe, k_factor, metric
        self.k_search = min(datastore.size, math.ceil(k * k_factor))
        self.recompute = sim_func != "do_not_recomp_l2"
        self.executor = cluster.resolve_executor(executor)
        self.shards = self.manifest["shards"]
        kwargs = dict(k_search=self.k_search, nprobe=nprobe, sim_func=sim_func, metric=metric,
                      in_memory=in_memory, gpu=gpu)
        self.nodes = [None] * len(self.shards)
        self._pool = None
        t0 = time.perf_counter()
        if self.executor == "local":
            per = threads or max(1, (os.cpu_count() or 1) // len(self.shards))
            self.searchers = [ShardSearcher(i, s, threads=per, **kwargs) for i, s in enumerate(self.shards)]
            self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix="knnlm-shard")
        else:
            self._start_actors(kwargs, threads, actor_cpus)
        logger.info("serving %d index parts of %s (%s executor) in %.1f s", len(self.shards), path,
                    self.executor, time.perf_counter() - t0)
        self.bytes_put = 0       # query bytes sent, once per batch
        self.bytes_returned = 0  # result bytes received from the shards
        self.batches = 0

    # ---- the Ray actors ----

    def _start_actors(self, kwargs, threads, actor_cpus):
        ray = cluster.connect()
        resources = ray.cluster_resources()
        actor = ray.remote(ShardSearcher)
        self.actors = []
        placed = [cluster.shard_options(i, resources) for i in range(len(self.shards))]
        if not threads and not all(placed):  # actors side by side on one machine share its cores
            threads = max(1, (os.cpu_count() or 1) // len(self.shards))
        for i, s in enumerate(self.shards):
            opts = placed[i]
            if s.get("resource") and s["resource"] not in resources:
                logger.warning("shard %d was built on the node with resource %s, which this cluster lacks: "
                               "its actor goes anywhere (it must read %s there)", i, s["resource"], s["index"])
            self.actors.append(actor.options(num_cpus=actor_cpus, max_restarts=0, **opts)
                               .remote(i, s, threads=threads, **kwargs))
        # Wait until each holds its index: a shard that cannot load fails here, by name.
        for i, a in enumerate(self.actors):
            self.nodes[i] = self._get(i, a.where.remote(), timeout=ACTOR_START_TIMEOUT_S)

    def _name(self, i):
        return f"shard {i} ({self.shards[i]['datastore']})"

    def _node(self, i):
        node = self.nodes[i]
        if node and node[0]:
            return f"{node[0][:12]} ({node[1]})"
        return self.shards[i].get("node")

    def _get(self, i, ref, timeout=None):
        ray = cluster.import_ray()
        try:
            return ray.get(ref, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise cluster.ShardUnavailableError(
                f"{self._name(i)}: no node took its actor within {timeout} s (does a node advertise the "
                f"resource {cluster.SHARD_RESOURCE.format(k=i)}, with the memory it needs?); see `ray status`") from None
        except Exception as e:  # noqa: BLE001 - Ray's errors, sorted below
            if cluster.is_actor_error(e):
                raise cluster.died(e, self._name(i), self._node(i)) from None
            cause = getattr(e, "cause", None)
            if isinstance(cause, Exception):
                raise cause from None  # our own errors (MismatchError, ...) as the actor raised them
            raise

    # ---- searching ----

    def _host_queries(self, queries):
        q = queries.detach().float().cpu().numpy() if torch.is_tensor(queries) else np.asarray(queries, np.float32)
        if q.ndim != 2 or q.shape[1] != self.datastore.dim:
            raise ConfigError(f"queries of shape {q.shape} do not match the datastore's dimension {self.datastore.dim}")
        if not np.isfinite(q).all():
            bad = int(np.flatnonzero(~np.isfinite(q).all(axis=1))[0])
            raise CorruptError(f"query {bad} of this batch is not finite (NaN/inf in the model's "
                               f"states): the kNN-LM cannot score it; check the model and its precision")
        return np.ascontiguousarray(q)

    def submit(self, queries):
        """Start searching every shard for these (N, D) queries; returns at once."""
        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        q = self._host_queries(queries)
        self.bytes_put += q.nbytes
        if self.executor == "local":
            parts = [self._pool.submit(s.search, q, self.k_search) for s in self.searchers]
        else:
            ray = cluster.import_ray()
            ref = ray.put(q)  # once, for every shard
            parts = [a.search.remote(ref, self.k_search) for a in self.actors]
        return _Pending(parts, len(q), device, time.perf_counter())

    def collect(self, pending, *, nearest_first=True):
        """Wait for a submitted batch and merge the shards' results into Neighbors."""
        if self.executor == "local":
            results = [f.result() for f in pending.parts]
        else:
            results = [self._get(i, ref) for i, ref in enumerate(pending.parts)]
        self.batches += 1
        self.bytes_returned += sum(sum(a.nbytes for a in r if a is not None) for r in results)
        return self._merge(results, pending.device, nearest_first)

    def retrieve(self, queries, context=None, *, nearest_first=True):
        return self.collect(self.submit(queries), nearest_first=nearest_first)

    def _merge(self, results, device, nearest_first):
        import faiss

        ks = self.k_search
        n_shards = len(results)
        d_all = np.stack([r[0] for r in results]).astype(np.float32, copy=False)   # (S, n, ks)
        ids_cat = np.concatenate([r[1] for r in results], axis=1)                   # (n, S ks)
        slots = np.where(np.stack([r[1] for r in results]) >= 0,
                         np.arange(n_shards * ks, dtype=np.int64).reshape(n_shards, 1, ks), -1)
        d, slot = faiss.merge_knn_results(np.ascontiguousarray(d_all), np.ascontiguousarray(slots),
                                          keep_max=self.metric == "ip")
        valid = slot >= 0
        safe = np.where(valid, slot, 0)
        ids = np.where(valid, np.take_along_axis(ids_cat, safe, 1), -1)
        vals = np.take_along_axis(np.concatenate([r[3] for r in results], axis=1), safe, 1)
        if self.recompute:
            d = np.take_along_axis(np.concatenate([r[2] for r in results], axis=1), safe, 1)
            if ks > self.k:  # keep the k nearest by exact distance (FaissRetriever's k-factor)
                dot = self.sim_func == "dot"
                dt = torch.from_numpy(np.where(valid, d, -np.inf if dot else np.inf).astype(np.float32))
                dt, pos = dt.topk(self.k, dim=1, largest=dot, sorted=nearest_first)
                pos = pos.numpy()
                d, ids, vals = dt.numpy(), np.take_along_axis(ids, pos, 1), np.take_along_axis(vals, pos, 1)
                valid = ids >= 0
        d = np.ascontiguousarray(d, dtype=np.float32)
        if not np.isfinite(d[valid]).all():
            raise CorruptError(f"a neighbor distance is not finite (NaN/inf) for datastore {self.datastore.prefix}: "
                               f"its keys or the index hold NaN/inf values; run knnlm-check")
        vals = np.where(valid, vals, 0)
        dict_size = self.datastore.meta.get("dict_size")
        if dict_size is not None and vals.size and (vals.max() >= dict_size or vals.min() < 0):
            raise CorruptError(f"datastore {self.datastore.prefix} holds values outside its dictionary of {dict_size}")
        return Neighbors(distances=torch.from_numpy(d).to(device),
                         values=torch.from_numpy(np.ascontiguousarray(vals, dtype=np.int64)).to(device),
                         valid=torch.from_numpy(np.ascontiguousarray(valid)).to(device),
                         ids=torch.from_numpy(np.ascontiguousarray(ids)).to(device))

    # ---- the rest of the contract ----

    def describe(self):
        return f"{len(self.shards)} index parts, {self.executor} executor"

    def summary(self):
        return {"shards": len(self.shards), "executor": self.executor}

    def node_of(self, i):
        """(node id, address) of shard i's actor (None, None for the local executor)."""
        return self.nodes[i] or (None, None)

    def close(self):
        """Stop the actors (Ray) or threads (local); the retriever cannot search afterwards."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for a in getattr(self, "actors", []):
            try:
                cluster.import_ray().kill(a)
            except Exception:  # noqa: BLE001 - already gone with its node
                pass
        self.actors = []

    @classmethod
    def validate_options(cls, opts):
        if not opts.dstore_filename or not opts.indexfile:
            raise ConfigError("--knnlm needs both --dstore-filename PREFIX and --indexfile INDEX")
        check_k_factor(opts.knn_k_factor, opts.knn_sim_func)
        cluster.resolve_executor(opts.knn_executor)

    @classmethod
    def from_options(cls, options, datastore):
        """From a front-end's options: indexfile, k, probe, knn_sim_func, knn_k_factor, knn_gpu,
        knn_executor, move_dstore_to_mem."""
        return cls(options.indexfile, datastore, k=options.k, nprobe=options.probe,
                   sim_func=options.knn_sim_func, k_factor=getattr(options, "knn_k_factor", 1.0),
                   executor=getattr(options, "knn_executor", None), gpu=getattr(options, "knn_gpu", False),
                   in_memory=getattr(options, "move_dstore_to_mem", False))


def _served_in_parts(opts):
    return opts.knn_search == "faiss" and (bool(opts.knn_executor) or is_sharded_index(opts.indexfile))


def is_sharded_index(path):
    """Whether `path` (--indexfile) names an index kept in parts, for ShardedRetriever."""
    return isinstance(path, (str, os.PathLike)) and shard_manifest.find(path) is not None
