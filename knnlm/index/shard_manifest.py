"""The index manifest of a `merge=none` build: one FAISS index per datastore shard.

`knnlm-build-index 'shards=[...]' merge=none` trains one quantizer and adds each shard into
its own copy, INDEX.partK (ids = the shard's own rows, so each part is an ordinary index of
its shard, with its own INDEX.partK.meta.json). Nothing is merged: no machine needs to hold
the whole index. INDEX.shards.json, written last, lists the parts in shard order with each
shard's global id offset, the datastore they index, and where each shard lives (the Ray
resource `shard_k` of its node, when the build ran on Ray). Searching it:
knnlm.retrieval.sharded_search.ShardedRetriever.
"""

import os

from ..artefacts import check_schema, read_json, refuse_to_replace, write_json_atomic
from ..errors import CorruptError, MismatchError

FORMAT = "knnlm-index-shards"
VERSION = 1
SCHEMA = {"format": (str, True), "version": (int, True), "complete": (bool, True), "merge": (str, True),
          "datastore_fingerprint": (str, True), "size": (int, True), "dim": (int, True), "metric": (str, True),
          "nprobe": (int, False), "factory": (str, False), "shards": (list, True)}
SHARD_SCHEMA = {"index": (str, True), "datastore": (str, True), "datastore_fingerprint": (str, True),
                "offset": (int, True), "size": (int, True), "resource": ((str, type(None)), False),
                "node": ((str, type(None)), False)}


def manifest_path(index_path):
    return f"{index_path}.shards.json"


def part_path(index_path, k):
    return f"{index_path}.part{k}"


def find(path):
    """The index manifest that `path` names (the manifest itself, or INDEX whose manifest is
    INDEX.shards.json and which is no index file itself), or None."""
    path = str(path)
    if path.endswith(".json") and os.path.isfile(path):
        try:
            return path if read_json(path, f"index manifest {path}").get("format") == FORMAT else None
        except (CorruptError, AttributeError):
            return None
    if not os.path.exists(path) and os.path.isfile(manifest_path(path)):
        return manifest_path(path)
    return None


def _rel(path, folder):
    return os.path.relpath(os.path.abspath(path), folder)


def _abs(path, manifest):
    return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(manifest)), path)


def write(index_path, plan, parts, *, overwrite=False):
    """Write INDEX.shards.json for `parts` [{k, index, datastore, datastore_fingerprint, offset, size,
    resource, node}] of `plan`'s build; returns the manifest's path."""
    path = manifest_path(index_path)
    folder = os.path.dirname(os.path.abspath(path))
    ds = plan.datastore
    entry = {
        "format": FORMAT, "version": VERSION, "complete": True, "merge": "none",
        "datastore": _rel(ds.prefix, folder), "datastore_fingerprint": ds.fingerprint,
        "size": ds.size, "dim": ds.dim, "metric": plan.metric, "nprobe": plan.probe, "factory": plan.factory,
        "ncentroids": plan.ncentroids, "code_size": plan.code_size, "n_train": plan.n_train, "seed": plan.seed,
        "shards": [{**p, "index": _rel(p["index"], folder), "datastore": _rel(p["datastore"], folder)}
                   for p in sorted(parts, key=lambda p: p["k"])],
    }
    refuse_to_replace(path, overwrite, lambda old: (
        f"a complete index manifest already exists at {path} (of {old.get('datastore')}); pass "
        f"overwrite=true to replace it, or choose another faiss_index"))
    write_json_atomic(path, entry)
    return path


def read(path, datastore=None):
    """The manifest at `path` with absolute paths, checked; against `datastore` (its fingerprint
    and its shards') when given."""
    what = f"index manifest {path}"
    m = check_schema(read_json(path, what), SCHEMA, what)
    if m["format"] != FORMAT:
        raise CorruptError(f"{path} is not a knnlm index manifest (format {m['format']!r}, not {FORMAT!r})")
    if not m["complete"]:
        raise CorruptError(f"{what} is marked incomplete; run knnlm-build-index again")
    offset = 0
    for i, s in enumerate(m["shards"]):
        check_schema(s, SHARD_SCHEMA, f"{what}, shard {i}")
        if s["offset"] != offset:
            raise CorruptError(f"{what}: shard {i} starts at id {s['offset']:,}, expected {offset:,}; it was edited")
        offset += s["size"]
        s["index"], s["datastore"] = _abs(s["index"], path), _abs(s["datastore"], path)
    if offset != m["size"]:
        raise CorruptError(f"{what}: its shards hold {offset:,} entries, it says {m['size']:,}; it was edited")
    if datastore is not None:
        if datastore.fingerprint != m["datastore_fingerprint"]:
            raise MismatchError(
                f"index manifest {path} was built from datastore {m.get('datastore')} "
                f"({m['datastore_fingerprint']}), not from {datastore.prefix} ({datastore.fingerprint}); "
                f"rebuild the index or point --dstore-filename at the datastore it was built from")
        shards = getattr(datastore, "shards", [datastore])
        if len(shards) != len(m["shards"]):
            raise MismatchError(f"index manifest {path} has {len(m['shards'])} parts but datastore "
                                f"{datastore.prefix} has {len(shards)} shards")
    return m
