"""What the benchmarks share: the repository's place, running a command-line tool with its peak
memory, parsing fairseq-eval-lm's summary lines, the peak memory of one call in this process,
the machine's description and tables.

Run every benchmark from the repository root as a module (`python -m benchmarks.run`): the
checkout's knnlm is then the one imported, installed or not, and `benchmarks.common` is a
plain import.
"""

import gc
import math
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def log(msg=""):
    print(msg, flush=True)


# --------------------------------------------------------------------------- running tools

class ToolError(RuntimeError):
    pass


def run_tool(cmd, log_path, env=None):
    """Run a command to completion; (wall seconds, peak RSS bytes of that child, output text)."""
    cmd = [str(c) for c in cmd]
    if (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    e = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_path.with_suffix(".maxrss")
    t0 = time.perf_counter()
    with open(log_path, "w") as f:
        # Through a small launcher: Linux carries a process's peak RSS over fork and exec, so a
        # tool forked straight from this (possibly large) process would report at least our size.
        p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(rss_file), *cmd], stdout=f,
                             stderr=subprocess.STDOUT, env=e, cwd=REPO)
        p.wait()
    wall = time.perf_counter() - t0
    out = log_path.read_text(errors="replace")
    if p.returncode != 0:
        raise ToolError(f"{' '.join(cmd)} failed ({p.returncode}); log {log_path}:\n{out[-3000:]}")
    return wall, int(rss_file.read_text()) * 1024, out


# Runs argv[2:] and writes that child's own ru_maxrss (KiB, from os.wait4) to argv[1].
_LAUNCHER = """
import os, subprocess, sys
p = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(p.pid, 0)
open(sys.argv[1], "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


EVALUATED = re.compile(r"Evaluated ([\d,]+) tokens in ([\d.]+)s \(([\d.]+) tokens/s\)")
PPL = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+|inf)")
KNN = re.compile(r"kNN-LM: ([\d,]+) tokens, base LM perplexity ([\d.]+), kNN-LM perplexity ([\d.]+|inf)")


def parse_eval(out):
    m = EVALUATED.findall(out)
    if not m:
        raise ToolError("no 'Evaluated N tokens' line in fairseq-eval-lm's output:\n" + out[-2000:])
    tokens, _, tps = m[-1]
    tokens, tps = int(tokens.replace(",", "")), float(tps)
    r = {"tokens": tokens, "tokens_per_s": tps, "seconds": tokens / tps if tps else math.inf}
    p = PPL.findall(out)
    if p:
        r["ppl"] = float(p[-1][1])
    kn = KNN.findall(out)
    if kn:
        r["base_ppl"], r["ppl"] = float(kn[-1][1]), float(kn[-1][2])
    return r


# ---- peak memory of one call: resident-set high-water mark, reset before the call ----

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def can_reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measured(fn, *args, memory=True):
    """(result, seconds, peak extra resident bytes or None) of fn(*args)."""
    if memory:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
        base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = fn(*args)
    seconds = time.perf_counter() - t0
    peak = (_status_kib("VmHWM") - base) * 1024 if memory else None
    return out, seconds, peak


# ---- reports ----

def fmt_bytes(b):
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def ratio(a, b):
    return f"{a / b:.2f}x" if b else "n/a"


def machine():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or cpu
    mem = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    import faiss
    import fairseq
    import torch

    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return {
        "cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
        "memory": f"{mem / 2**30:.1f} GiB" if mem else "?", "gpu": gpu,
        "python": platform.python_version(), "torch": torch.__version__, "faiss": faiss.__version__,
        "numpy": np.__version__, "fairseq": fairseq.__version__,
        "faiss_threads": faiss.omp_get_max_threads(), "torch_threads": torch.get_num_threads(),
    }


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(header, rows):
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * x for x in w)] + [line(r) for r in cells[1:]])
