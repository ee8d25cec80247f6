"""The datastore on disk: valid .npy files, completeness, and every way it can be wrong."""

import errno
import json
import os

import numpy as np
import pytest

from knnlm.store import Datastore, DatastoreWriter
from knnlm.errors import CorruptError, DiskSpaceError, IncompleteError, KNNLMError, MismatchError
from knnlm.store import npy


def write(prefix, n=100, dim=8, fp16=False, dict_size=50, **kw):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(n, dim)).astype(np.float32)
    vals = rng.integers(0, dict_size, size=n)
    w = DatastoreWriter(prefix, dim, keytype="last_ffn_input", fp16=fp16, dict_size=dict_size,
                        dict_fingerprint="dict0", model_fingerprint="model0", **kw)
    for s in range(0, n, 7):  # many small appends, as eval_lm batches arrive
        w.add(keys[s:s + 7], vals[s:s + 7])
    w.finalize()
    return keys, vals


def test_round_trip_real_npy_files(tmp_path):
    prefix = str(tmp_path / "ds")
    keys, vals = write(prefix)
    k = np.load(prefix + "_keys.npy", mmap_mode="r")
    v = np.load(prefix + "_vals.npy", mmap_mode="r")
    assert k.dtype == np.float32 and v.dtype == np.int32
    np.testing.assert_array_equal(k, keys)
    np.testing.assert_array_equal(v, vals)
    meta = json.load(open(prefix + "_meta.json"))
    assert meta["complete"] and meta["size"] == 100 and meta["dim"] == 8
    assert {"torch", "numpy"} <= set(meta["versions"])  # what made it is recorded
    ds = Datastore.open(prefix)
    assert isinstance(ds.keys, np.memmap) or isinstance(ds.keys.base, np.memmap)  # not in RAM
    np.testing.assert_array_equal(ds.gather_keys([5, 1, 5, 99]), keys[[5, 1, 5, 99]])
    np.testing.assert_array_equal(ds.gather_vals(np.array([[3, 2]])), vals[[[3, 2]]])


def test_fp16_keys(tmp_path):
    prefix = str(tmp_path / "ds")
    keys, _ = write(prefix, fp16=True)
    ds = Datastore.open(prefix)
    assert ds.keys.dtype == np.float16
    np.testing.assert_allclose(ds.keys, keys, rtol=1e-3, atol=1e-3)


def test_growing_file_past_one_step(tmp_path, monkeypatch):
    monkeypatch.setattr(npy, "_GROW_BYTES", 256)  # force many re-growths
    prefix = str(tmp_path / "ds")
    keys, vals = write(prefix, n=1000)
    np.testing.assert_array_equal(Datastore.open(prefix).keys, keys)
    assert os.path.getsize(prefix + "_keys.npy") == npy.HEADER_BYTES + 1000 * 8 * 4  # trimmed


def test_unfinished_dump_is_incomplete_and_reads_as_empty(tmp_path):
    prefix = str(tmp_path / "ds")
    w = DatastoreWriter(prefix, 4, keytype="last_ffn_input", dict_size=10, dict_fingerprint="d")
    w.add(np.zeros((3, 4)), np.arange(3))
    # killed here: no finalize
    with pytest.raises(IncompleteError, match="did not finish"):
        Datastore.open(prefix)
    assert np.load(prefix + "_keys.npy", mmap_mode="r").shape == (0, 4)  # never passes as whole
    w.abandon()
    # Running again starts over cleanly, without deleting anything by hand.
    write(prefix, dim=4)
    assert Datastore.open(prefix).size == 100


def test_complete_datastore_not_overwritten_unless_asked(tmp_path):
    prefix = str(tmp_path / "ds")
    keys, _ = write(prefix)
    with pytest.raises(KNNLMError, match="--overwrite"):
        write(prefix, n=10)
    np.testing.assert_array_equal(Datastore.open(prefix).keys, keys)
    write(prefix, n=10, overwrite=True)
    assert Datastore.open(prefix).size == 10


def test_wrong_expected_size_leaves_it_incomplete(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(MismatchError, match="--dstore-size"):
        write(prefix, expected_size=99)
    with pytest.raises(IncompleteError):
        Datastore.open(prefix)


@pytest.mark.parametrize("damage", ["truncate_keys", "missing_vals", "missing_meta", "garbled_meta"])
def test_damaged_files_are_named(tmp_path, damage):
    prefix = str(tmp_path / "ds")
    write(prefix)
    if damage == "truncate_keys":
        with open(prefix + "_keys.npy", "r+b") as f:
            f.truncate(npy.HEADER_BYTES + 50 * 8 * 4)
        match = "truncated"
    elif damage == "missing_vals":
        os.remove(prefix + "_vals.npy")
        match = "values file .* is missing"
    elif damage == "missing_meta":
        os.remove(prefix + "_meta.json")
        match = "metadata file .* is missing"
    else:
        open(prefix + "_meta.json", "w").write("{not json")
        match = "unreadable"
    with pytest.raises(CorruptError, match=match):
        Datastore.open(prefix)


def test_values_outside_dictionary(tmp_path):
    prefix = str(tmp_path / "ds")
    w = DatastoreWriter(prefix, 4, keytype="last_ffn_input", dict_size=10, dict_fingerprint="d")
    with pytest.raises(CorruptError, match="outside the dictionary"):
        w.add(np.zeros((2, 4)), np.array([3, 10]))
    w.abandon()
    write(prefix, dim=4, dict_size=50)
    vals = np.load(prefix + "_vals.npy", mmap_mode="r+")
    vals[42] = 77
    vals.flush()
    del vals
    with pytest.raises(CorruptError, match="row 42"):
        Datastore.open(prefix).check_values(50)


def test_original_raw_format_needs_sizes(tmp_path):
    prefix = str(tmp_path / "orig")
    keys = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float16)
    np.memmap(prefix + "_keys.npy", dtype=np.float16, mode="w+", shape=(20, 6))[:] = keys
    np.memmap(prefix + "_vals.npy", dtype=np.int16, mode="w+", shape=(20, 1))[:, 0] = np.arange(20)
    with pytest.raises(KNNLMError, match="original code's raw format.*--dstore-size"):
        Datastore.open(prefix)
    with pytest.raises(CorruptError, match="truncated, or wrong size"):
        Datastore.open(prefix, dstore_size=40, dim=6, fp16=True)
    ds = Datastore.open(prefix, dstore_size=20, dim=6, fp16=True)
    np.testing.assert_array_equal(ds.keys, keys)
    np.testing.assert_array_equal(ds.vals, np.arange(20))


def test_compatibility_checks_name_the_problem(tmp_path):
    prefix = str(tmp_path / "ds")
    write(prefix)
    ds = Datastore.open(prefix)
    ok = dict(dim=8, keytype="last_ffn_input", dict_size=50, dict_fingerprint="dict0", model_fingerprint="model0")
    ds.check_compatible(**ok)
    with pytest.raises(MismatchError, match="dimension 8 .* dimension 16"):
        ds.check_compatible(**{**ok, "dim": 16})
    with pytest.raises(MismatchError, match="'last_ffn_input' keys but 'decoder_output'"):
        ds.check_compatible(**{**ok, "keytype": "decoder_output"})
    with pytest.raises(MismatchError, match="another dictionary"):
        ds.check_compatible(**{**ok, "dict_fingerprint": "other"})
    with pytest.raises(MismatchError, match="different model weights.*--knn-allow-model-mismatch"):
        ds.check_compatible(**{**ok, "model_fingerprint": "other"})
    ds.check_compatible(**{**ok, "model_fingerprint": "other"}, allow_model_mismatch=True)


def test_disk_space_checked_up_front_and_on_write_failure(tmp_path, monkeypatch):
    prefix = str(tmp_path / "ds")
    monkeypatch.setattr(npy, "free_bytes", lambda path: 1000)
    with pytest.raises(DiskSpaceError, match="need .* GiB but only"):
        DatastoreWriter(prefix, 1024, keytype="last_ffn_input", dict_size=10, dict_fingerprint="d",
                        expected_size=10**6)
    monkeypatch.undo()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    w = DatastoreWriter(prefix, 4, keytype="last_ffn_input", dict_size=10, dict_fingerprint="d", overwrite=True)
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskSpaceError, match="No space left.*nothing complete was replaced"):
        w.add(np.zeros((10**6, 4)), np.zeros(10**6, dtype=int))
    monkeypatch.undo()
    w.abandon()
    with pytest.raises(IncompleteError):
        Datastore.open(prefix)
