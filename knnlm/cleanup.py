"""What this process must undo if it ends before finishing a write: a registry of cleanups
(temporaries, locks) that `knnlm.artefacts` fills and `knnlm.lifecycle` empties on an uncaught
error or a signal, and the signal handlers that make SIGTERM unwind like SIGINT."""

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, like SIGINT's KeyboardInterrupt."""


def _on_sigterm(signum, frame):
    raise Terminated()


def install_signal_handlers():
    """SIGTERM -> Terminated (a KeyboardInterrupt) in the main thread, unless someone set a
    handler of their own; SIGXFSZ (a file-size limit) ignored, so a write past the limit fails
    with EFBIG, a named error, instead of killing the process without a word."""
    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, _on_sigterm)
        if hasattr(signal, "SIGXFSZ") and signal.getsignal(signal.SIGXFSZ) == signal.SIG_DFL:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    except (ValueError, OSError):  # not the main interpreter thread, or an embedded interpreter
        pass


_ACTIVE = {}  # id -> cleanup callable of every unfinished output of this process
_ACTIVE_LOCK = threading.Lock()
_ATEXIT = False


def register_cleanup(key, cleanup):
    """Remember how to undo an unfinished write, so a signal or an uncaught error removes it
    (`abort_all`); the first registration also turns SIGTERM into KeyboardInterrupt."""
    global _ATEXIT
    with _ACTIVE_LOCK:
        _ACTIVE[key] = cleanup
        first, _ATEXIT = not _ATEXIT, True
    if first:
        import atexit

        atexit.register(abort_all)  # an uncaught error: the interpreter still runs this
    install_signal_handlers()


def unregister_cleanup(key):
    with _ACTIVE_LOCK:
        _ACTIVE.pop(key, None)


def abort_all():
    """Undo every unfinished write of this process (temporaries, locks); called when it is
    about to end without finishing them (an uncaught error, SIGINT/SIGTERM)."""
    with _ACTIVE_LOCK:
        pending = list(_ACTIVE.items())
        _ACTIVE.clear()
    for _, cleanup in reversed(pending):
        try:
            cleanup()
        except Exception:  # noqa: BLE001 - cleaning up the rest matters more than one failure
            pass
    return len(pending)


