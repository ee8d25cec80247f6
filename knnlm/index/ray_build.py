"""The sharded build's work on a Ray cluster (`knnlm-build-index 'shards=[...]' executor=ray`).

Work goes to the data: shard k's training keys are read, and its keys added, by Ray tasks on
the node advertising the resource `shard_k` (knnlm.cluster). The driver draws the training
rows exactly as the local build does (steps.training_rows over the whole datastore), so both
train on the same keys in the same order: the same quantizer. The trained index is put into
Ray's object store once and each shard's task adds its keys to a copy of it. With merge=none
the task writes its part (INDEX.partK) on its node; with merge=ondisk it sends the filled
index back and the driver merges on disk as the local build does.
"""

import logging
import os
import time

import numpy as np

from .. import cluster
from ..errors import CorruptError, MismatchError

logger = logging.getLogger(__name__)


def _shards(ds):
    """(prefix, fingerprint, offset) of each shard (one for an unsharded datastore)."""
    if hasattr(ds, "shards"):
        return [(s.prefix, s.fingerprint, int(o)) for s, o in zip(ds.shards, ds.offsets)]
    return [(ds.prefix, ds.fingerprint, 0)]


def _read_rows(prefix, fingerprint, rows):
    """On the shard's node: its keys at `rows`, as float32."""
    from ..store.datastore import Datastore

    ds = Datastore.open(prefix)
    if ds.fingerprint != fingerprint:
        raise MismatchError(f"shard {prefix} on node {cluster.where()[1]} is not the dump the head sees "
                            f"(fingerprint {ds.fingerprint}, expected {fingerprint}); copy it again")
    return np.asarray(ds.gather_keys(rows), dtype=np.float32)


def sample_training_keys(plan):
    """steps.sample_training_keys, each shard's rows read by a task on its node."""
    from .steps import training_rows

    ray = cluster.connect()
    resources = ray.cluster_resources()
    ds = plan.datastore
    rows = training_rows(ds.size, plan.n_train, plan.seed, plan.sampler)
    shards = _shards(ds)
    offsets = np.array([o for _, _, o in shards] + [ds.size], dtype=np.int64)
    shard_of = np.searchsorted(offsets, rows, side="right") - 1
    task = ray.remote(_read_rows)
    pending = []
    for k, (prefix, fingerprint, off) in enumerate(shards):
        pos = np.flatnonzero(shard_of == k)
        if len(pos):
            pending.append((k, pos, task.options(num_cpus=1, **cluster.shard_options(k, resources))
                            .remote(prefix, fingerprint, rows[pos] - off)))
    logger.info("reading %s training keys on the nodes of %d shard(s)", f"{len(rows):,}", len(pending))
    x = np.empty((len(rows), ds.dim), dtype=np.float32)
    for k, pos, ref in pending:
        x[pos] = _get(ray, ref, f"reading training keys of shard {k} ({shards[k][0]})")
    finite = np.isfinite(x).all(axis=1)
    if not finite.all():
        row = int(rows[int(np.argmin(finite))])
        raise CorruptError(f"datastore {ds.prefix}: the key of row {row:,} is not finite; "
                           f"FAISS cannot train on it. Dump the datastore again")
    return x


def _add(job, trained_blob):
    """On the shard's node: add its keys to a copy of the trained index (or reuse an earlier run's part)."""
    import faiss

    from .shard_add import _shard_done, add_shard

    node = cluster.where()
    extra = {"node": node[1], "node_id": node[0], "resource": job.get("resource")}
    if not job.get("return_index"):
        done = _shard_done(job)
        if done is not None:
            return {**done, **extra, "reused": True}
    result = add_shard(job, trained=faiss.deserialize_index(trained_blob))
    if job.get("return_index"):
        return {**result[0], **extra}, result[1]
    return {**result, **extra}


def _get(ray, ref, what, node=None):
    try:
        return ray.get(ref)
    except Exception as e:  # noqa: BLE001 - Ray's errors, sorted here
        if cluster.is_actor_error(e):
            raise cluster.died(e, what, node) from None
        cause = getattr(e, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def add_shards(plan, jobs):
    """Add every shard on its node; returns ({k: summary}, the jobs that did work now)."""
    import faiss

    from ..artefacts import write_json_atomic
    from .shard_add import _shard_done

    ray = cluster.connect()
    resources = ray.cluster_resources()
    blob = ray.put(faiss.serialize_index(faiss.read_index(plan.trained_path)))  # sent once to every node
    ondisk = plan.merge != "none"
    task = ray.remote(_add)
    done, refs = {}, {}
    for job in jobs:
        k = job["k"]
        if ondisk and _shard_done(job) is not None:  # its filled index came back to this node earlier
            done[k] = _shard_done(job)
            logger.info("shard %d (%s) was already added by an earlier run: reusing %s", k, job["prefix"], job["out"])
            continue
        opts = cluster.shard_options(k, resources)
        job = {**job, "return_index": ondisk, "position": None,
               "resource": next(iter(opts.get("resources", {})), None)}
        refs[k] = (job, task.options(num_cpus=1, max_retries=1, **opts).remote(job, blob))
    logger.info("adding %d shard(s) on their nodes", len(refs))
    todo = []
    for k, (job, ref) in refs.items():
        t0 = time.perf_counter()
        result = _get(ray, ref, f"adding shard {k} ({job['prefix']})")
        if ondisk:
            summary, data = result
            tmp = f"{job['out']}.tmp{os.getpid()}"
            np.asarray(data).tofile(tmp)
            os.replace(tmp, job["out"])
            write_json_atomic(f"{job['out']}.json", summary)
        else:
            summary = result
        if not summary.get("reused"):
            todo.append(job)
        else:
            logger.info("shard %d (%s) was already added by an earlier run on %s", k, job["prefix"], summary["node"])
        done[k] = summary
        logger.info("shard %d: %s keys added on node %s (%.1f s)", k, f"{job['size']:,}", summary.get("node"),
                    time.perf_counter() - t0)
    return done, todo
