"""Run console commands in forked children of one pre-imported process, with faults injected.

The fault-injection harness (tests/test_faults.py) runs each artefact-writing command many
times; paying ~5 s of imports (torch, faiss, fairseq) per run would take minutes. The server
imports them once and forks a child per run, which runs the command's entry point as its
console script would (own argv, exit status, stdout and stderr through pipes) under:

* fsize: RLIMIT_FSIZE in bytes (a full disk: a write past it fails with EFBIG; SIGXFSZ is
  ignored as knnlm.cleanup ignores it, so the write fails instead of killing the process);
* fault: {"signal": N}: the child sends itself signal N when a writer is about to move its new
  files into place (`knnlm.artefacts.AtomicOutput.commit`, every writer's last step): all the
  new bytes are written, nothing old has changed: "mid-write" for SIGKILL and SIGINT.

    server = ForkRunner(); r = server.run("knnlm-prune", [...], fsize=4096); server.close()
"""

import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {  # console script -> module:function (pyproject.toml [project.scripts])
    "fairseq-eval-lm": "fairseq_cli.eval_lm:cli_main",
    "knnlm-build-index": "knnlm.index.builder:main",
    "knnlm-tune": "knnlm.offline.tune:main",
    "knnlm-prune": "knnlm.offline.prune:main",
    "knnlm-reduce": "knnlm.store.reduce:main",
    "knnlm-adaptive": "knnlm.retrieval.adaptive.train:main",
    "knnlm-retomaton-cluster": "knnlm.offline.retomaton_clusters:main",
    "knnlm.subset": "knnlm.store.subset:main",
    "knnlm.sweeps": "knnlm.offline.sweeps:main",
    "knnlm-subset": "knnlm.store.subset:main",
    "knnlm-sweeps": "knnlm.offline.sweeps:main",
    "knnlm-hf": "knnlm.hf.cli:main",
}


@dataclass
class Result:
    command: str
    argv: list
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self):
        return self.stdout + self.stderr

    def __str__(self):
        return (f"{self.command} {' '.join(self.argv)} -> {self.returncode}\n--- stdout ---\n{self.stdout[-3000:]}"
                f"\n--- stderr ---\n{self.stderr[-3000:]}")


def _import(entry):
    import importlib

    module, func = entry.split(":")
    return getattr(importlib.import_module(module), func)


def _child(job, w_out, w_err):
    code = 1
    try:
        os.dup2(w_out, 1)
        os.dup2(w_err, 2)
        sys.stdin = open(os.devnull)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # A fresh command's signal handling, whatever the test process installed before the
        # server forked (Ray's driver, started by another test in the same worker, handles SIGINT).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if job.get("fsize") is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (job["fsize"], job["fsize"]))
        import torch

        torch.set_num_threads(1)
        if job.get("fault"):
            from knnlm.artefacts import AtomicOutput

            commit, sig = AtomicOutput.commit, int(job["fault"]["signal"])

            def faulty_commit(self, *a, **k):
                os.kill(os.getpid(), sig)  # SIGINT: KeyboardInterrupt here, before anything moves
                return commit(self, *a, **k)

            AtomicOutput.commit = faulty_commit
        sys.argv = [job["command"], *job["argv"]]
        try:
            code = _import(ENTRY_POINTS[job["command"]])(job["argv"]) if job["command"] != "fairseq-eval-lm" \
                else _import(ENTRY_POINTS[job["command"]])()
            code = 0 if code is None else code
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            sys.excepthook(*sys.exc_info())  # what the interpreter does with an uncaught error
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


def _run_job(job):
    r_out, w_out = os.pipe()
    r_err, w_err = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r_out)
        os.close(r_err)
        _child(job, w_out, w_err)  # never returns
    os.close(w_out)
    os.close(w_err)
    chunks = {r_out: [], r_err: []}
    deadline = time.monotonic() + job.get("timeout", 120)
    open_fds = [r_out, r_err]
    while open_fds:
        ready, _, _ = select.select(open_fds, [], [], 0.5)
        for fd in ready:
            data = os.read(fd, 1 << 16)
            if data:
                chunks[fd].append(data)
            else:
                open_fds.remove(fd)
                os.close(fd)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = float("inf")
    _, status = os.waitpid(pid, 0)
    return {"returncode": os.waitstatus_to_exitcode(status),
            "stdout": b"".join(chunks[r_out]).decode(errors="replace"),
            "stderr": b"".join(chunks[r_err]).decode(errors="replace")}


def _serve():
    import warnings

    warnings.simplefilter("ignore")
    out = sys.stdout
    sys.stdout = sys.stderr
    import torch  # noqa: F401 - the import cost, paid once
    import faiss  # noqa: F401
    import fairseq_cli.eval_lm  # noqa: F401

    for entry in ENTRY_POINTS.values():
        _import(entry)
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        print(json.dumps(_run_job(json.loads(line))), file=out, flush=True)


class ForkRunner:
    """The client: starts the server once; `run(command, argv, fsize=None, fault=None)` -> Result."""

    def __init__(self, cwd=None):
        env = dict(os.environ, PYTHONWARNINGS="ignore", TQDM_DISABLE="1")
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                     cwd=str(cwd or REPO))
        self._ready = False

    def _readline(self, timeout):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise AssertionError(f"fork server gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"fork server died (exit {self.proc.poll()})")
        return line

    def run(self, command, argv, *, fsize=None, fault=None, timeout=120):
        if not self._ready:
            assert self._readline(180).strip() == "ready"
            self._ready = True
        argv = [str(a) for a in argv]
        job = {"command": command, "argv": argv, "fsize": fsize, "fault": fault, "timeout": timeout}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self._readline(timeout + 30))
        return Result(command, argv, r["returncode"], r["stdout"], r["stderr"])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    sys.path.insert(0, str(REPO))
    _serve()
