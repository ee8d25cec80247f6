"""Datastores dumped in shards, presented as one.

fairseq's --num-shards/--shard-id dump one datastore per shard. A *manifest* (a small JSON
file, by convention P_shards.json) lists the shard prefixes in order; shard k's rows get the
global ids offset_k + row, where offset_k is the number of rows in shards 0..k-1. This is
the order of the concatenated datastore, so an index over the shards finds the same ids as
one over the concatenation. Building an index over them: knnlm.index.sharded_build.
"""

import hashlib
import logging
import os

import numpy as np

from ..artefacts import check_schema, read_json, read_json_or_none, refuse_to_replace, write_json_atomic
from ..errors import ConfigError, CorruptError, MismatchError, OutputExistsError
from .datastore import Datastore

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "knnlm-shards"
MANIFEST_VERSION = 1

# Metadata the shards must agree on to be one datastore.
_SHARED_META = ("keytype", "dict_size", "dict_fingerprint", "model_fingerprint")

MANIFEST_SCHEMA = {"format": (str, True), "version": (int, False), "shards": (list, True),
                   "size": (int, False), "dim": (int, False), "fingerprint": (str, False)}
SHARD_ENTRY_SCHEMA = {"prefix": (str, True), "fingerprint": (str, True), "size": (int, False)}


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
        seen = {}
        for s in shards:
            # The same shard twice (or two copies of one dump) would double every key it holds.
            for key in (os.path.realpath(os.path.abspath(str(s.prefix))), s.fingerprint if not s.meta.get("legacy") else None):
                if key is not None and key in seen:
                    raise CorruptError(
                        f"shards {seen[key].prefix} and {s.prefix} are the same dump ({s.fingerprint}): "
                        f"a sharded datastore lists each shard once; fix the shard list or manifest")
                if key is not None:
                    seen[key] = s
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
        dtypes = {np.dtype(s.meta.get("keys_dtype", "float32")) if s.keys is None else s.keys.dtype for s in shards}
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

    @property
    def keys_bytes(self):
        return sum(s.keys_bytes for s in self.shards)

    def advise_random(self):
        """As `Datastore.advise_random`, for every shard; True if any was memory-mapped."""
        return any([s.advise_random() for s in self.shards])

    def check_compatible(self, **kwargs):
        """As `Datastore.check_compatible`, for every shard."""
        for s in self.shards:
            s.check_compatible(**kwargs)

    def check_values(self, dict_size, **kwargs):
        for s in self.shards:
            s.check_values(dict_size, **kwargs)

    def check_keys_finite(self, **kwargs):
        return sum(s.check_keys_finite(**kwargs) for s in self.shards)

    def check_split(self, split, data=None, **kwargs):
        """As `Datastore.check_split`, for every shard."""
        for s in self.shards:
            s.check_split(split, data, **kwargs)


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
    old = read_json_or_none(path) if os.path.lexists(path) else None
    if os.path.lexists(path) and not overwrite and not (isinstance(old, dict) and old.get("format") == MANIFEST_FORMAT):
        raise OutputExistsError(f"{path} already exists and is not a shard manifest; pass overwrite=true to "
                                f"replace it, or choose another dstore_mmap")
    refuse_to_replace(path, overwrite, lambda old: (
        f"shard manifest {path} already exists and lists other shards; pass "
        f"overwrite=true to replace it, or choose another dstore_mmap"),
        is_existing=lambda old: old.get("fingerprint") != entry["fingerprint"])
    os.makedirs(folder, exist_ok=True)
    write_json_atomic(path, entry)
    return sharded


def open_manifest(path, *, in_memory=False, load_keys=True):
    """Open the shards listed in manifest `path` as one ShardedDatastore."""
    what = f"shard manifest {path}"
    m = read_json(path, what)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or not isinstance(m.get("shards"), list):
        raise CorruptError(f"{path} is not a knnlm shard manifest (no format '{MANIFEST_FORMAT}' / shard list)")
    check_schema(m, MANIFEST_SCHEMA, what)
    shards = []
    for i, entry in enumerate(m["shards"]):
        check_schema(entry, SHARD_ENTRY_SCHEMA, f"{what}, shard {i}")
        ds = Datastore.open(_resolve(path, entry["prefix"]), in_memory=in_memory, load_keys=load_keys)
        if ds.fingerprint != entry.get("fingerprint"):
            raise MismatchError(
                f"shard {ds.prefix} is not the dump listed in manifest {path} (fingerprint "
                f"{ds.fingerprint}, manifest says {entry.get('fingerprint')}): it was dumped "
                f"again; write the manifest again and rebuild the index"
            )
        shards.append(ds)
    sharded = ShardedDatastore(shards, prefix=path)
    if m.get("fingerprint") is not None and m["fingerprint"] != sharded.fingerprint:
        raise MismatchError(f"shard manifest {path} records fingerprint {m['fingerprint']} but its shards "
                            f"give {sharded.fingerprint}: it was edited; write the manifest again")
    return sharded


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
    sharded = open_manifest(manifest, in_memory=kwargs.get("in_memory", False),
                            load_keys=kwargs.get("load_keys", True))
    if kwargs.get("dstore_size") is not None and kwargs["dstore_size"] != sharded.size:
        raise MismatchError(f"sharded datastore {manifest} has {sharded.size:,} entries, --dstore-size says {kwargs['dstore_size']:,}")
    if kwargs.get("dim") is not None and kwargs["dim"] != sharded.dim:
        raise MismatchError(f"sharded datastore {manifest} has keys of dimension {sharded.dim}, but {kwargs['dim']} was expected")
    return sharded
