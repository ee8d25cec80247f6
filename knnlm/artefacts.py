"""What every artefact (datastore, index, export, manifest) shares: JSON metadata written
atomically, read with a named error, and a refusal to replace a complete one by accident."""

import json
import os

from .errors import CorruptError, KNNLMError


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


def read_json_or_none(path):
    """The metadata at `path`, or None if it is missing or unreadable (a half-written earlier run)."""
    if not os.path.exists(path):
        return None
    try:
        return read_json(path, path)
    except CorruptError:
        return None


def refuse_to_replace(meta_path, overwrite, describe, is_existing=lambda meta: bool(meta.get("complete"))):
    """Raise unless `overwrite`, if the metadata at meta_path says a finished artefact lives there.

    describe(meta) -> the message (what exists, and how to replace it or go elsewhere).
    Returns the old metadata (or None), so the caller can log what it is replacing.
    """
    old = read_json_or_none(meta_path)
    if old is not None and is_existing(old) and not overwrite:
        raise KNNLMError(describe(old))
    return old


# --------------------------------------------------------------------------- metadata schemas

_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "an object", type(None): "null"}


def check_schema(meta, schema, what, path=None):
    """Refuse, by field, metadata whose fields are missing or of the wrong type.

    schema: field -> (types, required). A field typed int never takes a bool (JSON true is not
    a size), a float field takes an int, and `"complete": "false"` (a string) is refused rather
    than counted as complete. Returns meta.
    """
    where = f" ({path})" if path else ""
    if not isinstance(meta, dict):
        raise CorruptError(f"{what}: metadata{where} is not a JSON object; it is damaged. Write it again")
    for field, (types, required) in schema.items():
        types = types if isinstance(types, tuple) else (types,)
        if field not in meta:
            if required:
                raise CorruptError(f"{what}: metadata{where} lacks the field '{field}'; it is damaged "
                                   f"or was written by another tool. Write it again")
            continue
        v = meta[field]
        ok = any(isinstance(v, t) and not (t in (int, float) and isinstance(v, bool)) for t in types)
        if float in types and isinstance(v, int) and not isinstance(v, bool):
            ok = True
        if not ok:
            expected = " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)
            raise CorruptError(f"{what}: metadata{where} field '{field}' is {v!r}, expected {expected}; "
                               f"the metadata is damaged. Write it again")
        if isinstance(v, int) and not isinstance(v, bool) and field in _NON_NEGATIVE and v < 0:
            raise CorruptError(f"{what}: metadata{where} field '{field}' is {v}, expected a count >= 0; "
                               f"the metadata is damaged. Write it again")
    return meta


_NON_NEGATIVE = {"size", "dim", "dict_size", "count", "k_kept", "ntotal", "datastore_size", "bytes", "version"}


def is_complete(meta):
    """True only for the JSON value true: a string "false" or 1 is not a completed artefact."""
    return isinstance(meta, dict) and meta.get("complete") is True


# --------------------------------------------------------------------------- one writer per artefact

class WriteLock:
    """An exclusive, non-blocking lock on PATH.lock (fcntl.flock), held while an artefact is written.

    A second writer of the same artefact is refused by name instead of interleaving its rows
    with the first one's. The kernel drops the lock if the holder dies, so a killed run never
    leaves a stale lock; the lock file is removed on release.
    """

    def __init__(self, path, what):
        self.path, self.what, self._fd = f"{path}.lock", what, None

    def acquire(self):
        import fcntl

        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                finally:
                    os.close(fd)
                raise KNNLMError(
                    f"{self.what} is being written by another process (pid {holder}, lock {self.path}); "
                    f"wait for it to finish or write elsewhere") from None
            # The holder before us may have removed the file after we opened it: lock the file
            # that is at the path now, or try again.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self):
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# --------------------------------------------------------------------------- content checksums

CHECKSUM_ALGO = "blake2b-sampled-v1"
_CHECKSUM_WHOLE = 64 << 20  # files up to this size are hashed whole
_CHECKSUM_PIECES, _CHECKSUM_PIECE = 16, 1 << 20


def file_checksum(path):
    """{'algo', 'bytes', 'digest'}: the size and a hash of the whole file (up to 64 MiB) or of 16
    evenly spaced 1 MiB pieces, first and last included (larger files): cheap at load time."""
    import hashlib

    size = os.path.getsize(path)
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _CHECKSUM_WHOLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            span = size - _CHECKSUM_PIECE
            for i in range(_CHECKSUM_PIECES):
                f.seek(span * i // (_CHECKSUM_PIECES - 1))
                h.update(f.read(_CHECKSUM_PIECE))
    return {"algo": CHECKSUM_ALGO, "bytes": size, "digest": h.hexdigest()}


def verify_checksum(path, recorded, what):
    """Raise CorruptError if `path` no longer matches the checksum recorded when it was written."""
    if not isinstance(recorded, dict) or recorded.get("algo") != CHECKSUM_ALGO:
        raise CorruptError(f"{what}: its metadata records a checksum of unknown form ({recorded!r}); "
                           f"the metadata is damaged")
    size = os.path.getsize(path)
    if size != recorded.get("bytes"):
        raise CorruptError(f"{what}: {path} holds {size:,} bytes but {recorded.get('bytes')!r} were "
                           f"written; it was truncated or replaced. Build it again")
    if file_checksum(path)["digest"] != recorded.get("digest"):
        raise CorruptError(f"{what}: the content of {path} differs from what was written (checksum "
                           f"mismatch); the file is damaged. Build it again")
