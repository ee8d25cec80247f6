"""The datastore: keys (context vectors) and values (next tokens) on disk.

Layout for a prefix P (the original code's naming, so its commands still apply):
    P_keys.npy   float32 or float16, shape (N, D)
    P_vals.npy   int32 or int64, shape (N,)
    P_meta.json  what made them, and `complete: true` written last

Keys are never read into memory unless asked; `Datastore` hands out memory maps.
"""

import errno
import glob
import mmap
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import provenance
from ..artefacts import (AtomicOutput, WriteLock, check_names, check_schema, is_complete, read_json, read_json_or_none,
                         write_error, write_json_atomic)
from ..errors import ConfigError, CorruptError, IncompleteError, KNNLMError, MismatchError
from ..memorisation import TokenSketch
from .npy import GrowingNpy

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


class DatastoreWriter:
    """Appends (key, value) rows; `finalize()` marks the datastore complete.

    side_files: names of files that belong to this datastore beside its keys and values
    (prune's "weights.npy" -> PREFIX_weights.npy); write them at `side_path(name)`: they are
    moved into place with the keys and values. Replacing a datastore (overwrite), everything
    is written under temporary names (knnlm.artefacts.AtomicOutput) and nothing old changes
    until the new datastore is complete.
    """

    def __init__(self, prefix, dim, *, keytype, fp16=False, dict_size, dict_fingerprint,
                 model_fingerprint=None, expected_size=None, overwrite=False, extra=None, side_files=(),
                 place="--dstore-mmap"):
        self.prefix, self.place = prefix, place  # place: the option (or argument) that names the prefix
        self.files = paths(prefix)
        self.side_files = {name: f"{prefix}_{name}" for name in side_files}
        self.expected_size = expected_size
        self.keys = self.vals = None
        self.output = None
        self.sketch = TokenSketch()
        check_names([self.files["keys"], self.files["meta"], *self.side_files.values()], f"datastore {prefix}",
                    derived=".tmp9999999.npy")
        try:
            # One writer per prefix: a second dump to it at once is refused by name.
            self.lock = WriteLock(prefix, f"datastore {prefix}").acquire()
        except OSError as e:
            raise _unwritable(prefix, e, self.place) from None
        try:
            self._start(dim, keytype, fp16, dict_size, dict_fingerprint, model_fingerprint, overwrite, extra)
        except OSError as e:
            self._cleanup()
            raise e if isinstance(e, KNNLMError) else _unwritable(prefix, e, self.place) from None
        except BaseException:
            self._cleanup()
            raise

    def _start(self, dim, keytype, fp16, dict_size, dict_fingerprint, model_fingerprint, overwrite, extra):
        prefix = self.prefix
        # Anything already at the prefix that is not our own unfinished dump is data to keep.
        self.replacing = existing_data(prefix, overwrite, self.side_files.values(), place=self.place)
        for p in glob.glob(f"{glob.escape(prefix)}.tmp[0-9]*_*.npy"):  # a killed replacement's files (old naming)
            os.remove(p)
        targets = [self.files["keys"], self.files["vals"], *self.side_files.values()]
        # Replacing: write beside the old datastore and move into place only once complete.
        # Not replacing: in place, under metadata that says "incomplete" (a killed dump is one).
        self.output = AtomicOutput(targets, what=f"datastore {prefix}", overwrite=True).begin()
        if not self.replacing:
            self.output.in_place()
        self.write_files = {"keys": self.output.path(self.files["keys"]), "vals": self.output.path(self.files["vals"])}
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
        if not self.replacing:
            # Metadata first, saying "incomplete": whatever happens next, no reader trusts the files.
            write_json_atomic(self.files["meta"], self.meta)
        self._key_dtype = np.dtype(self.meta["keys_dtype"])
        self.keys = GrowingNpy(self.write_files["keys"], self.meta["keys_dtype"], (dim,), self.expected_size)
        self.vals = GrowingNpy(self.write_files["vals"], self.meta["vals_dtype"], (), self.expected_size)

    def side_path(self, name):
        """Where to write side file `name` now (its temporary name while replacing)."""
        return self.output.path(self.side_files[name])

    def _cleanup(self):
        for f in (self.keys, self.vals):
            if f is not None:
                f.abandon()
        if self.output is not None:
            # replacing: the temporaries go, the old datastore is untouched; in place: the files
            # stay, marked incomplete (the next dump to this prefix starts over)
            self.output.abort()
        if getattr(self, "lock", None) is not None:
            self.lock.release()

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
        with np.errstate(over="ignore"):  # fp16 overflow shows up as inf here, and is refused below
            keys = keys.astype(self._key_dtype, copy=False)
        finite = np.isfinite(keys)
        if not finite.all():  # one vectorised pass over the batch; the row is found only on failure
            bad = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise CorruptError(
                f"datastore {self.prefix}: the key of row {self.size + bad:,} is not finite "
                f"({keys[bad][~finite[bad]][0]}): the model produced NaN/inf states"
                f"{' (or they overflow float16: drop --dstore-fp16)' if self._key_dtype == np.float16 else ''}; "
                f"nothing is scored from it. The datastore is left marked incomplete")
        self.keys.append(keys)
        self.vals.append(vals)
        self.sketch.add(vals)  # the dumped text's fingerprint (knnlm.memorisation)

    def finalize(self):
        if self.expected_size is not None and self.size != self.expected_size:
            self.abandon()
            raise MismatchError(
                f"{self.prefix}: wrote {self.size:,} entries but --dstore-size said "
                f"{self.expected_size:,}; the datastore is left marked incomplete. Drop "
                f"--dstore-size (it is optional) or check the split and context window."
            )
        try:
            self.keys.close()
            self.vals.close()
            self.meta.update(
                size=self.size,
                complete=True,
                finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                bytes=os.path.getsize(self.write_files["keys"]) + os.path.getsize(self.write_files["vals"]),
                token_sketch=self.sketch.record(),
            )

            def retire_old():
                # The old datastore stays whole until the new one is: mark it incomplete, then
                # move the new files over it (replacing links, never writing through them).
                old = read_json_or_none(self.files["meta"])
                if old is not None:
                    write_json_atomic(self.files["meta"], {**old, "complete": False,
                                                           "being_replaced": self.meta["finished"]})

            self.output.commit(before=retire_old if self.replacing else None)
            write_json_atomic(self.files["meta"], self.meta)
        except OSError as e:
            self._cleanup()
            raise e if isinstance(e, KNNLMError) else _unwritable(self.prefix, e, self.place) from None
        except BaseException:
            self._cleanup()
            raise
        self.lock.release()
        return self.meta

    def abandon(self):
        self._cleanup()


def _unwritable(prefix, e, place="--dstore-mmap"):
    if e.errno in (errno.ENOSPC, errno.EFBIG, errno.ENAMETOOLONG, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return write_error(e, prefix, f"datastore {prefix}", kept="any datastore there before is unchanged")
    return KNNLMError(f"cannot write datastore {prefix}: {e.strerror or e} ({e.filename or prefix}); "
                      f"choose a writable {place}")


def existing_data(prefix, overwrite, side_files=(), place="--dstore-mmap"):
    """Refuse (unless overwrite) when PREFIX holds data that is not our own unfinished dump:
    a complete datastore, one in the original code's raw format, other files, or symbolic
    links. Returns True if there is such data (to be replaced only once the new one is whole)."""
    files = paths(prefix)
    old = read_json_or_none(files["meta"])
    links = [p for p in files.values() if os.path.islink(p)]
    present = [p for p in (files["keys"], files["vals"], *side_files) if os.path.lexists(p)]
    if is_complete(old) or (old is not None and old.get("complete") not in (False, None)):
        why = (f"a complete datastore already exists at {prefix} ({old.get('size', '?'):,} entries)"
               if isinstance(old.get("size"), int) else f"a complete datastore already exists at {prefix}")
    elif links:
        why = (f"{links[0]} is a symbolic link (to {os.path.realpath(links[0])}): writing through it "
               f"would replace another datastore's file")
    elif present and not (old is not None and old.get("complete") is False and "format_version" in old):
        why = (f"{present[0]} already exists and is not an unfinished knnlm dump (a datastore in the "
               f"original code's raw format, or another tool's file)")
    else:
        return False
    if not overwrite:
        raise KNNLMError(f"{why}; pass --overwrite to replace it or choose another {place}")
    return True


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
            return cls._open_legacy(prefix, files, dstore_size, dim, fp16, in_memory, load_keys)
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

    @classmethod
    def _open_legacy(cls, prefix, files, dstore_size, dim, fp16, in_memory, load_keys=True):
        if dstore_size is None or dim is None:
            raise KNNLMError(
                f"datastore {prefix} is in the original code's raw format (no .npy header, no "
                f"metadata): give its size and dimension (--dstore-size N --dimension D, and "
                f"--dstore-fp16 if it was dumped so)"
            )
        kdt = np.float16 if fp16 else np.float32
        vdt = np.int16 if fp16 else np.int64  # what the original dump wrote
        for what, dt, width in (("keys", kdt, dim), ("vals", vdt, 1)):
            if what == "keys" and not load_keys:
                continue
            need = dstore_size * width * np.dtype(dt).itemsize
            have = os.path.getsize(files[what])
            if have < need:
                raise CorruptError(
                    f"raw datastore {files[what]} holds {have:,} bytes but {dstore_size:,} x {width} "
                    f"{np.dtype(dt).name} needs {need:,}: truncated, or wrong size/dimension/fp16"
                )
        keys = np.memmap(files["keys"], dtype=kdt, mode="r", shape=(dstore_size, dim)) if load_keys else None
        vals = np.memmap(files["vals"], dtype=vdt, mode="r", shape=(dstore_size, 1))[:, 0]
        if in_memory:
            keys, vals = (None if keys is None else np.array(keys)), np.array(vals)
        meta = {"size": dstore_size, "dim": dim, "legacy": True, "complete": True, "keytype": None}
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
