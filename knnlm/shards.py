"""Scale-out: datastores dumped in shards, presented as one and indexed together.

fairseq's --num-shards/--shard-id dump one datastore per shard. A *manifest* (a small JSON
file, by convention P_shards.json) lists the shard prefixes in order; shard k's rows get the
global ids offset_k + row, where offset_k is the number of rows in shards 0..k-1. This is
the order of the concatenated datastore, so an index over the shards finds the same ids as
one over the concatenation.

Building over shards (`build_sharded`): train once on a sample drawn across all shards, add
each shard in its own process into a copy of the trained index (INDEX.shardK), then merge
the inverted lists on disk into INDEX.ivfdata with faiss.contrib.ondisk.merge_ondisk. The
final index file holds only the quantizers; searches memory-map INDEX.ivfdata.
"""

import hashlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .datastore import Datastore, read_json, write_json_atomic
from .errors import ConfigError, CorruptError, KNNLMError, MismatchError

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "knnlm-shards"
MANIFEST_VERSION = 1

# Metadata the shards must agree on to be one datastore.
_SHARED_META = ("keytype", "dict_size", "dict_fingerprint", "model_fingerprint")


def manifest_path(prefix):
    """Where the manifest of the sharded datastore named `prefix` lives."""
    return f"{prefix}_shards.json"


class ShardedDatastore:
    """Several `Datastore` shards read as one, with global ids = shard offset + row.

    Offers what `Retriever` and the index builder use: size, dim, meta, prefix,
    fingerprint, gather_keys, gather_vals; plus `locate(ids) -> (shard, row)`.
    """

    def __init__(self, shards, prefix=None):
        shards = list(shards)
        if not shards:
            raise ConfigError("a sharded datastore needs at least one shard")
        first = shards[0]
        for s in shards[1:]:
            if s.dim != first.dim:
                raise MismatchError(
                    f"shard {s.prefix} has keys of dimension {s.dim} but shard {first.prefix} "
                    f"has {first.dim}: they were not dumped from the same model"
                )
            for field in _SHARED_META:
                if s.meta.get(field) != first.meta.get(field):
                    raise MismatchError(
                        f"shards {first.prefix} and {s.prefix} disagree on {field} "
                        f"({first.meta.get(field)!r} vs {s.meta.get(field)!r}): they do not "
                        f"belong to one datastore"
                    )
        self.shards = shards
        sizes = np.array([s.size for s in shards], dtype=np.int64)
        # offsets[k] is shard k's first global id; offsets[-1] the total size.
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.prefix = prefix if prefix is not None else "+".join(s.prefix for s in shards)
        dtypes = {s.keys.dtype for s in shards}
        self.keys_dtype = np.result_type(*dtypes)
        self.vals_dtype = np.result_type(*{s.vals.dtype for s in shards})
        self.meta = {
            **{field: first.meta.get(field) for field in _SHARED_META},
            "size": self.size,
            "dim": self.dim,
            "keys_dtype": self.keys_dtype.name,
            "complete": True,
            "sharded": True,
            "shards": [s.prefix for s in shards],
            "shard_fingerprints": [s.fingerprint for s in shards],
        }

    @property
    def size(self):
        return int(self.offsets[-1])

    @property
    def dim(self):
        return self.shards[0].dim

    @property
    def fingerprint(self):
        """Changes if any shard is dumped again, or if the shards are reordered."""
        h = hashlib.sha256("\n".join(s.fingerprint for s in self.shards).encode())
        return f"shards-{h.hexdigest()[:16]}:{self.size}"

    def __repr__(self):
        return f"ShardedDatastore({self.prefix!r}, shards={len(self.shards)}, size={self.size:,}, dim={self.dim})"

    def locate(self, ids):
        """Global ids (any shape) -> (shard index, row within that shard), same shape."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            bad = ids[(ids < 0) | (ids >= self.size)].flat[0]
            raise IndexError(f"id {bad} is outside sharded datastore {self.prefix} of {self.size:,} entries")
        # side="right" so that an id equal to a shard's offset lands in that shard, and
        # empty shards (repeated offsets) are skipped.
        shard = np.searchsorted(self.offsets, ids, side="right") - 1
        return shard, ids - self.offsets[shard]

    def gather_vals(self, ids):
        """Values at global ids (any shape)."""
        shard, row = self.locate(ids)
        out = np.empty(shard.shape, dtype=self.vals_dtype)
        for k in np.unique(shard):
            sel = shard == k
            out[sel] = self.shards[k].gather_vals(row[sel])
        return out

    def gather_keys(self, ids):
        """Keys at global ids (1-D), each shard read in ascending row order."""
        shard, row = self.locate(np.asarray(ids).reshape(-1))
        out = np.empty((len(shard), self.dim), dtype=self.keys_dtype)
        for k in np.unique(shard):
            sel = np.flatnonzero(shard == k)
            out[sel] = self.shards[k].gather_keys(row[sel])
        return out

    def check_compatible(self, **kwargs):
        """As `Datastore.check_compatible`, for every shard."""
        for s in self.shards:
            s.check_compatible(**kwargs)

    def check_values(self, dict_size, **kwargs):
        for s in self.shards:
            s.check_values(dict_size, **kwargs)


def _resolve(manifest, prefix):
    # Shard prefixes are stored relative to the manifest's folder so the folder can move.
    return prefix if os.path.isabs(prefix) else os.path.join(os.path.dirname(os.path.abspath(manifest)), prefix)


def write_manifest(path, prefixes, *, overwrite=False):
    """Write a manifest listing datastore shards `prefixes` in order; returns the ShardedDatastore.

    Each shard must be a complete datastore; its fingerprint is recorded so that opening
    the manifest after a shard was dumped again fails instead of mixing two dumps.
    """
    sharded = ShardedDatastore([Datastore.open(p) for p in prefixes], prefix=path)
    for s in sharded.shards:
        if s.meta.get("legacy"):
            raise ConfigError(f"shard {s.prefix} is in the original code's raw format; shards need metadata (dump them again)")
    folder = os.path.dirname(os.path.abspath(path))
    entry = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "size": sharded.size,
        "dim": sharded.dim,
        "fingerprint": sharded.fingerprint,
        "shards": [
            {"prefix": os.path.relpath(os.path.abspath(s.prefix), folder), "size": s.size, "fingerprint": s.fingerprint}
            for s in sharded.shards
        ],
    }
    if os.path.exists(path) and not overwrite:
        try:
            old = read_json(path, f"shard manifest {path}")
        except CorruptError:
            old = {}
        if old.get("fingerprint") != entry["fingerprint"]:
            raise KNNLMError(
                f"shard manifest {path} already exists and lists other shards; pass "
                f"overwrite=true to replace it, or choose another dstore_mmap"
            )
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(path, entry)
    return sharded


def open_manifest(path, *, in_memory=False):
    """Open the shards listed in manifest `path` as one ShardedDatastore."""
    m = read_json(path, f"shard manifest {path}")
    if m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), list):
        raise CorruptError(f"{path} is not a knnlm shard manifest (no format '{MANIFEST_FORMAT}' / shard list)")
    shards = []
    for entry in m["shards"]:
        ds = Datastore.open(_resolve(path, entry["prefix"]), in_memory=in_memory)
        if ds.fingerprint != entry.get("fingerprint"):
            raise MismatchError(
                f"shard {ds.prefix} is not the dump listed in manifest {path} (fingerprint "
                f"{ds.fingerprint}, manifest says {entry.get('fingerprint')}): it was dumped "
                f"again; write the manifest again and rebuild the index"
            )
        shards.append(ds)
    return ShardedDatastore(shards, prefix=path)


def is_manifest(path):
    return str(path).endswith(".json") and os.path.isfile(path)


def open_datastore(path, **kwargs):
    """Open a datastore prefix, a shard manifest, or a prefix P that has only P_shards.json.

    kwargs are Datastore.open's (in_memory, dstore_size, dim, fp16); for shards, dstore_size
    and dim are checked against the whole.
    """
    path = str(path)
    manifest = path if is_manifest(path) else manifest_path(path)
    if not (is_manifest(path) or (not os.path.exists(f"{path}_keys.npy") and os.path.isfile(manifest))):
        return Datastore.open(path, **kwargs)
    sharded = open_manifest(manifest, in_memory=kwargs.get("in_memory", False))
    if kwargs.get("dstore_size") is not None and kwargs["dstore_size"] != sharded.size:
        raise MismatchError(f"sharded datastore {manifest} has {sharded.size:,} entries, --dstore-size says {kwargs['dstore_size']:,}")
    if kwargs.get("dim") is not None and kwargs["dim"] != sharded.dim:
        raise MismatchError(f"sharded datastore {manifest} has keys of dimension {sharded.dim}, but {kwargs['dim']} was expected")
    return sharded


# ---------------------------------------------------------------------------------------
# Building an index over shards. The plan, training and metadata helpers are shared with
# the single-datastore build in index_builder.


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


def add_shard(job):
    """Run in a child process: add one shard's keys into a copy of the trained index.

    Writes job['out'] (via a temporary name) and job['out'].json; returns a summary dict.
    """
    import faiss

    from . import index_builder as ib

    ib.set_threads(job["threads"])
    ds = Datastore.open(job["prefix"], **job["open_kwargs"])
    if ds.fingerprint != job["fingerprint"]:
        raise MismatchError(
            f"shard {job['prefix']} changed while the index was being built (fingerprint "
            f"{ds.fingerprint}, expected {job['fingerprint']}); build again"
        )
    index = faiss.read_index(job["trained"])
    index, on_gpu = ib.maybe_to_gpu(index, job["gpu"], "adding")
    t0 = time.perf_counter()
    ib.add_rows(index, ds.keys, 0, ds.size, id_offset=job["offset"], chunk=job["chunk"],
                desc=f"shard {job['k']}", position=job.get("position"))
    seconds = time.perf_counter() - t0
    ib.save_index(index, job["out"])
    done = {"identity": job["identity"], "fingerprint": ds.fingerprint, "offset": job["offset"],
            "ntotal": ds.size, "add_seconds": seconds, "gpu": on_gpu}
    write_json_atomic(f"{job['out']}.json", done)
    return done


def _shard_done(job):
    """The summary of a shard added by an earlier (interrupted) run of the same build, or None."""
    path = f"{job['out']}.json"
    if not (os.path.exists(job["out"]) and os.path.exists(path)):
        return None
    try:
        done = read_json(path, path)
    except CorruptError:
        return None
    same = (done.get("identity") == job["identity"] and done.get("fingerprint") == job["fingerprint"]
            and done.get("offset") == job["offset"])
    return done if same else None


def add_shard_main(job_path):
    """Entry point of the child process: run the job in JSON file `job_path`; exit status 2 on a user error."""
    from .index_builder import setup_logging

    setup_logging()
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
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    code = "import sys; from knnlm.shards import add_shard_main; sys.exit(add_shard_main(sys.argv[1]))"
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


def build_sharded(plan, state, t_start=None):
    """Train (or reuse INDEX.trained), add each shard in its own process, merge on disk.

    `plan` and `state` come from index_builder (see build_index); returns the summary dict.
    """
    import faiss
    from faiss.contrib.ondisk import merge_ondisk

    from . import index_builder as ib

    if plan.starting_point:
        raise ConfigError("starting_point is not supported with shards or ondisk_merge; leave it at 0")
    train_seconds = ib.train_or_reuse(plan, state)
    try:
        faiss.extract_index_ivf(faiss.read_index(plan.trained_path))
    except RuntimeError:
        raise ConfigError(f"factory {plan.factory!r} is not an IVF index: merging shards on disk needs one") from None

    threads = max(1, plan.threads // max(1, plan.shard_workers))
    jobs = []
    for k, (prefix, fingerprint, offset, size, open_kwargs) in enumerate(_parts(plan.datastore)):
        jobs.append({
            "k": k, "prefix": prefix, "fingerprint": fingerprint, "offset": offset, "size": size,
            "open_kwargs": open_kwargs, "trained": plan.trained_path,
            "out": shard_index_path(plan.index_path, k), "chunk": plan.chunk, "threads": threads,
            "gpu": plan.gpu, "identity": plan.identity(),
            "position": k if plan.shard_workers > 1 else None,
        })
    done = {job["k"]: _shard_done(job) for job in jobs}
    todo = [job for job in jobs if done[job["k"]] is None]
    for k in sorted(k for k, d in done.items() if d is not None):
        logger.info("shard %d (%s) was already added by an earlier run: reusing %s", k, jobs[k]["prefix"], jobs[k]["out"])
    t0 = time.perf_counter()
    if todo:
        logger.info("adding %d shard(s) in separate processes (%d at a time, %d FAISS threads each)",
                    len(todo), min(plan.shard_workers, len(todo)), threads)
        _run_jobs(todo, plan.shard_workers)
        done.update({job["k"]: _shard_done(job) for job in todo})
        if any(d is None for d in done.values()):
            raise CorruptError(f"a shard process ended without writing its index; remove {plan.index_path}.shard* and build again")
    add_wall = time.perf_counter() - t0
    rows_added_now = sum(job["size"] for job in todo)

    # Merge: the trained (empty) index receives all inverted lists, stored in INDEX.ivfdata.
    ib.retire_old_index(plan.index_path)
    ivfdata = f"{plan.index_path}.ivfdata"
    if os.path.exists(ivfdata):
        os.remove(ivfdata)  # a reader still mapping the old file keeps its copy
    t0 = time.perf_counter()
    index = faiss.read_index(plan.trained_path)
    logger.info("merging %d shard index(es) on disk into %s", len(jobs), ivfdata)
    merge_ondisk(index, [job["out"] for job in jobs], ivfdata)
    if index.ntotal != plan.datastore.size:
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
    extra["shards_reused"] = [job["k"] for job in jobs if job not in todo]  # added by an interrupted run
    return ib.finalize(plan, index, train_seconds=train_seconds, add_seconds=add_wall + merge_seconds,
                       rows_added=rows_added_now, extra_meta=extra, leftovers=leftovers, t_start=t_start)
