"""Reliability, round two (issue 17): bad values, artefacts that disagree, leaks, lost data,
tracebacks, the sharded dump, disk checks, a fuzz test and a concurrency test.

Most cases run in-process on a tiny synthetic datastore and a Flat index (milliseconds); the
few that need fairseq run through the fork server of tests/helpers.EvalLM.
"""

import errno
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest
import torch

from knnlm import KNNLM, FaissRetriever
from knnlm.artefacts import WriteLock, check_schema, read_json
from knnlm.errors import ConfigError, CorruptError, DiskSpaceError, IncompleteError, KNNLMError, MismatchError
from knnlm.index import load_index
from knnlm.index.builder import build_index as knnlm_build_index
from knnlm.offline import export as ex
from knnlm.store import npy, open_datastore
from knnlm.store import Datastore, DatastoreWriter
from knnlm.store.sharded import ShardedDatastore, write_manifest

from .conftest import REPO, run
from .helpers import EvalLM, knn_argv

N, D, V = 300, 8, 20


def make_store(prefix, n=N, dim=D, seed=0, **kw):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, dim)).astype(np.float32)
    vals = rng.integers(0, V, size=n)
    w = DatastoreWriter(str(prefix), dim, keytype="last_ffn_input", dict_size=V, dict_fingerprint="d0",
                        model_fingerprint="m0", **kw)
    w.add(keys, vals)
    w.finalize()
    return keys, vals


def build(prefix, index, **kw):
    return knnlm_build_index({"dstore_mmap": str(prefix), "faiss_index": str(index), "factory": "Flat",
                              "threads": 1, **kw})


def queries(n=40, dim=D, seed=5):
    rng = np.random.default_rng(seed)
    return (torch.from_numpy(rng.normal(size=(n, dim)).astype(np.float32)),
            torch.from_numpy(rng.integers(0, V, size=n)),
            torch.log_softmax(torch.from_numpy(rng.normal(size=(n, V)).astype(np.float32)), -1)[:, 0])


def score(prefix, index, sim_func="l2", k=8, **kw):
    """Perplexity of a fixed batch through knnlm's Python API (open, load, retrieve, interpolate)."""
    ds = open_datastore(str(prefix))
    knn = KNNLM(FaissRetriever(str(index), ds, k=k, nprobe=1, sim_func=sim_func, **kw), lmbda=0.5, temperature=2.0)
    q, t, lp = queries()
    return math.exp(-float(knn.score(q, t, lp).final.double().mean()))


def poke(path, row, value, dtype=np.float32, dim=D):
    """Write `value` into row `row` of a finished .npy keys file (bypassing the writer's checks)."""
    a = np.load(path, mmap_mode="r+")
    a[row] = value
    a.flush()
    del a


@pytest.fixture
def store(tmp_path):
    prefix = tmp_path / "ds"
    keys, vals = make_store(prefix)
    build(prefix, tmp_path / "flat.index")
    return {"prefix": str(prefix), "index": str(tmp_path / "flat.index"), "keys": keys, "vals": vals,
            "root": tmp_path}


# ============================================================================ (a) bad values
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_keys_are_refused_at_the_dump_naming_the_row(tmp_path, bad):
    w = DatastoreWriter(str(tmp_path / "ds"), 4, keytype="last_ffn_input", dict_size=10, dict_fingerprint="d")
    w.add(np.ones((5, 4)), np.arange(5))
    keys = np.ones((3, 4))
    keys[2, 1] = bad
    with pytest.raises(CorruptError, match="row 7 is not finite"):
        w.add(keys, np.arange(3))
    w.abandon()
    with pytest.raises(IncompleteError):
        Datastore.open(str(tmp_path / "ds"))


def test_float16_overflow_is_refused_at_the_dump(tmp_path):
    w = DatastoreWriter(str(tmp_path / "ds"), 4, keytype="last_ffn_input", fp16=True, dict_size=10, dict_fingerprint="d")
    with pytest.raises(CorruptError, match="row 1 is not finite.*--dstore-fp16"):
        w.add(np.array([[1, 2, 3, 4], [1e6, 0, 0, 0]], dtype=np.float32), np.arange(2))
    w.abandon()


def test_non_finite_keys_outside_the_training_sample_are_refused_at_the_index_build(tmp_path):
    prefix = tmp_path / "ds"
    make_store(prefix, n=2000)
    poke(f"{prefix}_keys.npy", 1777, np.nan)
    # IVF trained on 200 keys (row 1777 is very likely not among them), added in chunks of 500
    with pytest.raises(CorruptError, match="row 1,777 is not finite"):
        build(prefix, tmp_path / "ivf.index", factory="IVF{ncentroids},Flat", ncentroids=4,
              num_keys_to_train=200, num_keys_to_add_at_a_time=500)
    with pytest.raises(CorruptError, match="row 1,777 is not finite"):
        build(prefix, tmp_path / "flat.index")
    assert not os.path.exists(tmp_path / "flat.index")


def test_non_finite_queries_or_distances_stop_the_scoring(store):
    ds = Datastore.open(store["prefix"])
    knn = KNNLM(FaissRetriever(store["index"], ds, k=8, nprobe=1), lmbda=0.5)
    q, t, lp = queries()
    q[3, 2] = float("nan")
    with pytest.raises(CorruptError, match="query 3 of this batch is not finite"):
        knn.score(q, t, lp)
    # a NaN key in the datastore (the index was built from the clean one): the recomputed distance
    poke(f"{store['prefix']}_keys.npy", 0, np.nan)
    ds = Datastore.open(store["prefix"])
    flat = faiss.IndexFlatL2(D)
    flat.add(store["keys"])
    knn = KNNLM(FaissRetriever(flat, ds, k=N, nprobe=1), lmbda=0.5)  # k = N: row 0 is a neighbor of all
    q, t, lp = queries()
    with pytest.raises(CorruptError, match="neighbor distance is not finite"):
        knn.score(q, t, lp)


# ============================================================================ (b) artefacts that disagree
@pytest.mark.parametrize("sim", ["l2", "do_not_recomp_l2"])
def test_inner_product_index_with_an_l2_similarity_is_refused(store, sim):
    build(store["prefix"], store["root"] / "ip.index", metric="ip")
    assert read_json(str(store["root"] / "ip.index.meta.json"), "x")["metric"] == "ip"
    with pytest.raises(MismatchError, match=f"metric ip but --knn-sim-func {sim} needs an l2 index"):
        score(store["prefix"], store["root"] / "ip.index", sim_func=sim)
    ip = faiss.IndexFlatIP(D)  # an index object, no metadata: FAISS's own metric_type decides
    with pytest.raises(MismatchError, match="metric ip"):
        FaissRetriever(ip, Datastore.open(store["prefix"]), k=4, sim_func=sim)
    assert math.isfinite(score(store["prefix"], store["root"] / "ip.index", sim_func="dot"))


def test_index_metadata_metric_must_match_the_index_file(store):
    m = json.load(open(store["index"] + ".meta.json"))
    m["metric"] = "ip"
    json.dump(m, open(store["index"] + ".meta.json", "w"))
    with pytest.raises(CorruptError, match="metadata says metric ip but the FAISS index file has l2"):
        load_index(store["index"], datastore=Datastore.open(store["prefix"]))


def test_index_without_datastore_fingerprint_is_refused_unless_allowed(store):
    ref = score(store["prefix"], store["index"])
    m = json.load(open(store["index"] + ".meta.json"))
    del m["datastore_fingerprint"]
    json.dump(m, open(store["index"] + ".meta.json", "w"))
    with pytest.raises(MismatchError, match="no datastore_fingerprint.*--knn-allow-index-without-fingerprint"):
        score(store["prefix"], store["index"])
    assert score(store["prefix"], store["index"], allow_index_without_fingerprint=True) == ref


def test_legacy_raw_datastore_needs_no_index_fingerprint(tmp_path):
    prefix = str(tmp_path / "orig")
    keys = np.random.default_rng(0).normal(size=(50, 6)).astype(np.float32)
    np.memmap(prefix + "_keys.npy", dtype=np.float32, mode="w+", shape=(50, 6))[:] = keys
    np.memmap(prefix + "_vals.npy", dtype=np.int64, mode="w+", shape=(50, 1))[:, 0] = np.arange(50) % V
    flat = faiss.IndexFlatL2(6)
    flat.add(keys)
    faiss.write_index(flat, str(tmp_path / "knn.index"))
    json.dump({"complete": True}, open(tmp_path / "knn.index.meta.json", "w"))
    ds = Datastore.open(prefix, dstore_size=50, dim=6)
    assert load_index(str(tmp_path / "knn.index"), datastore=ds).ntotal == 50


def test_a_shard_listed_twice_is_refused(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_store(a, seed=1)
    make_store(b, seed=2)
    with pytest.raises(CorruptError, match="same dump"):
        write_manifest(str(tmp_path / "m_shards.json"), [str(a), str(a)])
    write_manifest(str(tmp_path / "m_shards.json"), [str(a), str(b)])
    m = json.load(open(tmp_path / "m_shards.json"))
    m["shards"][1] = m["shards"][0]  # hand-edited manifest
    json.dump(m, open(tmp_path / "m_shards.json", "w"))
    with pytest.raises(CorruptError, match="same dump"):
        open_datastore(str(tmp_path / "m_shards.json"))
    for suffix in ("_keys.npy", "_vals.npy", "_meta.json"):  # a copy of one dump under another name
        shutil.copyfile(f"{a}{suffix}", f"{tmp_path / 'c'}{suffix}")
    with pytest.raises(CorruptError, match="same dump"):
        ShardedDatastore([Datastore.open(str(a)), Datastore.open(str(tmp_path / "c"))])


@pytest.mark.parametrize("field,value,match", [
    ("complete", "false", "'complete' is 'false', expected true/false"),
    ("complete", 1, "'complete' is 1, expected true/false"),
    ("size", "300", "'size' is '300', expected an integer"),
    ("size", True, "'size' is True, expected an integer"),
    ("dim", -8, "'dim' is -8, expected a count"),
    ("dim", None, "'dim' is None"),
    ("size", KeyError, "lacks the field 'size'"),
    ("complete", KeyError, "lacks the field 'complete'"),
    ("keys_dtype", "float64", "key/value types"),
])
def test_datastore_metadata_is_validated_with_a_named_error(store, field, value, match):
    path = store["prefix"] + "_meta.json"
    m = json.load(open(path))
    if value is KeyError:
        del m[field]
    else:
        m[field] = value
    json.dump(m, open(path, "w"))
    with pytest.raises(CorruptError, match=match):
        Datastore.open(store["prefix"])


def test_index_and_export_metadata_are_validated(store, tmp_path):
    m = json.load(open(store["index"] + ".meta.json"))
    m["complete"] = "true"
    json.dump(m, open(store["index"] + ".meta.json", "w"))
    with pytest.raises(CorruptError, match="'complete' is 'true'"):
        load_index(store["index"])
    w = ex.ExportWriter(str(tmp_path / "e"), 0, sim_func="l2", temperature=1.0, lmbda=0.25)
    w.add(np.zeros(2) - 1, np.zeros(2) - 1, np.arange(2))
    w.finalize()
    m = json.load(open(tmp_path / "e" / "meta.json"))
    m["count"] = "2"
    json.dump(m, open(tmp_path / "e" / "meta.json", "w"))
    with pytest.raises(CorruptError, match="'count' is '2'"):
        ex.load_export(str(tmp_path / "e"))
    assert check_schema({"a": 1}, {"a": (float, True)}, "x") == {"a": 1}  # an int is a number


@pytest.mark.parametrize("damage", ["bytes in the middle", "truncated", "appended"])
def test_index_checksum_is_verified_at_load(store, damage):
    size = os.path.getsize(store["index"])
    with open(store["index"], "r+b") as f:
        if damage == "bytes in the middle":
            f.seek(size // 2)
            f.write(os.urandom(16))
        elif damage == "truncated":
            f.truncate(size - 100)
        else:
            f.seek(0, 2)
            f.write(b"\0" * 8)
    with pytest.raises(CorruptError, match="checksum mismatch" if damage == "bytes in the middle" else "bytes but"):
        score(store["prefix"], store["index"])


def test_old_index_without_checksum_still_loads(tmp_path):
    old = REPO / "tests" / "data" / "format_v1" / "dstore"
    for name in ("train_keys.npy", "train_vals.npy", "train_meta.json", "knn.index", "knn.index.meta.json"):
        shutil.copyfile(old / name, tmp_path / name)
    assert "checksum" not in json.load(open(tmp_path / "knn.index.meta.json"))
    ds = Datastore.open(str(tmp_path / "train"))
    assert load_index(str(tmp_path / "knn.index"), datastore=ds).ntotal == ds.size


def test_knnlm_check_finds_nan_keys_and_a_damaged_index(store, capsys):
    from fairseq_plugins.check import main

    poke(store["prefix"] + "_keys.npy", 11, np.nan)
    out = run(["knnlm-check", "--dstore-filename", store["prefix"], "--indexfile", store["index"]], check=False)
    assert out.returncode == 1 and "FAIL  keys finite" in out.stdout and "row 11" in out.stdout, out.stdout
    assert "PASS  index" in out.stdout and "checksum verified" in out.stdout, out.stdout
    with open(store["index"], "r+b") as f:
        f.seek(os.path.getsize(store["index"]) // 2)
        f.write(os.urandom(8))
    capsys.readouterr()
    assert main(["--dstore-filename", store["prefix"], "--indexfile", store["index"]]) == 1
    assert "FAIL  index" in capsys.readouterr().out
    assert main(["--dstore-filename", store["prefix"], "--batches", "0"]) == 1
    assert "FAIL  arguments" in capsys.readouterr().out


# ============================================================================ (c) the same split
def test_scoring_the_split_the_datastore_was_dumped_from_is_refused(tmp_path):
    data = tmp_path / "bin"
    data.mkdir()
    make_store(tmp_path / "ds", extra={"split": "valid", "data": str(data)})
    ds = Datastore.open(str(tmp_path / "ds"))
    with pytest.raises(MismatchError, match="'valid' split.*--knn-allow-same-split"):
        ds.check_split("valid", str(data))
    ds.check_split("valid", str(data), allow_same_split=True)
    ds.check_split("test", str(data))
    other = tmp_path / "other"
    other.mkdir()
    ds.check_split("valid", str(other))  # the same split name of another corpus


def test_relative_data_path_of_an_old_dump_resolves_from_another_directory(tmp_path, monkeypatch):
    from knnlm.store.datastore import resolve_data_path

    (tmp_path / "bin").mkdir()
    (tmp_path / "dstore").mkdir()
    monkeypatch.chdir(REPO)
    assert resolve_data_path("bin", str(tmp_path / "dstore" / "train")) == str(tmp_path / "bin")
    assert resolve_data_path(str(tmp_path / "bin"), "anything") == str(tmp_path / "bin")


# ============================================================================ (d) no lost data
def test_failed_overwrite_leaves_the_old_datastore_intact(tmp_path):
    prefix = str(tmp_path / "ds")
    keys, vals = make_store(prefix)
    before = {s: open(prefix + s, "rb").read() for s in ("_keys.npy", "_vals.npy", "_meta.json")}
    w = DatastoreWriter(prefix, D, keytype="decoder_output", dict_size=V, dict_fingerprint="d0", overwrite=True)
    w.add(np.zeros((10, D)), np.zeros(10, int))
    np.testing.assert_array_equal(Datastore.open(prefix).keys, keys)  # readable meanwhile
    w.abandon()  # the run failed
    assert {s: open(prefix + s, "rb").read() for s in before} == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    w = DatastoreWriter(prefix, D, keytype="decoder_output", dict_size=V, dict_fingerprint="d0", overwrite=True)
    w.add(np.ones((10, D)), np.zeros(10, int))
    w.finalize()
    new = Datastore.open(prefix)
    assert new.size == 10 and new.meta["keytype"] == "decoder_output"


def test_a_second_writer_on_one_prefix_is_refused_in_process(tmp_path):
    prefix = str(tmp_path / "ds")
    w = DatastoreWriter(prefix, D, keytype="k", dict_size=V, dict_fingerprint="d0")
    with pytest.raises(KNNLMError, match=f"datastore {prefix} is being written by another process"):
        DatastoreWriter(prefix, D, keytype="k", dict_size=V, dict_fingerprint="d0", overwrite=True)
    w.add(np.ones((4, D)), np.arange(4))
    w.finalize()
    assert Datastore.open(prefix).size == 4 and not os.path.exists(prefix + ".lock")
    with WriteLock(str(tmp_path / "e"), "export e"):
        with pytest.raises(KNNLMError, match="being written by another process"):
            ex.ExportWriter(str(tmp_path / "e"), 0, sim_func="l2", temperature=1.0, lmbda=0.5)


CONCURRENT_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from knnlm.errors import KNNLMError
    from knnlm.store.writer import DatastoreWriter
    prefix, go, value = sys.argv[1], sys.argv[2], float(sys.argv[3])
    while not __import__("os").path.exists(go):
        time.sleep(0.005)
    try:
        w = DatastoreWriter(prefix, 8, keytype="k", dict_size=20, dict_fingerprint="d", overwrite=True)
    except KNNLMError as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    for _ in range(50):
        w.add(np.full((100, 8), value, np.float32), np.zeros(100, int))
        time.sleep(0.005)
    w.finalize()
""")


def test_two_dumps_to_one_prefix_at_once_one_is_refused_and_the_other_is_intact(tmp_path):
    prefix, go = str(tmp_path / "ds"), str(tmp_path / "go")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, prefix, go, str(v)], env=env,
                              stderr=subprocess.PIPE, text=True) for v in (1.0, 2.0)]
    open(go, "w").close()
    rcs = [p.wait(60) for p in procs]
    errs = [p.stderr.read() for p in procs]
    assert sorted(rcs) == [0, 2], (rcs, errs)
    assert "is being written by another process" in errs[rcs.index(2)]
    ds = Datastore.open(prefix)
    winner = (1.0, 2.0)[rcs.index(0)]
    assert ds.size == 5000 and (np.asarray(ds.keys) == winner).all()  # no zero rows, no mixture


def test_writing_through_a_symlink_is_refused_unless_overwrite(tmp_path):
    target = str(tmp_path / "target")
    keys, _ = make_store(target)
    prefix = str(tmp_path / "link")
    for s in ("_keys.npy", "_vals.npy"):
        os.symlink(target + s, prefix + s)
    with pytest.raises(KNNLMError, match="symbolic link.*--overwrite"):
        make_store(prefix, seed=3)
    make_store(prefix, seed=3, overwrite=True)
    assert not os.path.islink(prefix + "_keys.npy")  # the link was replaced, never written through
    np.testing.assert_array_equal(Datastore.open(target).keys, keys)
    assert Datastore.open(target).meta["keytype"] == "last_ffn_input"


def test_an_original_format_raw_datastore_counts_as_existing_data(tmp_path):
    prefix = str(tmp_path / "orig")
    raw = np.arange(40, dtype=np.float32).reshape(10, 4)
    raw.tofile(prefix + "_keys.npy")
    np.arange(10, dtype=np.int64).tofile(prefix + "_vals.npy")
    with pytest.raises(KNNLMError, match="original code's raw format.*--overwrite"):
        make_store(prefix, dim=4)
    assert np.array_equal(np.fromfile(prefix + "_keys.npy", dtype=np.float32).reshape(10, 4), raw)
    make_store(prefix, dim=4, overwrite=True)
    assert Datastore.open(prefix).size == N


def test_export_directory_with_other_files_is_refused_and_never_emptied(tmp_path):
    path = tmp_path / "exp"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(KNNLMError, match="files that are not this export's \\(notes.txt\\)"):
        ex.ExportWriter(str(path), 0, sim_func="l2", temperature=1.0, lmbda=0.5)
    w = ex.ExportWriter(str(path), 0, sim_func="l2", temperature=1.0, lmbda=0.5, overwrite=True)
    w.add(-np.ones(3), -np.ones(3), np.arange(3))
    w.finalize()
    assert (path / "notes.txt").read_text() == "mine" and ex.load_export(str(path)).count == 3
    other = tmp_path / "other"  # another export's arrays without its metadata
    other.mkdir()
    np.save(other / "lp_lm.npy", np.zeros(3, np.float32))
    with pytest.raises(KNNLMError, match="already holds lp_lm.npy"):
        ex.ExportWriter(str(other), 0, sim_func="l2", temperature=1.0, lmbda=0.5)
    assert (other / "lp_lm.npy").exists()


def test_failed_overwrite_leaves_the_old_export_intact(tmp_path):
    path = str(tmp_path / "exp")
    w = ex.ExportWriter(path, 2, sim_func="l2", temperature=1.0, lmbda=0.5)
    w.add(-np.ones(4), -np.ones(4), np.arange(4), dists=np.ones((4, 2)), match=np.ones((4, 2), bool))
    w.finalize()
    before = {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}
    w = ex.ExportWriter(path, 0, sim_func="l2", temperature=1.0, lmbda=0.5, overwrite=True)
    w.add(-np.ones(2), -np.ones(2), np.arange(2))
    assert ex.load_export(path).count == 4  # the old one is still whole
    w.abandon()
    assert {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)} == before
    w = ex.ExportWriter(path, 0, sim_func="l2", temperature=1.0, lmbda=0.5, overwrite=True)
    w.add(-np.ones(2), -np.ones(2), np.arange(2))
    w.finalize()
    e = ex.load_export(path)
    assert e.count == 2 and e.dists is None and not os.path.exists(os.path.join(path, "dists.npy"))


# ============================================================================ (e) errors, not tracebacks
def test_unwritable_prefix_is_a_named_error(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("")
    with pytest.raises(KNNLMError, match="cannot write datastore .*choose a writable --dstore-mmap"):
        make_store(tmp_path / "afile" / "ds")
    real_open = os.open

    def denied(path, *a, **k):
        if str(path).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(KNNLMError, match="Permission denied"):
        make_store(tmp_path / "ro" / "ds")


def test_no_load_keys_needs_no_keys_file(store):
    ref = score(store["prefix"], store["index"], sim_func="do_not_recomp_l2")
    os.remove(store["prefix"] + "_keys.npy")
    ds = Datastore.open(store["prefix"], load_keys=False)
    assert ds.keys is None and ds.dim == D
    knn = KNNLM(FaissRetriever(store["index"], ds, k=8, nprobe=1, sim_func="do_not_recomp_l2"), lmbda=0.5,
                temperature=2.0)
    q, t, lp = queries()
    assert math.exp(-float(knn.score(q, t, lp).final.double().mean())) == ref
    with pytest.raises(ConfigError, match="--no-load-keys"):
        ds.gather_keys([0])


# ============================================================================ (g) disk checks
def test_growth_is_geometric_and_bounded_by_free_space(tmp_path, monkeypatch):
    """A 4.5 MB datastore on a disk with 20 MB free (the old 64 MiB steps refused it)."""
    disk = {"free": 20_000_000}
    allocated = {}
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        grown = length - allocated.get(fd, 0)
        if grown > disk["free"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        disk["free"] -= max(grown, 0)
        allocated[fd] = max(length, allocated.get(fd, 0))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(npy, "free_bytes", lambda path: disk["free"])
    prefix = str(tmp_path / "ds")
    w = DatastoreWriter(prefix, 1024, keytype="k", dict_size=V, dict_fingerprint="d0")
    for _ in range(11):  # 1,100 rows of 1,024 float32: 4.5 MB
        w.add(np.ones((100, 1024), np.float32), np.zeros(100, int))
    w.finalize()
    assert Datastore.open(prefix).size == 1100
    disk["free"] = 1_000_000  # now rows that really do not fit are refused
    allocated.clear()  # file descriptors are reused
    w = DatastoreWriter(str(tmp_path / "big"), 1024, keytype="k", dict_size=V, dict_fingerprint="d0")
    w.add(np.ones((200, 1024), np.float32), np.zeros(200, int))  # 0.8 MB: fits
    with pytest.raises(DiskSpaceError, match="No space left"):
        w.add(np.ones((100, 1024), np.float32), np.zeros(100, int))
    w.abandon()


# ============================================================================ fairseq: (c), (e), (f)
@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    e = EvalLM(tmp_path_factory.mktemp("evallm_reliability"))
    yield e
    e.close()


TPS = ("--tokens-per-sample", "64")


@pytest.fixture(scope="module")
def dumps(tiny, ev, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability_dumps")
    runs = {
        "valid": ("--gen-subset", "valid"),
        "shard0": ("--num-shards", "2", "--shard-id", "0", "--context-window", "32", "--max-tokens", "128"),
        "shard1": ("--num-shards", "2", "--shard-id", "1", "--context-window", "32", "--max-tokens", "128"),
        "empty shard": ("--num-shards", "2", "--shard-id", "1"),  # the test split is one batch
        "unwritable": (),
    }
    (root / "afile").write_text("")
    prefixes = {n: str(root / n.replace(" ", "_")) for n in runs}
    prefixes["unwritable"] = str(root / "afile" / "ds")
    res = ev.run_many([{"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, *flags, "--save-knnlm-dstore",
                                         "--dstore-mmap", prefixes[n])} for n, flags in runs.items()])
    out = {n: {"prefix": prefixes[n], "result": r} for n, r in zip(runs, res)}
    for n in ("valid", "shard0", "shard1"):
        assert out[n]["result"].returncode == 0, str(out[n]["result"])
    build(out["valid"]["prefix"], out["valid"]["prefix"] + ".flat")
    return out


def test_dump_errors_exit_1_with_the_message_not_134(dumps):
    r = dumps["unwritable"]["result"]
    assert r.returncode == 1 and "KNNLMError: cannot write datastore" in r.stderr, str(r)
    assert "Traceback" not in r.stderr and "terminate called" not in r.stderr, str(r)


def test_a_shard_with_no_batch_is_a_named_error(dumps):
    r = dumps["empty shard"]["result"]
    assert r.returncode == 1 and "shard 1 of 2" in r.stderr and "received no batch" in r.stderr, str(r)


def test_sharded_dump_with_context_window_runs_end_to_end_into_a_merged_index(tiny, ev, dumps, tmp_path):
    """The README's recipe: --num-shards 2 --shard-id i (fairseq's empty padding batches used to die
    with KeyError: 'net_input'), then one index over both shards, then scoring with the manifest."""
    from .helpers import load_split

    s0, s1 = (Datastore.open(dumps[n]["prefix"]) for n in ("shard0", "shard1"))
    assert s0.size > 0 and s1.size > 0
    assert s0.size + s1.size == sum(len(x) for x in load_split(tiny["data"], "test")[0])
    manifest = str(tmp_path / "all")
    index = str(tmp_path / "knn.index")
    run(["knnlm-build-index", f"dstore_mmap={manifest}", f"shards=[{s0.prefix},{s1.prefix}]",
         f"faiss_index={index}", "ncentroids=2", "code_size=4", "threads=1"])
    ds = open_datastore(manifest + "_shards.json")
    assert ds.size == s0.size + s1.size
    assert load_index(index, datastore=ds).ntotal == ds.size
    r = ev.run(knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--gen-subset", "valid", "--knnlm", "--dstore-filename",
                        manifest + "_shards.json", "--indexfile", index, "--k", "8", "--probe", "2"))
    assert "kNN-LM perplexity" in r.output


def test_same_split_is_refused_by_name_unless_meant(tiny, ev, dumps):
    knn = ("--knnlm", "--dstore-filename", dumps["valid"]["prefix"], "--indexfile",
           dumps["valid"]["prefix"] + ".flat", "--k", "8")
    assert Datastore.open(dumps["valid"]["prefix"]).meta["data"] == os.path.abspath(tiny["data"])
    refused, meant, lam1 = ev.run_many([
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--gen-subset", "valid", *knn)},
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--gen-subset", "valid", *knn, "--knn-allow-same-split")},
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, *knn, "--lmbda", "1", "--k", "1")},
    ])
    assert refused.returncode == 1 and "MismatchError" in refused.stderr and "--knn-allow-same-split" in refused.stderr
    assert "'valid' split" in refused.stderr and "Traceback" not in refused.stderr, str(refused)
    assert meant.returncode == 0 and "kNN-LM perplexity" in meant.output, str(meant)
    # (e) lambda = 1: fairseq's malformed 'skipping tokens with inf scores' log records are fixed, not tracebacks
    assert lam1.returncode == 0, str(lam1)
    assert "TypeError" not in lam1.stderr and "Logging error" not in lam1.stderr, lam1.stderr[-3000:]
    assert lam1.output.count("skipping tokens with inf scores") == 1


def test_no_load_keys_through_eval_lm_without_a_keys_file(tiny, ev, dumps, tmp_path):
    src = dumps["valid"]["prefix"]
    prefix = str(tmp_path / "nokeys")
    for s in ("_vals.npy", "_meta.json"):
        shutil.copyfile(src + s, prefix + s)
    shutil.copyfile(src + ".flat", prefix + ".flat")
    shutil.copyfile(src + ".flat.meta.json", prefix + ".flat.meta.json")
    args = ("--knn-sim-func", "do_not_recomp_l2", "--k", "8")
    with_keys, without = ev.run_many([
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--knnlm", "--dstore-filename", src, "--indexfile",
                          src + ".flat", *args)},
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--knnlm", "--dstore-filename", prefix, "--indexfile",
                          prefix + ".flat", "--no-load-keys", *args)},
    ])
    assert without.returncode == 0, str(without)
    from .conftest import knn_summary

    assert knn_summary(without.output) == knn_summary(with_keys.output)


def test_raw_datastore_message_flags_exist_on_fairseq_eval_lm(tiny, ev, dumps, tmp_path):
    """The raw-format message says --dstore-size N --dimension D: fairseq-eval-lm takes both."""
    from .conftest import knn_summary

    src = Datastore.open(dumps["valid"]["prefix"])
    raw = str(tmp_path / "raw")
    np.asarray(src.keys, np.float32).tofile(raw + "_keys.npy")  # the original code's headerless files
    np.asarray(src.vals, np.int64).tofile(raw + "_vals.npy")
    index = dumps["valid"]["prefix"] + ".flat"
    args = ("--knnlm", "--indexfile", index, "--k", "8")
    npy_run, bare, sized = ev.run_many([
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--dstore-filename", src.prefix, *args)},
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--dstore-filename", raw, *args)},
        {"argv": knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--dstore-filename", raw, *args,
                          "--dstore-size", str(src.size), "--dimension", str(src.dim))},
    ])
    assert bare.returncode == 1 and "--dstore-size N --dimension D" in bare.stderr, str(bare)
    assert sized.returncode == 0, str(sized)
    assert knn_summary(sized.output) == knn_summary(npy_run.output)


def test_failed_overwrite_of_an_on_disk_index_leaves_the_old_one_intact(tmp_path, monkeypatch):
    """A merged (on-disk) index: the new .ivfdata is merged under a temporary name, and the old
    index and inverted lists stay usable if the rebuild fails."""
    import faiss.contrib.ondisk

    prefix = tmp_path / "ds"
    make_store(prefix, n=2000)
    cfg = dict(factory="IVF{ncentroids},Flat", ncentroids=4, ondisk_merge=True)
    build(prefix, tmp_path / "od.index", **cfg)
    ref = score(prefix, tmp_path / "od.index")
    assert os.path.exists(tmp_path / "od.index.ivfdata")

    def failing(index, shards, ivfdata):
        open(ivfdata, "wb").write(b"partial")
        raise RuntimeError("simulated failure in the merge")

    monkeypatch.setattr(faiss.contrib.ondisk, "merge_ondisk", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        build(prefix, tmp_path / "od.index", overwrite=True, seed=7, **cfg)
    monkeypatch.undo()
    assert score(prefix, tmp_path / "od.index") == ref
    assert not list(tmp_path.glob("od.index.ivfdata.tmp*"))
    build(prefix, tmp_path / "od.index", overwrite=True, seed=7, **cfg)
    assert math.isfinite(score(prefix, tmp_path / "od.index"))
    assert read_json(str(tmp_path / "od.index.meta.json"), "x")["ivfdata"] == "od.index.ivfdata"


def test_index_without_fingerprint_through_fairseq_eval_lm(tmp_path):
    """fairseq-eval-lm refuses an index whose metadata lost the datastore's fingerprint, and the
    flag the message names really lets it score (the old fixture's numbers, unchanged)."""
    import json
    import shutil
    from pathlib import Path

    from tests.conftest import eval_lm, knn_summary

    old = Path(__file__).resolve().parent / "data" / "format_v1"
    for name in ("bin", "lm", "dstore"):
        shutil.copytree(old / name, tmp_path / name)
    meta_file = tmp_path / "dstore" / "knn.index.meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["datastore_fingerprint"]
    meta_file.write_text(json.dumps(meta))
    args = [str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), "--tokens-per-sample", "64",
            "--context-window", "32", "--gen-subset", "test", "--knnlm", "--dstore-filename",
            str(tmp_path / "dstore" / "train"), "--indexfile", str(tmp_path / "dstore" / "knn.index"),
            "--k", "16", "--probe", "4", "--lmbda", "0.25", "--knn-temp", "2.0"]
    refused = eval_lm(*args, check=False)
    assert refused.returncode != 0 and "--knn-allow-index-without-fingerprint" in refused.stderr
    ok = eval_lm(*args, "--knn-allow-index-without-fingerprint")
    assert knn_summary(ok.stderr) == (30.4705, 31.2950)
