"""What every console script shares: errors as one line, interruptions as one line, progress bars.

    def main(argv=None):
        return run_command("knnlm-tune", build_parser(), body, argv)

A `KNNLMError` prints `PROG: error: ...` and exits 2; Ctrl-C (SIGINT) or SIGTERM prints one
line and exits 130 after the unfinished outputs were removed (`knnlm.lifecycle`). Progress
bars go to stderr with an ETA (tqdm), and stay quiet when KNNLM_NO_PROGRESS=1.
"""

import logging
import os
import sys


def run_command(prog, parser, body, argv=None):
    """Parse argv, run body(args): a KNNLMError is `PROG: error: ...` (exit 2), SIGINT/SIGTERM one
    line (exit 130), unfinished outputs removed either way (knnlm.lifecycle.run_main)."""
    from .lifecycle import run_main

    args = parser.parse_args(argv)
    args.prog = prog
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"{prog}: warning: %(message)s", level=logging.WARNING)
    return run_main(prog, lambda: body(args) and None)


def progress(iterable=None, *, total=None, desc=None, unit="it", **kw):
    """A tqdm progress bar with an ETA on stderr (off with KNNLM_NO_PROGRESS=1)."""
    from tqdm import tqdm

    disable = os.environ.get("KNNLM_NO_PROGRESS", "") not in ("", "0")
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0, **kw)
