"""The datastore: keys (context vectors) and values (next tokens) on disk.

Layout for a prefix P (the original code's naming, so its commands still apply):
    P_keys.npy   float32 or float16, shape (N, D)
    P_vals.npy   int32 or int64, shape (N,)
    P_meta.json  what made them, and `complete: true` written last

Keys are never read into memory unless asked; `Datastore` hands out memory maps. This module
reads; `knnlm.store.writer` writes (`DatastoreWriter`); `knnlm.store.legacy` opens the original
code's raw format.
"""

import mmap
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..artefacts import (check_schema, read_json)
from ..errors import ConfigError, CorruptError, IncompleteError, MismatchError
from .legacy import open_raw

FORMAT_VERSION = 1
NPY_MAGIC = b"\x93NUMPY"
# Threads that read memory-mapped keys at once. Reading a key that is not in the page cache
# blocks its thread on the disk, which serves many reads at a time: on the benchmark host's
# virtio disk 16 threads fetched ~8x the random rows/s of one (benchmarks/README.md, Scale).
GATHER_IO_THREADS = 16
# Fewer rows than this per thread are read by the caller alone (cached keys gain nothing).
GATHER_MIN_ROWS_PER_THREAD = 1024
_io_pool = None
_io_pool_lock = threading.Lock()


def _gather_pool():
    global _io_pool
    with _io_pool_lock:
        if _io_pool is None:
            _io_pool = ThreadPoolExecutor(GATHER_IO_THREADS, thread_name_prefix="knnlm-gather")
        return _io_pool


def take_rows(keys, ids):
    """keys[ids] for ascending `ids` from a memory map, read by up to GATHER_IO_THREADS threads
    over contiguous runs of `ids` (numpy's take releases the GIL while it faults pages in)."""
    threads = min(GATHER_IO_THREADS, len(ids) // GATHER_MIN_ROWS_PER_THREAD)
    if threads < 2:
        return np.asarray(np.take(keys, ids, axis=0))
    out = np.empty((len(ids),) + keys.shape[1:], dtype=keys.dtype)
    bounds = np.linspace(0, len(ids), threads + 1).astype(np.int64)

    def part(i):
        a, b = bounds[i], bounds[i + 1]
        np.take(keys, ids[a:b], axis=0, out=out[a:b])

    for _ in _gather_pool().map(part, range(threads)):
        pass  # re-raises a part's exception here
    return out


def paths(prefix):
    return {
        "keys": f"{prefix}_keys.npy",
        "vals": f"{prefix}_vals.npy",
        "meta": f"{prefix}_meta.json",
    }


# What a datastore's metadata must hold (knnlm.artefacts.check_schema): field -> (types, required).
META_SCHEMA = {
    "complete": (bool, True), "size": (int, True), "dim": (int, True),
    "format_version": (int, False), "uuid": (str, False), "keys_dtype": (str, False),
    "vals_dtype": (str, False), "keytype": ((str, type(None)), False), "dict_size": ((int, type(None)), False),
    "dict_fingerprint": ((str, type(None)), False), "model_fingerprint": ((str, type(None)), False),
    "split": ((str, type(None)), False), "data": ((str, type(None)), False),
    "context_window": ((int, type(None)), False), "tokens_per_sample": ((int, type(None)), False),
}
_KEY_DTYPES = ("float16", "float32")
_VAL_DTYPES = ("int16", "int32", "int64")


def value_dtype(dict_size):
    # int16 overflows WikiText-103's 267K-word vocabulary (a bug of the original code).
    return np.int32 if dict_size < 2**31 else np.int64


class Datastore:
    """A complete datastore opened read-only; keys stay on disk unless `in_memory`."""

    def __init__(self, prefix, keys, vals, meta):
        self.prefix, self.keys, self.vals, self.meta = prefix, keys, vals, meta

    @property
    def size(self):
        return len(self.vals)

    @property
    def dim(self):
        return self.keys.shape[1] if self.keys is not None else int(self.meta["dim"])

    @property
    def fingerprint(self):
        """Identifies this exact dump: an index records it to refuse a different datastore."""
        return f"{self.meta.get('uuid', 'legacy')}:{self.size}"

    def __repr__(self):
        return f"Datastore({self.prefix!r}, size={self.size:,}, dim={self.dim}, keys={self.keys.dtype})"

    # ---- derived datastores: pruned (knnlm.store.prune), reduced keys (knnlm.store.reduce) ----

    @property
    def model_dim(self):
        """The dimension of the model's states this datastore's keys came from (reduced keys: before)."""
        return int(self.meta["transform"]["d_in"]) if self.meta.get("transform") else self.dim

    @property
    def weighted(self):
        """True for a pruned datastore: each entry stands for `weight` original ones."""
        return bool(self.meta.get("weights_file"))

    def gather_weights(self, ids):
        """Weights at rows `ids` (any shape), int32; only for a weighted datastore."""
        if not hasattr(self, "_weights"):
            path = os.path.join(os.path.dirname(os.path.abspath(self.prefix)), self.meta["weights_file"])
            try:
                self._weights = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise CorruptError(f"datastore {self.prefix}: its weights {path} are unreadable ({e}); prune again") from None
            if self._weights.shape != (self.size,):
                raise CorruptError(f"datastore {self.prefix}: {path} holds {self._weights.shape} weights for "
                                   f"{self.size:,} entries; prune again")
        return np.asarray(np.take(self._weights, np.asarray(ids)))

    def query_transform(self):
        """The callable a query goes through before search (reduced keys), or None."""
        if not self.meta.get("transform"):
            return None
        from .transform import QueryTransform

        return QueryTransform(self)

    @classmethod
    def open(cls, prefix, *, in_memory=False, dstore_size=None, dim=None, fp16=None, load_keys=True):
        """Open P_keys.npy/P_vals.npy/P_meta.json, checking that they are whole and agree.

        A datastore written by the original kNN-LM code (raw memmaps without header or
        metadata) opens only with `dstore_size` and `dim` (and `fp16` if it was).
        load_keys=False (--no-load-keys) opens only the values: the keys file need not exist,
        and `keys` is None (FAISS's own distances only).
        """
        files = paths(prefix)
        for what, name in (("keys", "keys"), ("vals", "values")):
            if what == "keys" and not load_keys:
                continue
            if not os.path.exists(files[what]):
                raise CorruptError(
                    f"datastore {prefix}: {name} file {files[what]} is missing; check "
                    f"--dstore-filename/--dstore-mmap (the prefix, without _keys.npy)"
                )
        with open(files["keys" if load_keys else "vals"], "rb") as f:
            is_npy = f.read(6) == NPY_MAGIC
        if not is_npy:
            keys, vals, meta = open_raw(prefix, files, dstore_size, dim, fp16, in_memory, load_keys)
            return cls(prefix, keys, vals, meta)
        what = f"datastore {prefix}"
        meta = check_schema(read_json(files["meta"], what), META_SCHEMA, what, files["meta"])
        if not meta["complete"]:
            raise IncompleteError(
                f"datastore {prefix} is incomplete: the dump that wrote it did not finish "
                f"({meta.get('size', 0)} entries recorded). Run the dump again; it starts over."
            )
        if meta.get("keys_dtype", "float32") not in _KEY_DTYPES or meta.get("vals_dtype", "int32") not in _VAL_DTYPES:
            raise CorruptError(f"{what}: metadata {files['meta']} names key/value types "
                               f"{meta.get('keys_dtype')!r}/{meta.get('vals_dtype')!r}, expected "
                               f"{'/'.join(_KEY_DTYPES)} and {'/'.join(_VAL_DTYPES)}; it is damaged")
        try:
            keys = np.load(files["keys"], mmap_mode="r") if load_keys else None
            vals = np.load(files["vals"], mmap_mode="r")
        except Exception as e:  # noqa: BLE001 - numpy parses a damaged header many ways (ValueError, SyntaxError, tokenize.TokenError, ...)
            raise CorruptError(f"datastore {prefix}: cannot read its files ({e}); they are truncated or damaged") from None
        for what, a in (("keys", keys), ("vals", vals)):
            if a is not None and not a.dtype.isnative:
                raise CorruptError(
                    f"datastore {prefix}: {files[what]} stores {a.dtype.name} in "
                    f"{'big' if a.dtype.byteorder == '>' else 'little'}-endian byte order, not this machine's "
                    f"({sys.byteorder}-endian): FAISS and the scoring read native numbers only. Convert it once: "
                    f"python -c \"import numpy as np; a = np.load('{files[what]}'); "
                    f"np.save('{files[what]}', a.astype(a.dtype.newbyteorder('='))\"")
        if (keys is not None and not keys.flags.c_contiguous) or not vals.flags.c_contiguous:
            raise CorruptError(f"datastore {prefix}: its .npy headers are not the C-order arrays a dump writes; "
                               f"the files were damaged or replaced. Dump it again")
        expected = (meta["size"], meta["dim"])
        if (keys is not None and keys.shape != expected) or vals.shape != (meta["size"],):
            raise CorruptError(
                f"datastore {prefix}: keys {None if keys is None else keys.shape} / values {vals.shape} disagree with "
                f"the metadata's {meta['size']:,} entries of dimension {meta['dim']}; the files "
                f"were truncated or replaced. Dump it again."
            )
        if (keys is not None and keys.dtype.name != meta.get("keys_dtype", keys.dtype.name)) or \
                vals.dtype.name != meta.get("vals_dtype", vals.dtype.name):
            raise CorruptError(
                f"datastore {prefix}: the files hold {None if keys is None else keys.dtype.name} keys / "
                f"{vals.dtype.name} values but the metadata says {meta.get('keys_dtype')}/"
                f"{meta.get('vals_dtype')}; the files were replaced. Dump it again.")
        if dstore_size is not None and dstore_size != meta["size"]:
            raise MismatchError(f"datastore {prefix} has {meta['size']:,} entries, --dstore-size says {dstore_size:,}")
        if dim is not None and dim != meta["dim"]:
            raise MismatchError(f"datastore {prefix} has keys of dimension {meta['dim']}, but {dim} was expected")
        if in_memory:
            # a real copy: ascontiguousarray would keep the memmap
            keys, vals = (None if keys is None else np.array(keys)), np.array(vals)
        return cls(prefix, keys, vals, meta)

    def gather_vals(self, ids):
        """Values at row `ids` (any shape)."""
        return np.asarray(np.take(self.vals, np.asarray(ids)))  # same values and shape as vals[ids]

    def gather_keys(self, ids):
        """Keys at rows `ids` (1-D), read in ascending row order so the memory map streams."""
        if self.keys is None:
            raise ConfigError(f"datastore {self.prefix} was opened without its keys (--no-load-keys): "
                              f"exact distances need them; use --knn-sim-func do_not_recomp_l2")
        ids = np.asarray(ids).reshape(-1)
        if isinstance(self.keys, np.memmap) or not self.keys.flags.owndata:
            if len(ids) < 2 or (ids[1:] >= ids[:-1]).all():
                return take_rows(self.keys, ids)  # already ascending
            # Equal ids read the same row, so an unstable sort gives the same result, faster.
            order = np.argsort(ids)
            out = np.empty((len(ids), self.dim), dtype=self.keys.dtype)
            out[order] = take_rows(self.keys, ids[order])
            return out
        return self.keys[ids]

    @property
    def keys_bytes(self):
        """Bytes of keys (on disk for a memory map); 0 when opened without them."""
        return 0 if self.keys is None else int(self.keys.nbytes)

    def advise_random(self):
        """Tell the kernel that the memory-mapped keys are read at random rows: a page fault then
        reads its own page, not the kernel's read-around window (read_ahead_kb, 8 MiB on the
        benchmark host) that a datastore larger than the page cache evicts unused. True if done."""
        mm = getattr(self.keys, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_RANDOM"):
            return False  # keys in memory, or a platform without madvise
        mm.madvise(mmap.MADV_RANDOM)
        return True

    def check_compatible(self, *, dim=None, keytype=None, dict_size=None, dict_fingerprint=None,
                         model_fingerprint=None, allow_model_mismatch=False):
        """Refuse, by name, a datastore that does not belong to the model about to use it."""
        m = self.meta
        if dim is not None and self.model_dim != dim:
            raise MismatchError(
                f"datastore {self.prefix} has keys of dimension {self.model_dim} but the model's "
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
                f"{m['model_fingerprint']}, {_dumped_by(m)}) than the model "
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

    def check_keys_finite(self, chunk=1 << 16):
        """Scan every key (in chunks) for NaN/inf; returns the number of all-zero rows (a writer
        that never filled them). Raises CorruptError naming the first non-finite row."""
        if self.keys is None:
            return 0
        zero = 0
        for s in range(0, self.size, chunk):
            k = np.asarray(self.keys[s:s + chunk])
            finite = np.isfinite(k).all(axis=1)
            if not finite.all():
                bad = s + int(np.argmin(finite))
                raise CorruptError(f"datastore {self.prefix}: the key of row {bad:,} is not finite "
                                   f"({self.keys[bad][~np.isfinite(self.keys[bad])][0]}); dump it again")
            zero += int((~k.any(axis=1)).sum())
        return zero

    def check_split(self, split, data=None, *, allow_same_split=False):
        """Refuse to score the split (of the data directory) the datastore was dumped from:
        every target would be in it (a leak), unless `allow_same_split` (memorisation experiments)."""
        m = self.meta
        if allow_same_split or m.get("legacy") or split is None or m.get("split") != split:
            return
        stored = resolve_data_path(m.get("data"), self.prefix)
        if data is not None and stored is not None and \
                os.path.realpath(stored) != os.path.realpath(os.path.abspath(data)):
            return
        raise MismatchError(
            f"datastore {self.prefix} was dumped from the '{split}' split of {m.get('data') or 'this data'}, "
            f"the split being scored: every target is in the datastore, so the perplexity measures "
            f"memorisation, not the kNN-LM. Score another split (--gen-subset), or pass "
            f"--knn-allow-same-split if that is the experiment")


def _dumped_by(meta):
    """What the metadata says made the dump: fairseq records its checkpoint, knnlm-hf its model."""
    if meta.get("checkpoint"):
        return f"checkpoint {meta['checkpoint']}"
    if meta.get("model"):
        return f"model {meta['model']}"
    return "model not recorded"


def resolve_data_path(path, prefix):
    """A data directory recorded in a datastore's metadata: absolute (since this version), or, for
    older dumps, relative to the directory the dump ran in (tried from here) or to the metadata's
    folder. None if nothing was recorded."""
    if not path:
        return None
    if os.path.isabs(path):
        return path
    if os.path.isdir(path):
        return os.path.abspath(path)
    beside = os.path.join(os.path.dirname(os.path.abspath(prefix)), path)
    if os.path.isdir(beside):
        return beside
    up = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(prefix))), path)
    return up if os.path.isdir(up) else path
