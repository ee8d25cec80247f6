"""Adding one shard's keys into a copy of the trained index: the step a local child process
(knnlm.index.sharded_build) and a Ray task on the shard's node (knnlm.index.ray_build) share."""

import os
import time

from ..artefacts import file_checksum, read_json_or_none, write_json_atomic
from ..errors import MismatchError
from ..store.datastore import Datastore
from . import faiss_utils, steps


def add_shard(job, trained=None):
    """Add one shard's keys into a copy of the trained index (in a child process, or a Ray task
    on the shard's node, which passes the `trained` index it was sent).

    Writes job['out'] (via a temporary name) and job['out'].json, and for a part of a merge=none
    index its INDEX.partK.meta.json; returns the summary dict. With job['return_index'] nothing
    is written: returns (summary, the serialized index) for the caller to write.
    """
    import faiss

    faiss_utils.set_threads(job["threads"])
    ds = Datastore.open(job["prefix"], **job["open_kwargs"])
    if ds.fingerprint != job["fingerprint"]:
        raise MismatchError(
            f"shard {job['prefix']} changed while the index was being built (fingerprint "
            f"{ds.fingerprint}, expected {job['fingerprint']}); build again"
        )
    index = faiss.read_index(job["trained"]) if trained is None else faiss.clone_index(trained)
    index, on_gpu = faiss_utils.maybe_to_gpu(index, job["gpu"], "adding")
    t0 = time.perf_counter()
    # A part of a merge=none index holds its shard's own rows; a merged index global ids.
    id_offset = 0 if job.get("part") else job["offset"]
    steps.add_rows(index, ds.keys, 0, ds.size, id_offset=id_offset, chunk=job["chunk"],
                desc=f"shard {job['k']}", position=job.get("position"), where=f"datastore {ds.prefix}")
    seconds = time.perf_counter() - t0
    done = {"identity": job["identity"], "fingerprint": ds.fingerprint, "offset": job["offset"],
            "ntotal": ds.size, "add_seconds": seconds, "gpu": on_gpu}
    if job.get("return_index"):
        return done, faiss.serialize_index(faiss_utils.to_cpu(index))
    faiss_utils.save_index(index, job["out"])
    if job.get("part"):
        write_part_meta(job, ds, index)
    write_json_atomic(f"{job['out']}.json", done)
    return done


def write_part_meta(job, ds, index):
    """INDEX.partK.meta.json: the part is an ordinary complete index of its shard (load_index reads it)."""
    from .load import index_metric, meta_path

    write_json_atomic(meta_path(job["out"]), {
        "format_version": steps.INDEX_FORMAT_VERSION, "complete": True, "factory": job["factory"],
        "metric": index_metric(index), "datastore": ds.prefix, "datastore_fingerprint": ds.fingerprint,
        "datastore_size": ds.size, "dim": ds.dim, "ntotal": int(index.ntotal), "ondisk": False,
        "nprobe": job["probe"], "id_offset_in_manifest": job["offset"], "part_of": job["index"],
        "checksum": file_checksum(job["out"]), "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    })


def _shard_done(job):
    """The summary of a shard added by an earlier (interrupted) run of the same build, or None."""
    path = f"{job['out']}.json"
    if not (os.path.exists(job["out"]) and os.path.exists(path)):
        return None
    done = read_json_or_none(path)
    if done is None:
        return None
    same = (done.get("identity") == job["identity"] and done.get("fingerprint") == job["fingerprint"]
            and done.get("offset") == job["offset"])
    return done if same else None
