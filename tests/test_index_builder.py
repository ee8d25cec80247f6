"""knnlm-build-index and sharded builds: exactness, recall, resume, shards, refusals, CLI.

Small clustered float32 keys (3000 x 16) keep every build to about a second.
"""

import json
import logging
import os

import faiss
import numpy as np
import pytest
import torch

from knnlm.index import builder as ib
from knnlm.index import steps
from knnlm.store import Datastore, DatastoreWriter
from knnlm.errors import ConfigError, KNNLMError, MismatchError
from knnlm.index import load_index, read_index_meta
from knnlm.retrieval import FaissRetriever
from knnlm.scoring import knn_log_prob, neighbor_scores
from knnlm.store.sharded import ShardedDatastore, open_datastore, open_manifest, write_manifest

N, D = 3000, 16


def clustered(n, d, seed=0, centers=24):
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=4.0, size=(centers, d))
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def make_datastore(prefix, keys, vals=None):
    w = DatastoreWriter(str(prefix), keys.shape[1], keytype="last_ffn_input", dict_size=100, dict_fingerprint="x")
    w.add(keys, np.arange(len(keys)) % 100 if vals is None else vals)
    w.finalize()
    return Datastore.open(str(prefix))


def settings(ds_prefix, index, **kw):
    # One thread: results are reproducible and the tiny builds are not slowed by contention.
    return {"dstore_mmap": str(ds_prefix), "faiss_index": str(index), "threads": 1, **kw}


def brute_force(keys, queries, k):
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    return flat.search(queries, k)


@pytest.fixture(scope="module")
def keys():
    return clustered(N, D)


@pytest.fixture(scope="module")
def queries():
    return clustered(50, D, seed=1)


@pytest.fixture
def ds(tmp_path, keys):
    return make_datastore(tmp_path / "ds", keys)


def test_full_probe_flat_ivf_is_exact(tmp_path, ds, keys, queries):
    s = ib.build_index(settings(ds.prefix, tmp_path / "flat.index", factory="IVF{ncentroids},Flat", ncentroids=16))
    assert s["meta"]["ncentroids"] == 16 and s["meta"]["complete"]
    index = load_index(str(tmp_path / "flat.index"), ds)
    k = 10
    r = FaissRetriever(index, ds, k=k, nprobe=16, sim_func="l2")  # nprobe == nlist: every list searched
    _, ids = r.search(queries)
    dists, vals, valid = r(queries)
    ref_d, ref_i = brute_force(keys, queries, k)
    exact = ((keys[ids].astype(np.float64) - queries[:, None, :]) ** 2).sum(-1)
    np.testing.assert_allclose(dists.numpy(), exact, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.sort(dists.numpy(), 1), ref_d, rtol=1e-5, atol=1e-4)
    # Ids agree wherever the distance is not tied with a neighbor's.
    tie = np.zeros_like(ref_d, dtype=bool)
    tie[:, 1:] |= np.isclose(ref_d[:, 1:], ref_d[:, :-1], rtol=1e-6)
    tie[:, :-1] |= tie[:, 1:]
    assert (np.where(tie, 0, ids) == np.where(tie, 0, ref_i)).all()
    assert valid.all() and (vals.numpy() == np.asarray(ds.vals)[ids]).all()


def test_ivfpq_recall(tmp_path, ds, keys, queries):
    ib.build_index(settings(ds.prefix, tmp_path / "pq.index", ncentroids=32, code_size=8))
    index = load_index(str(tmp_path / "pq.index"), ds)
    faiss.extract_index_ivf(index).nprobe = 8
    k = 16
    _, ids = index.search(queries, k)
    _, ref = brute_force(keys, queries, k)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, ref)])
    assert recall > 0.6, recall  # about 0.8 here (6-bit PQ on 3000 keys)


@pytest.mark.parametrize("sim", ["l2", "dot"])
def test_k_factor_reranks_candidates_by_exact_distance(tmp_path, ds, keys, queries, sim):
    """k_factor asks FAISS for more candidates and keeps the k nearest by exact distance: with
    every key a candidate, that is exact search through a coarse 4-bit fast-scan index."""
    ib.build_index(settings(ds.prefix, tmp_path / "fs.index", factory="IVF{ncentroids},PQ{code_size}x4fs",
                            ncentroids=8, code_size=8, metric="ip" if sim == "dot" else "l2"))
    index = load_index(str(tmp_path / "fs.index"), ds)
    k = 10
    r = FaissRetriever(index, ds, k=k, nprobe=8, sim_func=sim, k_factor=N / k)  # all N keys are candidates
    assert r.k_search == N
    dists, vals, valid, ids = r(queries, return_ids=True)
    exact = (queries.astype(np.float64) @ keys.T.astype(np.float64) if sim == "dot"
             else ((queries[:, None, :].astype(np.float64) - keys[None]) ** 2).sum(-1))
    want = -np.sort(-exact, 1)[:, :k] if sim == "dot" else np.sort(exact, 1)[:, :k]
    np.testing.assert_allclose(dists.numpy(), want, rtol=1e-5, atol=1e-3)  # nearest first
    got_exact = np.take_along_axis(exact, ids.numpy(), 1)
    np.testing.assert_allclose(got_exact, dists.numpy(), rtol=1e-5, atol=1e-3)  # ids match distances
    assert valid.all() and (vals.numpy() == np.asarray(ds.vals)[ids.numpy()]).all()
    # Without it the 4-bit codes alone miss some of the exact top k.
    _, coarse_ids = FaissRetriever(index, ds, k=k, nprobe=8, sim_func=sim).search(queries)
    ref = np.argsort(-exact if sim == "dot" else exact, 1)[:, :k]
    assert np.mean([len(set(a) & set(b)) / k for a, b in zip(coarse_ids, ref)]) < 1.0


@pytest.mark.parametrize("sim", ["l2", "dot"])
def test_k_factor_in_any_order_keeps_the_same_neighbors(tmp_path, ds, keys, queries, sim):
    """nearest_first=False (the scorer's fast path) keeps the same k neighbors, each with its
    own distance and value, in some order; the knn log-probs do not change."""
    ib.build_index(settings(ds.prefix, tmp_path / "fs.index", factory="IVF{ncentroids},PQ{code_size}x4fs",
                            ncentroids=8, code_size=8, metric="ip" if sim == "dot" else "l2"))
    r = FaissRetriever(load_index(str(tmp_path / "fs.index"), ds), ds, k=50, nprobe=4, sim_func=sim, k_factor=3)
    d1, v1, ok1, i1 = r(queries, return_ids=True)
    d2, v2, ok2, i2 = r(queries, return_ids=True, nearest_first=False)
    assert not torch.equal(i1, i2)  # the test means something only if the order differs
    for a, b in ((i1, i2), (d1, d2), (v1, v2)):
        assert torch.equal(a.sort(1).values, b.sort(1).values)  # same multiset per row
    exact = (queries @ keys.T if sim == "dot" else ((queries[:, None, :] - keys[None]) ** 2).sum(-1))
    np.testing.assert_allclose(np.take_along_axis(exact, i2.numpy(), 1), d2.numpy(), rtol=1e-5, atol=1e-3)
    assert (v2.numpy() == np.asarray(ds.vals)[i2.numpy()]).all() and ok2.all()
    targets = torch.from_numpy(np.asarray(ds.vals)[:len(queries)].astype(np.int64))
    lp1 = knn_log_prob(neighbor_scores(d1, sim, 10.0), v1, targets, ok1)
    lp2 = knn_log_prob(neighbor_scores(d2, sim, 10.0), v2, targets, ok2)
    torch.testing.assert_close(lp1, lp2, rtol=1e-5, atol=1e-5)


def test_k_factor_with_missing_candidates(tmp_path, ds, keys, queries):
    """Where the probed list holds fewer than k x factor keys FAISS pads with -1: the kept k are
    the list's nearest by exact distance, and the slots it cannot fill come last, invalid, id -1."""
    ib.build_index(settings(ds.prefix, tmp_path / "ivf.index", factory="IVF{ncentroids},Flat", ncentroids=16))
    index = load_index(str(tmp_path / "ivf.index"), ds)
    k = 250  # lists hold ~190 keys each: most cannot fill k, none fills k x 2
    r = FaissRetriever(index, ds, k=k, nprobe=1, sim_func="l2", k_factor=2)
    dists, vals, valid, ids = r(queries, return_ids=True)
    _, q_list = index.quantizer.search(queries, 1)
    _, key_list = index.quantizer.search(keys, 1)
    assert not valid.all()
    for i, q in enumerate(queries):
        members = np.flatnonzero(key_list[:, 0] == q_list[i, 0])
        exact = np.sort(((keys[members].astype(np.float64) - q) ** 2).sum(-1))[:k]
        n = len(exact)
        assert valid[i, :n].all() and not valid[i, n:].any() and (ids[i, n:] == -1).all()
        np.testing.assert_allclose(dists[i, :n].numpy(), exact, rtol=1e-5, atol=1e-3)
        assert set(ids[i, :n].tolist()) <= set(members.tolist())
        assert (vals[i, :n].numpy() == np.asarray(ds.vals)[ids[i, :n].numpy()]).all()


@pytest.mark.parametrize("sim", ["l2", "dot"])
def test_exact_distances_in_sorted_blocks_match_float64(ds, keys, queries, sim, monkeypatch):
    """The fused recompute sorts (id, position) pairs block by block: blocks of an odd number of
    pairs and repeated ids must still put every distance back in its own slot."""
    import knnlm.retrieval.faiss_search as retrieval

    ids = np.random.default_rng(3).integers(0, 40, size=(len(queries), 37))  # many repeats
    r = FaissRetriever(faiss.IndexFlatL2(D), ds, k=37, sim_func=sim)
    whole = r.exact_distances(queries, ids).numpy()
    monkeypatch.setattr(retrieval, "SORT_BLOCK_PAIRS", 37 * 3)  # 3 queries = 111 pairs per block
    blocked = r.exact_distances(queries, ids).numpy()
    q, k = queries.astype(np.float64), keys[ids].astype(np.float64)
    want = (k * q[:, None]).sum(-1) if sim == "dot" else ((k - q[:, None]) ** 2).sum(-1)
    np.testing.assert_allclose(whole, want, rtol=1e-5, atol=1e-3)
    assert np.array_equal(whole, blocked)


def test_recompute_threads_follow_the_callers_faiss_setting(ds, queries, monkeypatch):
    """The fused recompute runs its blocks on worker threads; OpenMP settings are per thread,
    so a user's faiss.omp_set_num_threads must be carried to them, not the process default."""
    import threading

    import knnlm.retrieval.faiss_search as retrieval

    seen, real = set(), faiss.pairwise_indexed_L2sqr

    def spy(*args):
        seen.add((threading.current_thread() is threading.main_thread(), faiss.omp_get_max_threads()))
        return real(*args)

    monkeypatch.setattr(faiss, "pairwise_indexed_L2sqr", spy)
    monkeypatch.setattr(retrieval, "SORT_BLOCK_PAIRS", 37 * 3)
    before = faiss.omp_get_max_threads()
    mine = before + 1  # differs from what a fresh thread starts with, on any machine
    faiss.omp_set_num_threads(mine)
    try:
        ids = np.random.default_rng(4).integers(0, N, size=(len(queries), 37))
        FaissRetriever(faiss.IndexFlatL2(D), ds, k=37).exact_distances(queries, ids)
    finally:
        faiss.omp_set_num_threads(before)
    assert seen == {(False, mine)}  # every block on a worker thread, each with the caller's setting


def test_k_factor_refusals(ds):
    index = faiss.IndexFlatL2(D)
    with pytest.raises(ConfigError, match="--knn-k-factor"):
        FaissRetriever(index, ds, k=4, k_factor=0.5)
    with pytest.raises(ConfigError, match="do_not_recomp_l2"):
        FaissRetriever(index, ds, k=4, k_factor=2, sim_func="do_not_recomp_l2")


def test_killed_build_resumes_from_last_chunk(tmp_path, ds, monkeypatch, caplog):
    index = tmp_path / "r.index"
    cfg = settings(ds.prefix, index, ncentroids=32, code_size=8, num_keys_to_add_at_a_time=1000,
                   checkpoint_interval_s=0)
    real_add = steps._add_chunk
    starts = []

    def crash_on_second(idx, x, ids):
        if starts:
            raise RuntimeError("simulated kill")
        starts.append(int(ids[0]))
        real_add(idx, x, ids)

    monkeypatch.setattr(steps, "_add_chunk", crash_on_second)
    with pytest.raises(RuntimeError, match="simulated kill"):
        ib.build_index(cfg)
    assert not index.exists()
    assert os.path.exists(f"{index}.partial") and os.path.exists(f"{index}.trained")
    assert json.load(open(f"{index}.progress.json"))["rows_added"] == 1000
    with pytest.raises(KNNLMError, match="not finished"):
        read_index_meta(str(index))

    starts.clear()

    def record(idx, x, ids):
        starts.append(int(ids[0]))
        real_add(idx, x, ids)

    monkeypatch.setattr(steps, "_add_chunk", record)
    with caplog.at_level(logging.INFO, logger="knnlm"):
        s = ib.build_index(cfg)
    assert starts == [1000, 2000]  # chunk 0 was not added again
    assert "reusing the trained index" in caplog.text and "resuming" in caplog.text
    assert s["resumed_from_row"] == 1000 and s["rows_added"] == 2000
    assert not any(os.path.exists(f"{index}{x}") for x in (".partial", ".trained", ".progress.json"))

    monkeypatch.setattr(steps, "_add_chunk", real_add)
    ib.build_index({**cfg, "faiss_index": str(tmp_path / "whole.index")})
    resumed = faiss.serialize_index(load_index(str(index), ds))
    whole = faiss.serialize_index(load_index(str(tmp_path / "whole.index"), ds))
    assert np.array_equal(resumed, whole)


def test_changed_parameters_restart_cleanly(tmp_path, ds, monkeypatch, caplog):
    index = tmp_path / "c.index"
    monkeypatch.setattr(steps, "_add_chunk", lambda *a: (_ for _ in ()).throw(RuntimeError("kill")))
    with pytest.raises(RuntimeError):
        ib.build_index(settings(ds.prefix, index, ncentroids=32, code_size=8))
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="knnlm"):
        s = ib.build_index(settings(ds.prefix, index, ncentroids=16, code_size=8))
    assert "cannot be resumed" in caplog.text and "IVF32" in caplog.text and "IVF16" in caplog.text
    assert s["meta"]["ncentroids"] == 16 and s["resumed_from_row"] is None


def test_two_shards_merged_on_disk_match_single_index(tmp_path, keys, queries, monkeypatch, caplog):
    vals = np.random.default_rng(2).integers(0, 100, N)
    whole = make_datastore(tmp_path / "whole", keys, vals)
    make_datastore(tmp_path / "s0", keys[:1700], vals[:1700])
    make_datastore(tmp_path / "s1", keys[1700:], vals[1700:])
    common = {"ncentroids": 32, "code_size": 8, "shard_workers": 2}
    ib.build_index(settings(whole.prefix, tmp_path / "whole.index", **common))
    sharded_cfg = settings(tmp_path / "sh", tmp_path / "sh.index",
                           shards=[str(tmp_path / "s0"), str(tmp_path / "s1")], **common)

    # Killed after both shard processes finished, before the merge: the shards are kept...
    import faiss.contrib.ondisk

    def killed(*args):
        raise RuntimeError("simulated kill before the merge")

    monkeypatch.setattr(faiss.contrib.ondisk, "merge_ondisk", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        ib.build_index(sharded_cfg)
    assert not (tmp_path / "sh.index").exists() and len(list(tmp_path.glob("sh.index.shard?"))) == 2
    monkeypatch.undo()
    # ...and the re-run only merges them.
    with caplog.at_level(logging.INFO, logger="knnlm"):
        s = ib.build_index(sharded_cfg)
    assert "shard 1 (" in caplog.text and "in separate processes" not in caplog.text
    assert s["meta"]["shards_reused"] == [0, 1] and s["rows_added"] == 0
    assert s["meta"]["ondisk"] and os.path.exists(tmp_path / "sh.index.ivfdata")
    assert not list(tmp_path.glob("sh.index.shard*"))

    sharded = open_datastore(tmp_path / "sh")  # finds sh_shards.json
    assert isinstance(sharded, ShardedDatastore) and sharded.size == N
    a = load_index(str(tmp_path / "whole.index"), whole)
    b = load_index(str(tmp_path / "sh.index"), sharded)
    qa, qb = faiss.extract_index_ivf(a).quantizer, faiss.extract_index_ivf(b).quantizer
    assert np.array_equal(qa.reconstruct_n(0, qa.ntotal), qb.reconstruct_n(0, qb.ntotal))  # same training
    for index, store in ((a, whole), (b, sharded)):
        faiss.extract_index_ivf(index).nprobe = 8
    da, ia = a.search(queries, 20)
    db, ib_ = b.search(queries, 20)
    assert np.array_equal(ia, ib_) and np.array_equal(da, db)
    ra = FaissRetriever(a, whole, k=20, nprobe=8)(queries)
    rb = FaissRetriever(b, sharded, k=20, nprobe=8)(queries)
    for x, y in zip(ra, rb):
        assert (x == y).all()
    # The sharded datastore maps global ids back to (shard, row).
    shard, row = sharded.locate([0, 1699, 1700, N - 1])
    assert shard.tolist() == [0, 0, 1, 1] and row.tolist() == [0, 1699, 0, N - 1701]
    assert np.array_equal(sharded.gather_keys([5, 2000, 1699]), keys[[5, 2000, 1699]])
    # Neither datastore passes for the other's index.
    with pytest.raises(MismatchError):
        load_index(str(tmp_path / "sh.index"), whole)


def test_manifest_refuses_a_redumped_shard(tmp_path, keys):
    make_datastore(tmp_path / "s0", keys[:100])
    make_datastore(tmp_path / "s1", keys[100:200])
    write_manifest(str(tmp_path / "m.json"), [str(tmp_path / "s0"), str(tmp_path / "s1")])
    assert open_manifest(str(tmp_path / "m.json")).size == 200
    with pytest.raises(MismatchError, match="201"):
        open_datastore(tmp_path / "m.json", dstore_size=201)
    w = DatastoreWriter(str(tmp_path / "s1"), D, keytype="last_ffn_input", dict_size=100,
                        dict_fingerprint="x", overwrite=True)
    w.add(keys[100:200], np.zeros(100, dtype=np.int64))
    w.finalize()
    with pytest.raises(MismatchError, match="dumped"):
        open_manifest(str(tmp_path / "m.json"))


def test_refusals(tmp_path, ds, keys, capsys):
    index = tmp_path / "x.index"
    assert ib.main(["--dstore_mmap", ds.prefix, "--faiss_index", str(index), "--dimension", "32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knnlm-build-index: error:") and "--dimension 32" in err and "16" in err

    ib.build_index(settings(ds.prefix, index, ncentroids=16, code_size=8))
    other = make_datastore(tmp_path / "other", keys)  # same keys, another dump
    with pytest.raises(MismatchError, match="other"):
        load_index(str(index), other)

    with pytest.raises(KNNLMError, match="overwrite"):
        ib.build_index(settings(ds.prefix, index, ncentroids=16, code_size=8))
    assert ib.main(["dstore_mmap=" + ds.prefix, f"faiss_index={index}", "code_size=8"]) == 2
    assert "overwrite" in capsys.readouterr().err
    s = ib.build_index(settings(ds.prefix, index, ncentroids=8, code_size=8, overwrite=True))
    assert read_index_meta(str(index))["ncentroids"] == 8 == s["meta"]["ncentroids"]

    with pytest.raises(ConfigError, match="divide"):
        ib.build_index(settings(ds.prefix, tmp_path / "y.index", code_size=5))
    assert ib.main(["--dstore_mmap", ds.prefix, "--bogus", "1"]) == 2
    assert "unknown option --bogus" in capsys.readouterr().err
    assert ib.main(["bogus=1", "dstore_mmap=x"]) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err


def test_original_build_dstore_arguments(tmp_path, keys, capsys):
    # A raw datastore as the original kNN-LM code dumped it: headerless memmaps, int64 values.
    prefix = str(tmp_path / "raw")
    np.memmap(f"{prefix}_keys.npy", dtype=np.float32, mode="w+", shape=(N, D))[:] = keys
    np.memmap(f"{prefix}_vals.npy", dtype=np.int64, mode="w+", shape=(N, 1))[:] = 7
    index = tmp_path / "raw.index"
    argv = ["--dstore_mmap", prefix, "--dstore_size", str(N), "--dimension", str(D),
            "--faiss_index", str(index), "--ncentroids", "16", "--code_size", "8", "--probe", "8",
            "--seed", "3", "--num_keys_to_add_at_a_time", "1000", "--starting_point", "0", "--threads=1"]
    assert ib.main(argv) == 0, capsys.readouterr().err
    assert "keys/s" in capsys.readouterr().out
    meta = read_index_meta(str(index))
    assert (meta["ncentroids"], meta["code_size"], meta["nprobe"], meta["seed"]) == (16, 8, 8, 3)
    raw = Datastore.open(prefix, dstore_size=N, dim=D)
    assert load_index(str(index), raw).ntotal == N
    # Dashes, --flag=value and the fp16 flag (refused: these keys are float32).
    assert ib.main([f"--dstore-mmap={prefix}", f"--dstore-size={N}", "--dimension", str(D), "--dstore-fp16",
                    "--faiss-index", str(tmp_path / "b.index")]) == 2
    assert ib.argv_to_overrides(["--factory", "IVF8,PQ4", "--gpu", "--dstore-fp16=false"]) == [
        "factory='IVF8,PQ4'", "gpu=true", "dstore_fp16=false"]


def test_small_datastore_shrinks_centroids_and_pq_bits(tmp_path, ds, caplog):
    with caplog.at_level(logging.WARNING, logger="knnlm"):
        s = ib.build_index(settings(ds.prefix, tmp_path / "s.index", code_size=8))  # ncentroids 4096 by default
    assert "ncentroids=4096" in caplog.text and "ncentroids=64" in caplog.text
    assert "6-bit" in caplog.text
    m = s["meta"]
    assert (m["ncentroids"], m["pq_nbits"], m["factory"]) == (64, 6, "IVF64,PQ8x6")
    assert load_index(str(tmp_path / "s.index"), ds).ntotal == N


def test_move_dstore_to_mem_really_loads(tmp_path):
    from knnlm.store import Datastore, DatastoreWriter

    w = DatastoreWriter(str(tmp_path / "d"), 4, keytype="last_ffn_input", dict_size=10, dict_fingerprint="x")
    w.add(np.ones((5, 4), np.float32), np.arange(5))
    w.finalize()
    ds = Datastore.open(str(tmp_path / "d"), in_memory=True)
    assert not isinstance(ds.keys, np.memmap) and not isinstance(ds.keys.base, np.memmap)
    assert ds.keys.flags.owndata and ds.vals.flags.owndata


def test_same_seed_same_index_and_versions_recorded(tmp_path, ds):
    def build(name, seed):
        path = tmp_path / name
        ib.build_index(settings(ds.prefix, path, ncentroids=8, code_size=8, seed=seed, num_keys_to_train=1000))
        return faiss.serialize_index(faiss.read_index(str(path))), json.load(open(f"{path}.meta.json"))

    a, meta = build("a.index", 5)
    b, _ = build("b.index", 5)
    c, _ = build("c.index", 6)
    assert np.array_equal(a, b)  # same seed: the same sample, the same index, byte for byte
    assert not np.array_equal(a, c)  # another seed samples other training keys
    assert meta["seed"] == 5 and {"faiss", "numpy"} <= set(meta["versions"])
