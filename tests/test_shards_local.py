"""Index parts without Ray (issue 25): `merge=none` built locally and searched shard by shard in
threads (--knn-executor local) finds what one merged index finds; the index manifest and
knnlm-shard-dump refuse bad input by name; knnlm-hf's shard windows partition the windows.
The Ray executor's tests are tests/test_ray.py."""

import json
import sys

import numpy as np
import pytest
import torch

from knnlm import FaissRetriever, KNNLMError, open_datastore
from knnlm.errors import ConfigError, CorruptError, MismatchError
from knnlm.index.builder import build_index
from knnlm.index.shard_manifest import manifest_path
from knnlm.retrieval.sharded_search import ShardedRetriever, is_sharded_index
from knnlm.shard_dump import dump_shards
from knnlm.store.writer import DatastoreWriter

D, V = 16, 50
SIZES = (700, 500, 900)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    prefixes = []
    for i, n in enumerate(SIZES):
        p = str(root / f"shard{i}")
        w = DatastoreWriter(p, D, keytype="x", dict_size=V, dict_fingerprint="f", model_fingerprint="m")
        w.add(rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, V, size=n))
        w.finalize()
        prefixes.append(p)
    common = {"dstore_mmap": str(root / "all"), "shards": prefixes, "ncentroids": 8, "code_size": 4, "threads": 1}
    build_index({**common, "faiss_index": str(root / "merged.index")})
    build_index({**common, "faiss_index": str(root / "parts.index"), "merge": "none", "executor": "local",
                 "overwrite": True})
    q = torch.from_numpy(rng.normal(size=(40, D)).astype(np.float32))
    return root, open_datastore(str(root / "all_shards.json")), q


@pytest.mark.parametrize("sim_func,k_factor", [("l2", 1.0), ("l2", 2.5), ("do_not_recomp_l2", 1.0), ("dot", 1.0),
                                               ("dot", 2.0)])
def test_local_executor_over_parts_equals_the_merged_index(parts, sim_func, k_factor):
    root, ds, q = parts
    kw = dict(k=16, nprobe=3, sim_func=sim_func, k_factor=k_factor)
    a = FaissRetriever(str(root / "merged.index"), ds, **kw).retrieve(q)
    r = ShardedRetriever(str(root / "parts.index"), ds, executor="local", **kw)
    try:
        b = r.retrieve(q)
    finally:
        r.close()
    np.testing.assert_array_equal(np.sort(a.ids.numpy(), 1), np.sort(b.ids.numpy(), 1))
    np.testing.assert_allclose(np.sort(a.distances.numpy(), 1), np.sort(b.distances.numpy(), 1), rtol=1e-5, atol=1e-5)
    # values belong to the ids: the datastore's own
    np.testing.assert_array_equal(b.values.numpy(), ds.gather_vals(b.ids.numpy()))
    # an independent reference for the exact distances: numpy on the keys
    if sim_func == "l2":
        keys = ds.gather_keys(b.ids.numpy().reshape(-1)).reshape(*b.ids.shape, D)
        ref = ((keys - q.numpy()[:, None, :]) ** 2).sum(-1)
        np.testing.assert_allclose(b.distances.numpy(), ref, rtol=1e-4, atol=1e-4)


def test_a_part_index_is_an_ordinary_index_of_its_shard(parts):
    root, ds, _ = parts
    m = json.load(open(manifest_path(str(root / "parts.index"))))
    assert m["merge"] == "none" and [s["offset"] for s in m["shards"]] == [0, SIZES[0], SIZES[0] + SIZES[1]]
    assert is_sharded_index(str(root / "parts.index")) and is_sharded_index(manifest_path(str(root / "parts.index")))
    assert not is_sharded_index(str(root / "merged.index"))
    # shard 1 searched alone with FaissRetriever: its own rows
    part = FaissRetriever(str(root / "parts.index.part1"), ds.shards[1], k=1, nprobe=8)
    n = part.retrieve(torch.from_numpy(np.asarray(ds.shards[1].keys[:5], np.float32)))
    assert n.ids[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_manifest_refuses_another_datastore_and_an_edited_offset(parts, tmp_path):
    root, ds, _ = parts
    with pytest.raises(MismatchError, match="was built from datastore"):
        ShardedRetriever(str(root / "parts.index"), ds.shards[0], k=4)
    m = json.load(open(manifest_path(str(root / "parts.index"))))
    m["shards"][1]["offset"] += 1
    for s in m["shards"]:  # the copy's paths, resolved from the original folder
        s["index"], s["datastore"] = str(root / s["index"]), str(root / s["datastore"])
    bad = tmp_path / "bad.index.shards.json"
    bad.write_text(json.dumps(m))
    with pytest.raises(CorruptError, match="shard 1 starts at id"):
        ShardedRetriever(str(bad), ds, k=4)
    with pytest.raises(ConfigError, match="not an index kept in parts"):
        ShardedRetriever(str(root / "merged.index"), ds, k=4)
    with pytest.raises(ConfigError, match="executor must be one of"):
        ShardedRetriever(str(root / "parts.index"), ds, k=4, executor="dask")


def test_a_second_merge_none_build_is_refused_unless_overwrite(parts):
    root, _, _ = parts
    with pytest.raises(KNNLMError, match="index manifest already exists"):
        build_index({"dstore_mmap": str(root / "all"), "faiss_index": str(root / "parts.index"), "merge": "none",
                     "ncentroids": 8, "code_size": 4, "threads": 1})


def test_shard_dump_refuses_its_own_options_in_the_command(tmp_path):
    with pytest.raises(ConfigError, match="must not carry --num-shards"):
        dump_shards(["knnlm-hf", "dump", "--num-shards", "2"], 2, str(tmp_path / "p"))
    with pytest.raises(ConfigError, match="give the dump command"):
        dump_shards([], 2, str(tmp_path / "p"))


def test_shard_dump_local_retries_then_gives_up_by_name(tmp_path):
    """A dump command that always fails: tried 1 + retries times, then a named error; nothing written."""
    fail = [sys.executable, "-c", "import sys; sys.exit('boom: no model here')"]
    with pytest.raises(KNNLMError, match=r"shard 0 failed \(exit status 1\): boom: no model here; gave up after 2"):
        dump_shards(fail, 2, str(tmp_path / "p"), executor="local", retries=1)
    assert not (tmp_path / "p_shards.json").exists()


def test_hf_shard_windows_partition_the_windows_contiguously():
    from knnlm.hf.windows import shard_windows, windows

    wins = windows(1000, 64, 32)
    for n in (1, 2, 3, 7):
        got = [w for i in range(n) for w in shard_windows(wins, n, i)]
        assert got == wins
        sizes = [len(shard_windows(wins, n, i)) for i in range(n)]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match="gets no window"):
        shard_windows(wins[:2], 3, 2)
    with pytest.raises(ConfigError, match="--shard-id must lie"):
        shard_windows(wins, 3, 3)


def test_shard_dump_refuses_a_foreign_file_at_its_manifest_before_dumping(tmp_path):
    """Issue #29's rule for the new writer: a file it did not make is not replaced (and no shard is dumped)."""
    foreign = tmp_path / "ds_shards.json"
    foreign.write_text("my notes\n")
    with pytest.raises(KNNLMError, match="is not a shard manifest: pass --overwrite"):
        dump_shards([sys.executable, "-c", "raise SystemExit(1)"], 2, str(tmp_path / "ds"))
    assert foreign.read_text() == "my notes\n" and not list(tmp_path.glob("ds.shard_*"))
