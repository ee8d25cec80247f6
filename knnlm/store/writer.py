"""Writing a datastore: `DatastoreWriter` appends (key, value) rows to P_keys.npy and P_vals.npy
and writes P_meta.json, `complete: true` last (the layout: `knnlm.store.datastore`)."""

import errno
import glob
import os
import time
import uuid

import numpy as np

from .. import provenance
from ..artefacts import (AtomicOutput, WriteLock, check_names, is_complete, read_json_or_none,
                         write_error, write_json_atomic)
from ..errors import CorruptError, KNNLMError, MismatchError
from ..memorisation import TokenSketch
from .npy import GrowingNpy

from .datastore import FORMAT_VERSION, paths, value_dtype


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
