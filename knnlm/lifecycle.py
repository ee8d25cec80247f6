"""How every command ends: a named error, SIGINT or SIGTERM each print one line, and leave
nothing half-written behind (the unfinished outputs of `knnlm.artefacts` are removed).

    sys.exit(run_main("knnlm-prune", lambda: body(args)))

SIGTERM is turned into KeyboardInterrupt (in the main thread, once a writer starts or a
command runs), so the writers' cleanup runs for both signals; a second signal while cleaning
up is ignored so that the cleanup finishes.
"""

import os
import signal
import sys
import threading

from .artefacts import write_error
from .cleanup import Terminated, _on_sigterm, abort_all, install_signal_handlers
from .errors import KNNLMError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def interrupted_message(prog, e, again="Run the command again to start over"):
    name = "SIGTERM" if isinstance(e, Terminated) else "SIGINT"
    return (f"{prog}: interrupted ({name}); unfinished files were removed and every complete artefact "
            f"is as it was. {again}")


def _cleanup():
    old = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    try:
        if old is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        abort_all()
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)
            signal.signal(signal.SIGTERM, _on_sigterm)


def run_main(prog, body, again="Run the command again to start over"):
    """Run body() -> exit status (None is 0); a KNNLMError is `PROG: error: ...` and status 2,
    SIGINT/SIGTERM one line and status 130; unfinished outputs are removed either way."""
    install_signal_handlers()
    try:
        code = body()
        return 0 if code is None else code
    except KNNLMError as e:
        _cleanup()
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as e:
        _cleanup()
        print(interrupted_message(prog, e, again), file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:  # a write error no writer named: still one line, with what to do
        _cleanup()
        print(f"{prog}: error: {write_error(e, e.filename or '?', prog)}", file=sys.stderr)
        return EXIT_ERROR


def end_process(value, prog):
    """For a host program's uncaught exception (fairseq-eval-lm): remove unfinished outputs,
    print one line and exit at once (os._exit: FAISS/OpenMP threads alive at interpreter
    teardown can abort the process after the message). Returns only for other exceptions."""
    if not isinstance(value, (KNNLMError, KeyboardInterrupt)):
        return
    _cleanup()
    if isinstance(value, KeyboardInterrupt):
        sys.stderr.write(interrupted_message(prog, value) + "\n")
        code = EXIT_INTERRUPTED
    else:
        sys.stderr.write(f"{value.__class__.__name__}: {value}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not hide the exit status
            pass
    import logging

    logging.shutdown()
    os._exit(code)
