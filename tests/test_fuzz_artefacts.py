"""Fuzzing every artefact kind (issue 17, h): each corrupted run ends in a named KNNLMError or in
the very number the pristine artefacts give, never in a traceback and never in another number.

In-process (open + score through knnlm's Python API; tune for the export) on a tiny synthetic
datastore, a Flat index built by knnlm-build-index (so it carries a checksum), two shards and
their manifest, and an export; two subprocess cases check the exit status and that no
traceback is printed. Bounded: about 200 examples, well under a minute.

What is not claimed: bytes changed inside the rows of a datastore's or an export's arrays (not
their headers) read as other keys or values: they carry no checksum (hashing a 100 GB
datastore at every open is not affordable); knnlm-check's key recompute finds them.
"""

import json
import math
import os
import shutil
import tempfile

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knnlm import KNNLM, FaissRetriever
from knnlm.artefacts import write_json_atomic
from knnlm.errors import KNNLMError
from knnlm.offline import export as ex
from knnlm.offline.tune import tune
from knnlm.store import open_datastore
from knnlm.store.sharded import write_manifest

from .conftest import run
from .test_reliability import build, make_store, queries

MISTYPED = ["false", "true", None, -1, 1.5, [], {}, "x", 10**12, True, 0, "300"]
LAMBDAS, TEMPERATURES = [0.0, 0.5, 1.0], [1.0, 2.0]


def _score(root, datastore, index):
    ds = open_datastore(os.path.join(root, datastore))
    knn = KNNLM(FaissRetriever(os.path.join(root, index), ds, k=8, nprobe=1), lmbda=0.5, temperature=2.0)
    q, t, lp = queries()
    return math.exp(-float(knn.score(q, t, lp).final.double().mean()))


def _tune(root):
    r = tune(ex.load_export(os.path.join(root, "exp")), LAMBDAS, TEMPERATURES)
    return (np.asarray(r["ppl"]).tobytes(), r["base_ppl"], r["best_ppl"])


PIPELINES = {
    "datastore": lambda root: _score(root, "ds", "flat.index"),
    "manifest": lambda root: _score(root, "all_shards.json", "shards.index"),
    "export": _tune,
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fuzz"))
    make_store(os.path.join(root, "ds"))
    build(os.path.join(root, "ds"), os.path.join(root, "flat.index"))
    make_store(os.path.join(root, "s0"), n=120, seed=1)
    make_store(os.path.join(root, "s1"), n=150, seed=2)
    sharded = write_manifest(os.path.join(root, "all_shards.json"), [os.path.join(root, "s0"), os.path.join(root, "s1")])
    flat = faiss.IndexFlatL2(sharded.dim)
    flat.add(np.concatenate([np.asarray(s.keys) for s in sharded.shards]))
    faiss.write_index(flat, os.path.join(root, "shards.index"))
    write_json_atomic(os.path.join(root, "shards.index.meta.json"),
                      {"complete": True, "datastore_fingerprint": sharded.fingerprint, "metric": "l2"})
    # an export of a real scoring run
    ds = open_datastore(os.path.join(root, "ds"))
    knn = KNNLM(FaissRetriever(os.path.join(root, "flat.index"), ds, k=8, nprobe=1), lmbda=0.5, temperature=2.0)
    q, t, lp = queries()
    scored = knn.score(q, t, lp, nearest_first=True)
    w = ex.ExportWriter(os.path.join(root, "exp"), 8, sim_func="l2", temperature=2.0, lmbda=0.5)
    n = scored.neighbors
    w.add(lp, scored.lp_knn, t, dists=n.distances, ids=n.ids, vals=n.values, valid=n.valid)
    w.finalize()
    reference = {name: f(root) for name, f in PIPELINES.items()}
    return root, reference


# (pipeline, file, kind): "json" files get field edits, binary ones truncation and random bytes
# (anywhere for the index, which has a checksum; in the .npy header for the arrays).
TARGETS = [
    ("datastore", "ds_meta.json", "json"), ("datastore", "ds_keys.npy", "npy"), ("datastore", "ds_vals.npy", "npy"),
    ("datastore", "flat.index", "index"), ("datastore", "flat.index.meta.json", "json"),
    ("manifest", "all_shards.json", "json"), ("manifest", "s1_meta.json", "json"), ("manifest", "s0_keys.npy", "npy"),
    ("manifest", "shards.index.meta.json", "json"),
    ("export", "exp/meta.json", "json"), ("export", "exp/dists.npy", "npy"), ("export", "exp/lp_knn.npy", "npy"),
    ("export", "exp/match.npy", "npy"),
]


def _fields(obj, prefix=()):
    """Paths to every field of a JSON object, nested shard entries included."""
    out = []
    for k, v in obj.items():
        out.append(prefix + (k,))
        if isinstance(v, dict):
            out += _fields(v, prefix + (k,))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                out.append(prefix + (k, i))
                if isinstance(x, dict):
                    out += _fields(x, prefix + (k, i))
    return out


def _apply(path, kind, data):
    size = os.path.getsize(path)
    ops = ["truncate", "bytes"] + (["delete", "set", "duplicate"] if kind == "json" else [])
    op = data.draw(st.sampled_from(ops), label="op")
    if op == "truncate":
        with open(path, "r+b") as f:
            f.truncate(data.draw(st.integers(0, size - 1), label="truncate at"))
        return
    if op == "bytes":
        limit = size if kind in ("index", "json") else min(size, 128)
        offset = data.draw(st.integers(0, limit - 1), label="offset")
        junk = data.draw(st.binary(min_size=1, max_size=16), label="bytes")
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(junk[:max(1, limit - offset)])
        return
    obj = json.load(open(path))
    fields = _fields(obj)
    where = data.draw(st.sampled_from(fields), label="field")
    parent = obj
    for key in where[:-1]:
        parent = parent[key]
    if op == "delete":
        del parent[where[-1]]
    elif op == "set":
        parent[where[-1]] = data.draw(st.sampled_from(MISTYPED), label="value")
    else:  # duplicate: a list's first element twice (a shard listed twice, a file named twice)
        lists = [f for f in fields if isinstance(_get(obj, f), list) and _get(obj, f)]
        if not lists:
            return
        lst = _get(obj, data.draw(st.sampled_from(lists), label="list"))
        lst.append(lst[0])
    json.dump(obj, open(path, "w"))


def _get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_artefacts_give_a_named_error_or_the_same_number(pristine, data):
    src, reference = pristine
    pipeline, name, kind = data.draw(st.sampled_from(TARGETS), label="target")
    root = tempfile.mkdtemp(prefix="fuzz-")
    try:
        for entry in os.listdir(src):
            (shutil.copytree if os.path.isdir(os.path.join(src, entry)) else shutil.copyfile)(
                os.path.join(src, entry), os.path.join(root, entry))
        _apply(os.path.join(root, name), kind, data)
        try:
            got = PIPELINES[pipeline](root)
        except KNNLMError as e:
            assert str(e), "a named error says what is wrong"
            return
        assert got == reference[pipeline], f"{name} corrupted: a different result, not an error"
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_corrupted_artefacts_from_the_command_line_exit_non_zero_without_a_traceback(pristine, tmp_path):
    src, _ = pristine
    shutil.copytree(os.path.join(src, "exp"), tmp_path / "exp")
    m = json.load(open(tmp_path / "exp" / "meta.json"))
    m["count"] = "40"
    json.dump(m, open(tmp_path / "exp" / "meta.json", "w"))
    p = run(["knnlm-tune", tmp_path / "exp"], check=False)
    assert p.returncode == 2 and "'count' is '40'" in p.stderr and "Traceback" not in p.stderr, p.stderr
    for suffix in ("_keys.npy", "_vals.npy", "_meta.json"):
        shutil.copyfile(os.path.join(src, "ds" + suffix), tmp_path / f"ds{suffix}")
    m = json.load(open(tmp_path / "ds_meta.json"))
    m["complete"] = "false"
    json.dump(m, open(tmp_path / "ds_meta.json", "w"))
    p = run(["knnlm-check", "--dstore-filename", tmp_path / "ds"], check=False)
    assert p.returncode == 1 and "FAIL  datastore" in p.stdout and "'complete' is 'false'" in p.stdout, p.stdout
    assert "Traceback" not in p.stderr, p.stderr
