"""What every console script shares: errors as one line, interruptions as one line, progress bars.

    def main(argv=None):
        return run_command("knnlm-tune", build_parser(), body, argv)

A `KNNLMError` prints `PROG: error: ...` and exits 2; Ctrl-C (SIGINT) or SIGTERM prints
`PROG: interrupted` and exits 130 (143 for SIGTERM) after the writers' own clean-up ran
(they remove their temporary files in `finally`/`except BaseException` blocks). Progress bars
go to stderr with an ETA (tqdm), and stay quiet when KNNLM_NO_PROGRESS=1.
"""

import logging
import os
import signal
import sys

from .errors import KNNLMError


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that clean-up code runs."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_command(prog, parser, body, argv=None):
    """Parse argv, run body(args); a KNNLMError -> `PROG: error: ...`, exit 2; an interruption -> exit 130/143."""
    args = parser.parse_args(argv)
    return run_guarded(prog, lambda: body(args))


def run_guarded(prog, call):
    """call() with the shared error and interruption handling; its return value (None: 0) is the exit status."""
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"{prog}: warning: %(message)s", level=logging.WARNING)
    old = None
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        pass
    try:
        rc = call()
        return 0 if rc is None else rc
    except KNNLMError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (nothing half-written was kept)", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (nothing half-written was kept)", file=sys.stderr)
        return 143
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def progress(iterable=None, *, total=None, desc=None, unit="it", **kw):
    """A tqdm progress bar with an ETA on stderr (off with KNNLM_NO_PROGRESS=1)."""
    from tqdm import tqdm

    disable = os.environ.get("KNNLM_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, **kw)
