"""What every artefact (datastore, index, export, manifest) shares: JSON metadata written
atomically, read with a named error, a refusal to replace a complete one by accident, and
`AtomicOutput`, the one way a command writes its files (see its docstring)."""

import errno
import glob
import json
import logging
import os

from .cleanup import abort_all, register_cleanup, unregister_cleanup  # noqa: F401 - abort_all: re-exported
from .errors import ConfigError, CorruptError, DiskSpaceError, KNNLMError, OutputExistsError

logger = logging.getLogger(__name__)


def write_json_atomic(path, obj):
    """Write then rename, so a reader never sees half a metadata file (the temporary name is
    removed if the write fails; a full disk is a DiskSpaceError)."""
    tmp = f"{path}.tmp{os.getpid()}"
    for p in stale_temporaries(path):  # a killed earlier write's
        _remove_quietly(p)
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        if isinstance(e, OSError) and not isinstance(e, KNNLMError):
            raise write_error(e, path, f"metadata {path}") from None
        raise


# --------------------------------------------------------------------------- write errors, names

_DISK_FULL = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_error(e, path, what, kept="nothing complete was replaced"):
    """The named error for an OSError while writing `what` at `path`: a full disk (ENOSPC, a
    quota, or a file-size limit, EFBIG) is a DiskSpaceError, a name too long a ConfigError."""
    reason = e.strerror or str(e)
    if e.errno in _DISK_FULL:
        return DiskSpaceError(f"{what}: the disk is full (or a file-size limit was reached) while writing "
                              f"{e.filename or path} ({reason}); {kept}. Free space or write elsewhere, "
                              f"then run the command again")
    if e.errno == errno.ENAMETOOLONG:
        return ConfigError(f"{what}: the file name {e.filename or path} is too long for its file system; "
                           f"choose a shorter name")
    return KNNLMError(f"{what}: cannot write {e.filename or path} ({reason}); {kept}. Choose a writable place")


def name_max(folder):
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_names(paths, what, derived=".tmp9999999"):
    """Refuse, before any work, a target whose name or a name derived from it (PATH.tmpPID...;
    `derived`: the longest suffix added to it) would exceed the file system's limit: the write
    would otherwise fail at the end."""
    for p in paths:
        folder = os.path.dirname(os.path.abspath(p))
        while folder and not os.path.isdir(folder):
            folder = os.path.dirname(folder)
        limit = name_max(folder or ".")
        base = os.path.basename(os.path.normpath(p))
        longest = len(base.encode()) + len(derived.encode())
        if longest > limit:
            raise ConfigError(
                f"{what}: the name {base!r} is too long: with the suffixes of the files written beside it "
                f"({base}{derived.replace('9999999', 'PID')}) it needs {longest} bytes and the file system "
                f"allows {limit}; choose a name at least {longest - limit} bytes shorter")


def _remove_quietly(path):
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            import shutil

            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)
    except OSError:
        pass


def pid_alive(pid):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


def temp_name(path, pid=None):
    """Where a new version of PATH is written before it moves into place: PATH's folder, the
    name with `.tmpPID` before its extension (np.save and savez keep a name ending in .npy/.npz)."""
    root, ext = _split_ext(path)
    return f"{root}.tmp{os.getpid() if pid is None else pid}{ext}"


def _split_ext(path):
    path = os.path.normpath(str(path))
    root, ext = os.path.splitext(path)
    return (root, ext) if ext in (".npy", ".npz", ".json", ".png", ".pdf", ".faiss", ".index") else (path, "")


def stale_temporaries(path):
    """Temporary names of PATH left by processes that are gone (a killed or interrupted run):
    NAME.tmpPID.EXT (AtomicOutput) and PATH.tmpPID (write_json_atomic, earlier versions)."""
    root, ext = _split_ext(path)
    path = os.path.normpath(str(path))
    found = []
    for pattern, head, tail in ((f"{glob.escape(root)}.tmp[0-9]*{glob.escape(ext)}", root, ext),
                                (f"{glob.escape(path)}.tmp[0-9]*", path, "")):
        for p in glob.glob(pattern):
            pid = p[len(head) + 4:]
            pid = pid[:len(pid) - len(tail)] if tail else pid
            if pid.isdigit() and not pid_alive(pid) and p not in found:
                found.append(p)
    return found


# --------------------------------------------------------------------------- writers in progress

class AtomicOutput:
    """The files (or folders) of one artefact, written under temporary names beside their
    targets and moved into place together. Two rules hold for every writer that uses it:

    * an existing target is never replaced unless `overwrite`, or `replaceable(path)` says it
      is this tool's own (an unfinished leftover, a result it wrote itself);
    * with `overwrite`, nothing old changes until `commit()`: every new file is complete and
      fsynced before the first rename.

    Temporaries are removed on failure, on SIGINT/SIGTERM and (`abort_all`) on an uncaught
    error; those of a killed earlier run (its pid gone) are removed when the next run begins.
    Names too long for the file system are refused before any work.

        with AtomicOutput([out], what=f"clusters {out}", overwrite=args.overwrite) as o:
            np.save(o.path(out), ids)      # write the new content at o.path(target)
            o.commit()                     # fsync, then rename into place (metadata last)

    `describe_existing(path)` -> the refusal's first words (default: "PATH already exists").
    """

    def __init__(self, targets, *, what, overwrite=False, replaceable=None, option="--overwrite",
                 describe_existing=None, make_dirs=True):
        self.targets = [os.path.normpath(str(t)) for t in targets]
        self.what, self.overwrite, self.option = what, bool(overwrite), option
        self.replaceable = replaceable or (lambda path: False)
        self.describe_existing = describe_existing or (lambda path: f"{path} already exists (this command's "
                                                                      f"earlier output, or another file)")
        self.temps = {t: temp_name(t) for t in self.targets}
        self.committed = False
        self.make_dirs = make_dirs
        self._key = None

    # ---- the steps ----
    def begin(self):
        check_names(self.targets, self.what)
        for t in self.targets:
            for p in stale_temporaries(t):
                logger.warning("removing %s, left by an interrupted run", p)
                _remove_quietly(p)
        self.check_existing()
        for t in self.targets if self.make_dirs else ():
            try:
                os.makedirs(os.path.dirname(os.path.abspath(t)), exist_ok=True)
            except OSError as e:
                raise write_error(e, t, self.what) from None
        self._key = id(self)
        register_cleanup(self._key, self.abort)
        return self

    def check_existing(self):
        """Refuse (unless overwrite) a target that exists and is not ours to replace."""
        if self.overwrite:
            return
        for t in self.targets:
            if os.path.lexists(t) and not self.replaceable(t):
                raise OutputExistsError(f"{self.what}: {self.describe_existing(t)}; pass {self.option} to replace "
                                        f"it (only once the new one is complete), or choose another path")

    def path(self, target):
        """The temporary name to write `target`'s new content at (the target itself when the
        caller writes it in place: `in_place()`)."""
        t = os.path.normpath(str(target))
        return self.temps.get(t, t)

    def in_place(self):
        """Write the targets at their own names (nothing of value there: a fresh output, or this
        tool's own unfinished one); commit then only fsyncs, and a failure leaves them as they are."""
        self.temps = {}
        return self

    def commit(self, before=None):
        """fsync every temporary, call `before()` (e.g. mark the old metadata incomplete), then
        rename each into place in the order the targets were given (metadata last)."""
        try:
            for t in self.targets:
                tmp = self.temps.get(t, t)
                if os.path.lexists(tmp):
                    _fsync_path(tmp)
            if before is not None:
                before()
            for t in self.targets:
                tmp = self.temps.get(t)
                if tmp is None or not os.path.lexists(tmp):
                    continue
                if os.path.isdir(tmp) and os.path.isdir(t) and not os.path.islink(t):
                    _replace_dir(tmp, t)
                else:
                    os.replace(tmp, t)
            for folder in {os.path.dirname(os.path.abspath(t)) for t in self.targets}:
                _fsync_dir(folder)
        except OSError as e:
            self.abort()
            if isinstance(e, KNNLMError):
                raise
            raise write_error(e, self.targets[0], self.what) from None
        except BaseException:
            self.abort()
            raise
        self.committed = True
        unregister_cleanup(self._key)

    def abort(self):
        """Remove every temporary (nothing of the old artefact is touched)."""
        for tmp in self.temps.values():
            if os.path.lexists(tmp):
                _remove_quietly(tmp)
        if self._key is not None:
            unregister_cleanup(self._key)

    def __enter__(self):
        return self.begin()

    def __exit__(self, kind, value, tb):
        if not self.committed:
            self.abort()
        if isinstance(value, OSError) and not isinstance(value, KNNLMError):
            raise write_error(value, self.targets[0], self.what) from None
        return False


def _fsync_path(path):
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for f in files:
                _fsync_path(os.path.join(root, f))
        _fsync_dir(path)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(new, old):
    """Move folder `new` over folder `old`: old aside, new in, old removed (a rename cannot
    replace a non-empty folder)."""
    import shutil

    aside = f"{old}.old{os.getpid()}"
    os.replace(old, aside)
    try:
        os.replace(new, old)
    except BaseException:
        os.replace(aside, old)
        raise
    shutil.rmtree(aside, ignore_errors=True)


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
    with the first one's. The kernel drops the lock if the holder dies; the file a killed
    holder leaves is reclaimed, with a message, by the next writer. The lock file is removed
    on release, on SIGINT/SIGTERM and on an uncaught error (`abort_all`).
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
        old = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if old.isdigit() and int(old) != os.getpid() and not pid_alive(old):
            logger.warning("reclaiming the lock %s left by process %s, which is gone (an interrupted run)",
                           self.path, old)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        register_cleanup(("lock", id(self)), self.release)
        return self

    def release(self):
        if self._fd is None:
            return
        unregister_cleanup(("lock", id(self)))
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
