"""Fault injection: every artefact-writing command, against what breaks writers.

For each command registered in WRITERS (its argv on the tiny fixture and where its output
goes), in this order:

  first        a fresh run succeeds: its files are "the old artefact" from here on;
  foreign      an unrelated file at the output path, no --overwrite: a named error, the file's
               bytes unchanged, nothing else written;
  full, fresh  a full disk (RLIMIT_FSIZE, `ulimit -f`) on a fresh path: a named error, no
               temporaries or locks left; the same command then succeeds there;
  full, over   a full disk with --overwrite over the old artefact: a named error, the old
               artefact's bytes unchanged, no temporaries;
  SIGKILL      killed mid-write with --overwrite (when all new bytes are written, before the
               first rename): the old artefact's bytes unchanged; the rerun succeeds and
               leaves exactly the artefact's files (what the kill left is cleaned up);
  SIGINT       interrupted mid-write with --overwrite: one line, exit 130, the old bytes
               unchanged, nothing left behind; the rerun succeeds.

"A named error": a non-zero exit with our one-line message (`PROG: error: ...` or, under
fairseq, `SomethingError: ...`), never a traceback. A later writer is covered by adding one
entry to WRITERS. The commands run in forked children of one pre-imported process
(tests/forkrun.py), so the ~90 runs take about a minute and a half.
"""

import hashlib
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from .forkrun import ForkRunner
from .helpers import knn_argv

TPS = ("--tokens-per-sample", "64")
FULL_DISK = 4096  # bytes: every artefact below is larger, their logs go to pipes
TEMPORARY = re.compile(r"\.tmp\d+|\.lock$|\.old\d+|_neighbors")


@dataclass
class Writer:
    """A command that writes an artefact: argv(base, out) -> its arguments (without
    --overwrite); `out` is the output path every run of the harness uses (in a folder of its own)."""

    command: str
    argv: Callable
    out: str = "out"
    fsize: int = FULL_DISK
    resumable: tuple = ()  # files an interrupted run keeps on purpose, to resume (not temporaries)


def _dump(base, out):
    return knn_argv(base["data"], base["ckpt"], *TPS, "--gen-subset", "train", "--save-knnlm-dstore",
                    "--dstore-mmap", out, "--knn-keytype", "last_ffn_input")


def _export(base, out):
    return knn_argv(base["data"], base["ckpt"], *TPS, "--gen-subset", "valid", "--knnlm", "--dstore-filename",
                    base["dstore"], "--indexfile", base["index"], "--k", "8", "--knnlm-dump-probs", out)


def _hf(base, *args):
    return ["--model", base["hf_model"], "--max-length", "24", "--stride", "12", *args]


WRITERS = {
    "dump": Writer("fairseq-eval-lm", _dump),
    "export": Writer("fairseq-eval-lm", _export),
    "build-index": Writer("knnlm-build-index", lambda b, o: [f"dstore_mmap={b['dstore']}", f"faiss_index={o}",
                                                            "factory=Flat"], out="out.index",
                          resumable=(".trained", ".progress.json", ".partial")),
    "prune": Writer("knnlm-prune", lambda b, o: [b["dstore"], b["index"], o, "--k", "2", "--probe", "1"]),
    "reduce": Writer("knnlm-reduce", lambda b, o: [b["dstore"], o, "--dim", "16"]),
    "subset": Writer("knnlm.subset", lambda b, o: [b["dstore"], "0.5", o]),
    "clusters": Writer("knnlm-retomaton-cluster", lambda b, o: [b["dstore"], o, "--clusters", "4", "--sample", "2000",
                                                                "--niter", "4"], out="out.npy"),
    "adaptive-train": Writer("knnlm-adaptive", lambda b, o: ["train", b["export"], "--out", o, "--epochs", "2",
                                                             "--heldout", "0.3"], out="out.json"),
    "tune": Writer("knnlm-tune", lambda b, o: [b["export"], "--lambdas", "0:1:0.1", "--json", o,
                                               "--plot", o.replace(".json", ".png")], out="out.json"),
    "sweeps": Writer("knnlm.sweeps", lambda b, o: ["k", b["export"], "--ks", "2,4,8", "--json", o], out="out.json",
                     fsize=128),
    "hf-dump": Writer("knnlm-hf", lambda b, o: ["dump", *_hf(b, "--text", b["hf_train"], "--dstore-mmap", o)]),
    "hf-export": Writer("knnlm-hf", lambda b, o: ["eval", *_hf(b, "--text", b["hf_valid"], "--knnlm", "--dstore-filename",
                                                               b["hf_dstore"], "--indexfile", b["hf_index"], "--k", "4",
                                                               "--knnlm-dump-probs", o)]),
}


# ----------------------------------------------------------------------------- helpers
def snapshot(folder):
    """relative path -> sha256 of every file under `folder` (an export is a folder of files)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def temporaries(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if TEMPORARY.search(p.name))


def assert_kept(folder, old, w, what):
    """The old artefact's files byte for byte, and nothing new but a resumable build's state."""
    now = snapshot(folder)
    changed = [k for k in old if now.get(k) != old[k]]
    extra = [k for k in now if k not in old and not k.endswith(w.resumable or ("\0",))]
    assert not changed and not extra, f"{what}: changed {changed}, new files {extra}"


def assert_named_error(r):
    assert r.returncode not in (0, -9), str(r)
    assert "Traceback" not in r.stderr, str(r)
    assert re.search(r"(^|\n)(\S+: error: |[A-Za-z]*Error: )", r.stderr), str(r)


@pytest.fixture(scope="module")
def runner():
    r = ForkRunner()
    yield r
    r.close()


@pytest.fixture(scope="module")
def base(tiny, runner, tmp_path_factory):
    """A datastore of train, its index and an export of valid: the inputs of the later writers."""
    root = tmp_path_factory.mktemp("fault_base")
    b = {"data": tiny["data"], "ckpt": tiny["ckpt"], "dstore": str(root / "ds"), "index": str(root / "ds.index"),
         "export": str(root / "export")}
    for cmd, argv in (("fairseq-eval-lm", _dump(b, b["dstore"])),
                      ("knnlm-build-index", [f"dstore_mmap={b['dstore']}", f"faiss_index={b['index']}", "factory=Flat"]),
                      ("fairseq-eval-lm", _export(b, b["export"]))):
        r = runner.run(cmd, argv)
        assert r.returncode == 0, str(r)
    # the Hugging Face front-end: a tiny GPT-2 saved as a model directory, its datastore and index
    from .test_hf import WORDS, make_tokenizer, text, tiny as tiny_hf

    tok = make_tokenizer(WORDS)
    tiny_hf("gpt2", len(tok), seed=0).save_pretrained(root / "hf_model")
    tok.save_pretrained(root / "hf_model")
    (root / "hf_train.txt").write_text(text(40, 1))
    (root / "hf_valid.txt").write_text(text(12, 2))
    b.update(hf_model=str(root / "hf_model"), hf_train=str(root / "hf_train.txt"), hf_valid=str(root / "hf_valid.txt"),
             hf_dstore=str(root / "hf_ds"), hf_index=str(root / "hf_ds.index"))
    for cmd, argv in (("knnlm-hf", ["dump", *_hf(b, "--text", b["hf_train"], "--dstore-mmap", b["hf_dstore"])]),
                      ("knnlm-build-index", [f"dstore_mmap={b['hf_dstore']}", f"faiss_index={b['hf_index']}",
                                             "factory=Flat"])):
        r = runner.run(cmd, argv)
        assert r.returncode == 0, str(r)
    return b


# ----------------------------------------------------------------------------- the harness
@pytest.mark.parametrize("name", list(WRITERS))
def test_writer_survives_faults(name, base, runner, tmp_path):
    w = WRITERS[name]
    run = lambda folder, *extra, **kw: runner.run(w.command, [*w.argv(base, str(folder / w.out)), *extra], **kw)  # noqa: E731

    # first: a fresh run; its files are the artefact from here on
    home = tmp_path / "home"
    home.mkdir()
    r = run(home)
    assert r.returncode == 0, str(r)
    expected = set(snapshot(home))
    assert expected and not temporaries(home), (name, sorted(expected))

    # an unrelated file at the output path, no --overwrite
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    target = foreign / (f"{w.out}_keys.npy" if (home / f"{w.out}_keys.npy").exists() else w.out)
    target.write_bytes(os.urandom(300))
    before = snapshot(foreign)
    r = run(foreign)
    assert_named_error(r)
    assert snapshot(foreign) == before, f"{name}: the unrelated file was changed or files were added"

    # a full disk on a fresh path: a named error, nothing temporary left; then the run succeeds
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    r = run(fresh, fsize=w.fsize)
    assert_named_error(r)
    assert not temporaries(fresh), f"{name}: {temporaries(fresh)} left after a full disk"
    r = run(fresh)
    assert r.returncode == 0, str(r)
    assert set(snapshot(fresh)) == expected, f"{name}: {sorted(snapshot(fresh))} after the rerun"

    # a full disk with --overwrite: the old artefact untouched
    old = snapshot(home)
    r = run(home, "--overwrite", fsize=w.fsize)
    assert_named_error(r)
    assert_kept(home, old, w, f"{name}, a full disk with --overwrite")

    # SIGKILL mid-write: the old artefact untouched; the rerun cleans up and succeeds
    r = run(home, "--overwrite", fault={"signal": int(signal.SIGKILL)})
    assert r.returncode == -9, str(r)
    assert {k: v for k, v in snapshot(home).items() if k in old} == old, f"{name}: old artefact changed by SIGKILL"
    r = run(home, "--overwrite")
    assert r.returncode == 0, str(r)
    assert set(snapshot(home)) == expected, f"{name}: {sorted(snapshot(home))} after the rerun"

    # SIGINT mid-write: one line, exit 130, the old artefact untouched, nothing left
    old = snapshot(home)
    r = run(home, "--overwrite", fault={"signal": int(signal.SIGINT)})
    assert r.returncode == 130 and "interrupted (SIGINT)" in r.stderr and "Traceback" not in r.stderr, str(r)
    assert_kept(home, old, w, f"{name}, SIGINT")
    r = run(home, "--overwrite")
    assert r.returncode == 0, str(r)
    assert set(snapshot(home)) == expected, f"{name}: {sorted(snapshot(home))} after the rerun"
