"""The datastore: keys (context vectors) and values (next tokens) on disk.

Layout for a prefix P (the original code's naming, so its commands still apply):
    P_keys.npy   float32 or float16, shape (N, D)
    P_vals.npy   int32 or int64, shape (N,)
    P_meta.json  what made them, and `complete: true` written last

Keys are never read into memory unless asked; `Datastore` hands out memory maps.
"""

import json
import os
import time
import uuid

import numpy as np

from . import provenance
from .errors import CorruptError, IncompleteError, KNNLMError, MismatchError
from .npy import GrowingNpy

FORMAT_VERSION = 1
NPY_MAGIC = b"\x93NUMPY"


def paths(prefix):
    return {
        "keys": f"{prefix}_keys.npy",
        "vals": f"{prefix}_vals.npy",
        "meta": f"{prefix}_meta.json",
    }


def write_json_atomic(path, obj):
    """Write then rename, so a reader never sees half a metadata file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CorruptError(f"{what}: metadata file {path} is missing") from None
    except (OSError, ValueError) as e:
        raise CorruptError(f"{what}: metadata file {path} is unreadable ({e})") from None


def value_dtype(dict_size):
    # int16 overflows WikiText-103's 267K-word vocabulary (a bug of the original code).
    return np.int32 if dict_size < 2**31 else np.int64


class DatastoreWriter:
    """Appends (key, value) rows; `finalize()` marks the datastore complete."""

    def __init__(self, prefix, dim, *, keytype, fp16=False, dict_size, dict_fingerprint,
                 model_fingerprint=None, expected_size=None, overwrite=False, extra=None):
        self.prefix = prefix
        self.files = paths(prefix)
        self.expected_size = expected_size
        if os.path.exists(self.files["meta"]) and not overwrite:
            try:
                old = read_json(self.files["meta"], prefix)
            except CorruptError:
                old = {}
            if old.get("complete"):
                raise KNNLMError(
                    f"a complete datastore already exists at {prefix} ({old.get('size', '?'):,} "
                    f"entries); pass --overwrite to replace it or choose another --dstore-mmap"
                )
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.meta = {
            "format_version": FORMAT_VERSION,
            "uuid": uuid.uuid4().hex,
            "complete": False,
            "size": 0,
            "dim": int(dim),
            "keys_dtype": "float16" if fp16 else "float32",
            "vals_dtype": np.dtype(value_dtype(dict_size)).name,
            "keytype": keytype,
            "dict_size": int(dict_size),
            "dict_fingerprint": dict_fingerprint,
            "model_fingerprint": model_fingerprint,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": provenance.versions(),
            **(extra or {}),
        }
        # Metadata first, saying "incomplete": whatever happens next, no reader trusts the files.
        write_json_atomic(self.files["meta"], self.meta)
        self.keys = GrowingNpy(self.files["keys"], self.meta["keys_dtype"], (dim,), expected_size)
        self.vals = GrowingNpy(self.files["vals"], self.meta["vals_dtype"], (), expected_size)

    @property
    def size(self):
        return self.keys.rows

    def add(self, keys, vals):
        keys = np.asarray(keys)
        vals = np.asarray(vals)
        if keys.ndim != 2 or keys.shape[1] != self.meta["dim"] or len(keys) != len(vals):
            raise ValueError(f"keys {keys.shape} / values {vals.shape} do not match dim {self.meta['dim']}")
        if len(vals) and (vals.min() < 0 or vals.max() >= self.meta["dict_size"]):
            raise CorruptError(f"{self.prefix}: values outside the dictionary of {self.meta['dict_size']}")
        self.keys.append(keys)
        self.vals.append(vals)

    def finalize(self):
        if self.expected_size is not None and self.size != self.expected_size:
            self.keys.abandon()
            self.vals.abandon()
            raise MismatchError(
                f"{self.prefix}: wrote {self.size:,} entries but --dstore-size said "
                f"{self.expected_size:,}; the datastore is left marked incomplete. Drop "
                f"--dstore-size (it is optional) or check the split and context window."
            )
        self.keys.close()
        self.vals.close()
        self.meta.update(
            size=self.size,
            complete=True,
            finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            bytes=os.path.getsize(self.files["keys"]) + os.path.getsize(self.files["vals"]),
        )
        write_json_atomic(self.files["meta"], self.meta)
        return self.meta

    def abandon(self):
        self.keys.abandon()
        self.vals.abandon()


class Datastore:
    """A complete datastore opened read-only; keys stay on disk unless `in_memory`."""

    def __init__(self, prefix, keys, vals, meta):
        self.prefix, self.keys, self.vals, self.meta = prefix, keys, vals, meta

    @property
    def size(self):
        return len(self.vals)

    @property
    def dim(self):
        return self.keys.shape[1]

    @property
    def fingerprint(self):
        """Identifies this exact dump: an index records it to refuse a different datastore."""
        return f"{self.meta.get('uuid', 'legacy')}:{self.size}"

    def __repr__(self):
        return f"Datastore({self.prefix!r}, size={self.size:,}, dim={self.dim}, keys={self.keys.dtype})"

    @classmethod
    def open(cls, prefix, *, in_memory=False, dstore_size=None, dim=None, fp16=None):
        """Open P_keys.npy/P_vals.npy/P_meta.json, checking that they are whole and agree.

        A datastore written by the original kNN-LM code (raw memmaps without header or
        metadata) opens only with `dstore_size` and `dim` (and `fp16` if it was).
        """
        files = paths(prefix)
        for what, name in (("keys", "keys"), ("vals", "values")):
            if not os.path.exists(files[what]):
                raise CorruptError(
                    f"datastore {prefix}: {name} file {files[what]} is missing; check "
                    f"--dstore-filename/--dstore-mmap (the prefix, without _keys.npy)"
                )
        with open(files["keys"], "rb") as f:
            is_npy = f.read(6) == NPY_MAGIC
        if not is_npy:
            return cls._open_legacy(prefix, files, dstore_size, dim, fp16, in_memory)
        meta = read_json(files["meta"], f"datastore {prefix}")
        if not meta.get("complete"):
            raise IncompleteError(
                f"datastore {prefix} is incomplete: the dump that wrote it did not finish "
                f"({meta.get('size', 0)} entries recorded). Run the dump again; it starts over."
            )
        try:
            keys = np.load(files["keys"], mmap_mode="r")
            vals = np.load(files["vals"], mmap_mode="r")
        except (ValueError, OSError) as e:
            raise CorruptError(f"datastore {prefix}: cannot read its files ({e}); they are truncated or damaged") from None
        expected = (meta["size"], meta["dim"])
        if keys.shape != expected or vals.shape != (meta["size"],):
            raise CorruptError(
                f"datastore {prefix}: keys {keys.shape} / values {vals.shape} disagree with "
                f"the metadata's {meta['size']:,} entries of dimension {meta['dim']}; the files "
                f"were truncated or replaced. Dump it again."
            )
        if dstore_size is not None and dstore_size != meta["size"]:
            raise MismatchError(f"datastore {prefix} has {meta['size']:,} entries, --dstore-size says {dstore_size:,}")
        if dim is not None and dim != meta["dim"]:
            raise MismatchError(f"datastore {prefix} has keys of dimension {meta['dim']}, but {dim} was expected")
        if in_memory:
            keys, vals = np.array(keys), np.array(vals)  # a real copy: ascontiguousarray would keep the memmap
        return cls(prefix, keys, vals, meta)

    @classmethod
    def _open_legacy(cls, prefix, files, dstore_size, dim, fp16, in_memory):
        if dstore_size is None or dim is None:
            raise KNNLMError(
                f"datastore {prefix} is in the original code's raw format (no .npy header, no "
                f"metadata): give its size and dimension (--dstore-size N --dimension D, and "
                f"--dstore-fp16 if it was dumped so)"
            )
        kdt = np.float16 if fp16 else np.float32
        vdt = np.int16 if fp16 else np.int64  # what the original dump wrote
        for what, dt, width in (("keys", kdt, dim), ("vals", vdt, 1)):
            need = dstore_size * width * np.dtype(dt).itemsize
            have = os.path.getsize(files[what])
            if have < need:
                raise CorruptError(
                    f"raw datastore {files[what]} holds {have:,} bytes but {dstore_size:,} x {width} "
                    f"{np.dtype(dt).name} needs {need:,}: truncated, or wrong size/dimension/fp16"
                )
        keys = np.memmap(files["keys"], dtype=kdt, mode="r", shape=(dstore_size, dim))
        vals = np.memmap(files["vals"], dtype=vdt, mode="r", shape=(dstore_size, 1))[:, 0]
        if in_memory:
            keys, vals = np.array(keys), np.array(vals)
        meta = {"size": dstore_size, "dim": dim, "legacy": True, "complete": True, "keytype": None}
        return cls(prefix, keys, vals, meta)

    def gather_vals(self, ids):
        """Values at row `ids` (any shape)."""
        return np.asarray(np.take(self.vals, np.asarray(ids)))  # same values and shape as vals[ids]

    def gather_keys(self, ids):
        """Keys at rows `ids` (1-D), read in ascending row order so the memory map streams."""
        ids = np.asarray(ids).reshape(-1)
        if isinstance(self.keys, np.memmap) or not self.keys.flags.owndata:
            if len(ids) < 2 or (ids[1:] >= ids[:-1]).all():
                return np.asarray(np.take(self.keys, ids, axis=0))  # already ascending: one read
            # Equal ids read the same row, so an unstable sort gives the same result, faster.
            order = np.argsort(ids)
            out = np.empty((len(ids), self.dim), dtype=self.keys.dtype)
            out[order] = np.take(self.keys, ids[order], axis=0)
            return out
        return self.keys[ids]

    def check_compatible(self, *, dim=None, keytype=None, dict_size=None, dict_fingerprint=None,
                         model_fingerprint=None, allow_model_mismatch=False):
        """Refuse, by name, a datastore that does not belong to the model about to use it."""
        m = self.meta
        if dim is not None and self.dim != dim:
            raise MismatchError(
                f"datastore {self.prefix} has keys of dimension {self.dim} but the model's "
                f"{keytype or 'key'} states have dimension {dim}: it was dumped from another model"
            )
        if m.get("legacy"):
            return
        if keytype is not None and m.get("keytype") != keytype:
            raise MismatchError(
                f"datastore {self.prefix} holds '{m.get('keytype')}' keys but '{keytype}' was "
                f"requested; pass --knn-keytype {m.get('keytype')} or dump again"
            )
        if dict_fingerprint is not None and (
            m.get("dict_fingerprint") != dict_fingerprint or m.get("dict_size") != dict_size
        ):
            raise MismatchError(
                f"datastore {self.prefix} was dumped with another dictionary ({m.get('dict_size')} "
                f"symbols, fingerprint {m.get('dict_fingerprint')}) than this model's ({dict_size} "
                f"symbols, fingerprint {dict_fingerprint})"
            )
        if (model_fingerprint is not None and m.get("model_fingerprint") is not None
                and m["model_fingerprint"] != model_fingerprint and not allow_model_mismatch):
            raise MismatchError(
                f"datastore {self.prefix} was dumped with different model weights (fingerprint "
                f"{m['model_fingerprint']}, checkpoint {m.get('checkpoint')}) than the model "
                f"scoring now ({model_fingerprint}); scoring would silently give a worse "
                f"perplexity. Pass --knn-allow-model-mismatch if you mean it."
            )

    def check_values(self, dict_size, chunk=1 << 22):
        """Scan every value (in chunks) for ids outside the dictionary."""
        for s in range(0, self.size, chunk):
            v = np.asarray(self.vals[s:s + chunk])
            if len(v) and (v.min() < 0 or v.max() >= dict_size):
                bad = s + int(np.argmax((v < 0) | (v >= dict_size)))
                raise CorruptError(
                    f"datastore {self.prefix}: value {int(self.vals[bad])} at row {bad:,} is "
                    f"outside the dictionary of {dict_size} symbols"
                )
