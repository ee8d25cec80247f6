"""Building one index over a sharded datastore (or any datastore, with ondisk_merge=true).

Train once on a sample drawn across all shards, add each shard in its own process into a
copy of the trained index (INDEX.shardK), then merge the inverted lists on disk into
INDEX.ivfdata with faiss.contrib.ondisk.merge_ondisk. The final index file holds only the
quantizers; searches memory-map INDEX.ivfdata. The plan, training and metadata steps are
the single build's (knnlm.index.builder), which calls `build_sharded`; this module never
imports the builder at its top, so the two form no import cycle.
"""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..artefacts import read_json, refuse_to_replace, write_json_atomic
from ..errors import ConfigError, CorruptError, KNNLMError
from ..store.sharded import ShardedDatastore
from . import shard_manifest, steps
from .shard_add import _shard_done, add_shard  # noqa: F401 - add_shard_main runs add_shard

logger = logging.getLogger(__name__)


def _parts(datastore):
    """(prefix, fingerprint, first global id, size, open kwargs) of each piece added in its own process."""
    if isinstance(datastore, ShardedDatastore):
        return [(s.prefix, s.fingerprint, int(off), s.size, {})
                for s, off in zip(datastore.shards, datastore.offsets)]
    kw = {}
    if datastore.meta.get("legacy"):  # a raw datastore reopens only with its size and dimension
        kw = {"dstore_size": datastore.size, "dim": datastore.dim, "fp16": datastore.keys.dtype == np.float16}
    return [(datastore.prefix, datastore.fingerprint, 0, datastore.size, kw)]


def shard_index_path(index_path, k):
    return f"{index_path}.shard{k}"


def add_shard_main(job_path):
    """Entry point of the child process: run the job in JSON file `job_path`; exit status 2 on a user error."""
    steps.setup_logging()
    try:
        add_shard(read_json(job_path, f"shard job {job_path}"))
    except KNNLMError as e:
        print(f"knnlm-build-index: error: {e}", file=sys.stderr)
        return 2
    return 0


def _run_jobs(jobs, workers):
    """Add the shards, each in a fresh Python process, `workers` at a time.

    A separate interpreter (not fork or multiprocessing's spawn) so a shard's memory is
    returned when it ends, and the caller's __main__ is never re-imported.
    """
    env = dict(os.environ)
    # The child must import this very package, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    code = "import sys; from knnlm.index.sharded_build import add_shard_main; sys.exit(add_shard_main(sys.argv[1]))"
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < workers:
            job = pending.pop(0)
            job_path = f"{job['out']}.job.json"
            write_json_atomic(job_path, job)
            running.append((job, subprocess.Popen([sys.executable, "-c", code, job_path], env=env)))
        job, proc = running.pop(0)
        if proc.wait() != 0:
            for _, other in running:
                other.terminate()
                other.wait()
            raise KNNLMError(
                f"adding shard {job['k']} ({job['prefix']}) failed (exit status {proc.returncode}; "
                f"its messages are above). Shards already added are kept: run the same command "
                f"again to resume"
            )
        os.remove(f"{job['out']}.job.json")


def shard_jobs(plan, threads):
    """One job per shard: what `add_shard` needs, in a child process or a Ray task."""
    parts = plan.merge == "none"
    jobs = []
    for k, (prefix, fingerprint, offset, size, open_kwargs) in enumerate(_parts(plan.datastore)):
        jobs.append({
            "k": k, "prefix": prefix, "fingerprint": fingerprint, "offset": offset, "size": size,
            "open_kwargs": open_kwargs, "trained": plan.trained_path,
            "out": shard_manifest.part_path(plan.index_path, k) if parts else shard_index_path(plan.index_path, k),
            "part": parts, "index": plan.index_path, "factory": plan.factory, "probe": plan.probe,
            "chunk": plan.chunk, "threads": threads, "gpu": plan.gpu, "identity": plan.identity(),
            "position": k if plan.shard_workers > 1 else None,
        })
    return jobs


def build_sharded(plan, state, t_start=None):
    """Train (or reuse INDEX.trained), add each shard in its own process (or Ray task), then merge
    on disk (merge=ondisk) or keep one index per shard with an index manifest (merge=none).

    `plan` and `state` come from index_builder (see build_index); returns the summary dict.
    """
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    if plan.starting_point:
        raise ConfigError("starting_point is not supported with shards or ondisk_merge; leave it at 0")
    if plan.merge == "none":
        refuse_to_replace(shard_manifest.manifest_path(plan.index_path), plan.overwrite, lambda old: (
            f"a complete index manifest already exists at {shard_manifest.manifest_path(plan.index_path)}; "
            f"pass overwrite=true to replace it, or choose another faiss_index"))
    ray_build = None
    if plan.executor == "ray":
        from . import ray_build
    train_seconds = steps.train_or_reuse(plan, state, sample=ray_build.sample_training_keys if ray_build else None)
    try:
        faiss.extract_index_ivf(faiss.read_index(plan.trained_path))
    except RuntimeError:
        raise ConfigError(f"factory {plan.factory!r} is not an IVF index: sharding it needs one") from None

    if ray_build is not None:  # each shard's node uses its own cores
        jobs = shard_jobs(plan, plan.threads)
        t0 = time.perf_counter()
        done, todo = ray_build.add_shards(plan, jobs)
    else:
        jobs = shard_jobs(plan, max(1, plan.threads // max(1, plan.shard_workers)))
        done = {job["k"]: _shard_done(job) for job in jobs}
        todo = [job for job in jobs if done[job["k"]] is None]
        for k in sorted(k for k, d in done.items() if d is not None):
            logger.info("shard %d (%s) was already added by an earlier run: reusing %s", k, jobs[k]["prefix"], jobs[k]["out"])
        t0 = time.perf_counter()
        if todo:
            logger.info("adding %d shard(s) in separate processes (%d at a time, %d FAISS threads each)",
                        len(todo), min(plan.shard_workers, len(todo)), jobs[0]["threads"])
            _run_jobs(todo, plan.shard_workers)
            done.update({job["k"]: _shard_done(job) for job in todo})
            if any(d is None for d in done.values()):
                raise CorruptError(f"a shard process ended without writing its index; remove {plan.index_path}.shard* and build again")
    add_wall = time.perf_counter() - t0
    rows_added_now = sum(job["size"] for job in todo)
    if plan.merge == "none":
        return _finish_parts(plan, jobs, done, train_seconds=train_seconds, add_seconds=add_wall,
                             rows_added=rows_added_now, t_start=t_start)

    # Merge: the trained (empty) index receives all inverted lists, stored in INDEX.ivfdata.
    # Merged into a temporary file beside the old index, which stays usable until finalize
    # moves both new files into place (a reader still mapping the old file keeps its copy).
    ivfdata = f"{plan.index_path}.ivfdata"
    ivf_tmp = f"{ivfdata}.tmp{os.getpid()}"
    if os.path.exists(ivf_tmp):
        os.remove(ivf_tmp)
    t0 = time.perf_counter()
    index = faiss.read_index(plan.trained_path)
    logger.info("merging %d shard index(es) on disk into %s", len(jobs), ivfdata)
    try:
        merge_ondisk(index, [job["out"] for job in jobs], ivf_tmp)
    except BaseException:
        if os.path.exists(ivf_tmp):
            os.remove(ivf_tmp)
        raise
    # The index file names its inverted-lists file: the final name, where finalize moves it.
    faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists).filename = ivfdata
    if index.ntotal != plan.datastore.size:
        os.remove(ivf_tmp)
        raise CorruptError(
            f"merged index holds {index.ntotal:,} vectors but the datastore has {plan.datastore.size:,}; "
            f"remove {plan.index_path}.shard* and build again"
        )
    merge_seconds = time.perf_counter() - t0
    extra = {
        "ondisk": True,
        "ivfdata": os.path.basename(ivfdata),
        "shards": [job["prefix"] for job in jobs],
        "shard_offsets": [job["offset"] for job in jobs],
        "merge_seconds": merge_seconds,
        "gpu": any(d.get("gpu") for d in done.values()),
    }
    leftovers = [job["out"] for job in jobs] + [f"{job['out']}.json" for job in jobs]
    extra["shards_reused"] = [job["k"] for job in jobs if job["k"] not in {t["k"] for t in todo}]  # an interrupted run's
    if plan.executor == "ray":
        extra["executor"] = "ray"
    return steps.finalize(plan, index, train_seconds=train_seconds, add_seconds=add_wall + merge_seconds,
                       rows_added=rows_added_now, extra_meta=extra, leftovers=leftovers, t_start=t_start,
                       moves=[(ivf_tmp, ivfdata)])


def _finish_parts(plan, jobs, done, *, train_seconds, add_seconds, rows_added, t_start):
    """merge=none: write the index manifest listing the parts (last: it makes the index complete)."""
    parts = [{"k": job["k"], "index": job["out"], "datastore": job["prefix"],
              "datastore_fingerprint": job["fingerprint"], "offset": job["offset"], "size": job["size"],
              "resource": done[job["k"]].get("resource"), "node": done[job["k"]].get("node")} for job in jobs]
    path = shard_manifest.write(plan.index_path, plan, parts, overwrite=plan.overwrite)
    for p in [plan.trained_path, plan.progress_path] + [f"{job['out']}.json" for job in jobs]:
        if os.path.exists(p):
            os.remove(p)
    wall = time.perf_counter() - t_start if t_start is not None else None
    print(f"{steps.PROG}: built {len(parts)} index parts of {plan.factory} over {plan.datastore.prefix} "
          f"({plan.datastore.size:,} keys), listed in {path}; train {train_seconds:.1f} s, add "
          f"{add_seconds:.1f} s ({rows_added:,} keys added now, {plan.executor} executor)")
    return {"index": plan.index_path, "manifest": path, "parts": parts, "train_seconds": train_seconds,
            "add_seconds": add_seconds, "rows_added": rows_added, "wall_seconds": wall,
            "meta": shard_manifest.read(path)}
