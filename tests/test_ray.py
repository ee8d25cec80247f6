"""Beyond one machine (issue 25): dump, build and search a sharded datastore on a simulated Ray
cluster (`ray.cluster_utils.Cluster`: a head and 3 nodes, node i advertising the resource
`shard_i`), started once for this file.

Every result is checked against the one-machine route, which the rest of the suite checks
against independent references: the shard dumps against the single dump, the Ray build against
the local sharded build (same quantizer, same codes), the search over index parts against one
merged index built from the same trained quantizer. Ray must run in its own network namespace
here (`make test` does: unshare -n); skipped only where `ray` is not installed.
"""

import os
import sys
import textwrap

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray")

from knnlm import KNNLM, FaissRetriever, open_datastore  # noqa: E402
from knnlm.cluster import ShardUnavailableError  # noqa: E402
from knnlm.index.builder import build_index  # noqa: E402
from knnlm.index.shard_manifest import manifest_path, part_path  # noqa: E402
from knnlm.retrieval.sharded_search import ShardedRetriever  # noqa: E402
from knnlm.store.datastore import Datastore  # noqa: E402

from .conftest import BIN, PLUGIN, knn_summary, run  # noqa: E402

N_SHARDS = 3
# No --context-window: fairseq's LMContextWindowDataset takes each block's context from the block
# before it in the order this process collates them, which a shard (every N-th batch) changes.
FAIRSEQ_DUMP = ("--tokens-per-sample", "64", "--gen-subset", "valid", "--max-tokens", "128", "--save-knnlm-dstore")
BUILD = {"ncentroids": 4, "code_size": 4, "threads": 1, "seed": 3}


@pytest.fixture(scope="module")
def cluster():
    """A head (no shard) and 3 nodes, node i with the custom resource shard_i; RAY_ADDRESS names it
    for the commands run in subprocesses."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [c.add_node(num_cpus=2, resources={f"shard_{i}": 1}) for i in range(N_SHARDS)]
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = c.address
    yield c, nodes
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = old
    ray.shutdown()
    c.shutdown()


def eval_lm_cmd(tiny, *args):
    return [str(BIN / "fairseq-eval-lm"), tiny["data"], "--path", tiny["ckpt"], "--user-dir", PLUGIN, "--task",
            "knnlm", "--cpu", "--num-workers", "0", "--no-progress-bar", *args]


def rows(prefix):
    ds = Datastore.open(prefix)
    return np.asarray(ds.keys, np.float32), np.asarray(ds.vals, np.int64)


@pytest.fixture(scope="module")
def dumps(tiny, cluster, tmp_path_factory):
    """The valid split dumped once whole and once by `knnlm-shard-dump --executor ray` in 3 shards,
    shard 1's first run killed (SIGKILL) by a wrapper: it must be run again."""
    root = tmp_path_factory.mktemp("ray_dumps")
    single = str(root / "single")
    run(eval_lm_cmd(tiny, *FAIRSEQ_DUMP, "--dstore-mmap", single))
    flaky = root / "flaky.py"
    flaky.write_text(textwrap.dedent(f"""
        import os, signal, sys
        marker = {str(root / 'killed_once')!r}
        if sys.argv[sys.argv.index('--shard-id') + 1] == '1' and not os.path.exists(marker):
            open(marker, 'w').close()
            os.kill(os.getpid(), signal.SIGKILL)
        os.execv(sys.argv[1], sys.argv[1:])
    """))
    prefix = str(root / "sharded")
    cmd = ["knnlm-shard-dump", "--num-shards", N_SHARDS, "--dstore-mmap", prefix, "--executor", "ray", "--",
           sys.executable, flaky, *eval_lm_cmd(tiny, *FAIRSEQ_DUMP)]
    first = run(cmd)
    again = run(cmd)
    return {"single": single, "prefix": prefix, "first": first, "again": again, "root": root}


def test_shard_dump_equals_the_single_dump_and_retries_a_killed_shard(dumps):
    first, again = dumps["first"], dumps["again"]
    out = first.stdout + first.stderr
    assert "shard 1 failed (killed by signal 9)" in out and "running it again" in out, out[-3000:]
    assert out.count("wrote shard manifest") == 1, out[-3000:]
    manifest = dumps["prefix"] + "_shards.json"
    ds = open_datastore(manifest)
    assert len(ds.shards) == N_SHARDS and all(s.size > 0 for s in ds.shards)
    # fairseq's --num-shards deals batches round-robin (batch j to shard j mod N): the shards hold
    # the single dump's rows, each once, in another order.
    keys, vals = rows(dumps["single"])
    skeys = np.concatenate([np.asarray(s.keys, np.float32) for s in ds.shards])
    svals = np.concatenate([np.asarray(s.vals, np.int64) for s in ds.shards])
    assert skeys.shape == keys.shape
    # The same rows, bit for bit, as multisets (rows sorted by value, then key).
    def sorted_rows(k, v):
        order = np.lexsort((*k.T[::-1], v))
        return k[order], v[order]

    (a, va), (b, vb) = sorted_rows(keys, vals), sorted_rows(skeys, svals)
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(a, b)
    # Run again: every shard is complete, none is dumped again, the manifest stays as written.
    assert "0 dumped now, 3 already" in again.stdout and "wrote shard manifest" not in again.stdout + again.stderr


def test_hf_shard_dump_equals_the_single_dump_row_for_row(cluster, tmp_path):
    """knnlm-hf dump --num-shards N --shard-id i takes contiguous runs of windows: the shards, in
    order, are the single dump row for row."""
    pytest.importorskip("transformers")
    from .test_hf import WORDS, make_tokenizer, text, tiny as tiny_hf

    tok = make_tokenizer(WORDS)
    tiny_hf("gpt2", len(tok), seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text(text(30, 1))
    dump = [str(BIN / "knnlm-hf"), "dump", "--model", tmp_path / "model", "--text", tmp_path / "train.txt",
            "--max-length", "16", "--stride", "8", "--device", "cpu"]
    run([*dump, "--dstore-mmap", tmp_path / "single"])
    run(["knnlm-shard-dump", "--num-shards", N_SHARDS, "--dstore-mmap", tmp_path / "sharded", "--executor", "ray",
         "--", *dump])
    keys, vals = rows(str(tmp_path / "single"))
    ds = open_datastore(str(tmp_path / "sharded_shards.json"))
    assert [s.meta["shard_id"] for s in ds.shards] == [0, 1, 2] and all(s.size for s in ds.shards)
    np.testing.assert_array_equal(np.concatenate([np.asarray(s.vals) for s in ds.shards]), vals)
    np.testing.assert_allclose(np.concatenate([np.asarray(s.keys, np.float32) for s in ds.shards]), keys,
                               rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- build

def invlists(index_path):
    """(coarse centroids, PQ centroids, [(ids, codes) per list]) of an IVF-PQ index."""
    import faiss
    from faiss.contrib.inspect_tools import get_invlist

    index = faiss.read_index(index_path, faiss.IO_FLAG_ONDISK_SAME_DIR)
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    pq = faiss.vector_to_array(faiss.downcast_index(ivf).pq.centroids)
    lists = [tuple(np.asarray(a).copy() for a in get_invlist(ivf.invlists, i)) for i in range(ivf.nlist)]
    return centroids, pq, lists


@pytest.fixture(scope="module")
def indexes(dumps, cluster):
    """Over the 3-shard dump: the local build merged on disk, and merge=none built locally and on Ray."""
    root, prefix = dumps["root"], dumps["prefix"]
    out = {}
    for name, extra in (("merged", {}), ("ray_merged", {"executor": "ray"}),
                        ("parts_local", {"merge": "none", "executor": "local"}),
                        ("parts_ray", {"merge": "none", "executor": "ray"})):
        out[name] = str(root / f"{name}.index")
        build_index({"dstore_mmap": prefix, "faiss_index": out[name], **BUILD, **extra})
    return out


def test_ray_build_equals_the_local_sharded_build(indexes):
    for local, on_ray in ((indexes["merged"], indexes["ray_merged"]),
                          *((part_path(indexes["parts_local"], k), part_path(indexes["parts_ray"], k))
                            for k in range(N_SHARDS))):
        a, b = invlists(local), invlists(on_ray)
        np.testing.assert_array_equal(a[0], b[0])  # the same trained quantizer
        np.testing.assert_array_equal(a[1], b[1])
        for (ia, ca), (ib, cb) in zip(a[2], b[2]):  # the same ids and codes in every list
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(ca, cb)
    # The parts hold the merged index's codes, list by list (ids: shard rows + the shard's offset).
    merged = invlists(indexes["merged"])
    import json

    m = json.load(open(manifest_path(indexes["parts_ray"])))
    assert [s["resource"] for s in m["shards"]] == [f"shard_{k}" for k in range(N_SHARDS)]
    parts = [(invlists(part_path(indexes["parts_ray"], k)), s["offset"]) for k, s in enumerate(m["shards"])]
    for lst, (ids, codes) in enumerate(merged[2]):
        pid = np.concatenate([p[2][lst][0] + off for p, off in parts])
        pcodes = np.concatenate([p[2][lst][1] for p, _ in parts])
        order_a, order_b = np.argsort(ids), np.argsort(pid)
        np.testing.assert_array_equal(ids[order_a], pid[order_b])
        np.testing.assert_array_equal(codes[order_a], pcodes[order_b])


# ----------------------------------------------------------------------------- search

@pytest.fixture(scope="module")
def queries(dumps):
    """Queries near the datastore's keys (the valid split's own keys, perturbed), targets and log p_LM."""
    keys, vals = rows(dumps["single"])
    rng = np.random.default_rng(0)
    pick = rng.choice(len(keys), 64, replace=False)
    q = keys[pick] + 0.05 * rng.normal(size=(64, keys.shape[1])).astype(np.float32)
    lp_lm = torch.log(torch.from_numpy(rng.uniform(0.01, 0.5, size=64).astype(np.float32)))
    return torch.from_numpy(q), torch.from_numpy(vals[pick]), lp_lm


@pytest.mark.parametrize("sim_func,k_factor", [("l2", 1.0), ("l2", 2.0), ("do_not_recomp_l2", 1.0)])
def test_search_over_parts_equals_the_merged_index(dumps, indexes, queries, sim_func, k_factor):
    ds = open_datastore(dumps["prefix"] + "_shards.json")
    q, targets, lp_lm = queries
    kw = dict(k=16, nprobe=2, sim_func=sim_func, k_factor=k_factor)
    ref = FaissRetriever(indexes["merged"], ds, **kw)
    got = {}
    for ex in ("local", "ray"):
        r = ShardedRetriever(indexes["parts_ray"], ds, executor=ex, **kw)
        try:
            n = r.retrieve(q)
            knn = KNNLM(r, lmbda=0.25)
            knn.score(q, targets, lp_lm)
            got[ex] = (n, knn.summary()["ppl"])
        finally:
            r.close()
    a = ref.retrieve(q)
    knn = KNNLM(ref, lmbda=0.25)
    knn.score(q, targets, lp_lm)
    ppl = knn.summary()["ppl"]
    for ex, (n, p) in got.items():
        np.testing.assert_array_equal(np.sort(n.ids.numpy(), 1), np.sort(a.ids.numpy(), 1))
        np.testing.assert_allclose(np.sort(n.distances.numpy(), 1), np.sort(a.distances.numpy(), 1), rtol=1e-4, atol=1e-4)
        assert abs(p - ppl) <= 1e-4 * ppl, (ex, p, ppl)
    assert got["local"][1] == got["ray"][1]  # the two executors: identical perplexity
    np.testing.assert_array_equal(got["local"][0].ids.numpy(), got["ray"][0].ids.numpy())


def test_each_shard_actor_runs_on_its_own_node(dumps, indexes, cluster):
    _, nodes = cluster
    ds = open_datastore(dumps["prefix"] + "_shards.json")
    r = ShardedRetriever(indexes["parts_ray"], ds, k=8, nprobe=2, executor="ray")
    try:
        assert [r.node_of(i)[0] for i in range(N_SHARDS)] == [n.node_id for n in nodes]
        # submit/collect: the search runs while the caller does something else
        q = torch.from_numpy(np.asarray(ds.shards[0].keys[:5], np.float32))
        pending = r.submit(q)
        n = r.collect(pending)
        assert (n.ids[:, 0] == torch.arange(5)).all()
        assert r.bytes_put == q.numel() * 4  # the queries crossed once, not once per shard
    finally:
        r.close()


# ----------------------------------------------------------------------------- front-ends

def test_fairseq_eval_lm_with_ray_executor_equals_the_merged_index(tiny, dumps, indexes, cluster):
    ds = dumps["prefix"] + "_shards.json"
    common = ("--tokens-per-sample", "64", "--gen-subset", "test", "--knnlm", "--dstore-filename", ds,
              "--k", "8", "--probe", "2")
    merged = run(eval_lm_cmd(tiny, *common, "--indexfile", indexes["merged"]))
    on_ray = run(eval_lm_cmd(tiny, *common, "--indexfile", manifest_path(indexes["parts_ray"]), "--knn-executor", "ray"))
    local = run(eval_lm_cmd(tiny, *common, "--indexfile", manifest_path(indexes["parts_ray"]), "--knn-executor", "local"))
    a, b, c = (knn_summary(r.stdout + r.stderr)[1] for r in (merged, on_ray, local))
    assert abs(a - b) <= 1e-4 * a and b == c


def test_knnlm_hf_eval_with_ray_executor_equals_the_merged_index(cluster, tmp_path):
    pytest.importorskip("transformers")
    from .test_hf import WORDS, make_tokenizer, text, tiny as tiny_hf

    tok = make_tokenizer(WORDS)
    tiny_hf("gpt2", len(tok), seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text(text(30, 1))
    (tmp_path / "valid.txt").write_text(text(8, 2))
    win = ("--max-length", "16", "--stride", "8", "--device", "cpu")
    run(["knnlm-shard-dump", "--num-shards", N_SHARDS, "--dstore-mmap", tmp_path / "ds", "--", str(BIN / "knnlm-hf"),
         "dump", "--model", tmp_path / "model", "--text", tmp_path / "train.txt", *win])
    for name, extra in (("merged", {}), ("parts", {"merge": "none"})):
        build_index({"dstore_mmap": str(tmp_path / "ds"), "faiss_index": str(tmp_path / f"{name}.index"), **BUILD, **extra})
    ev = [str(BIN / "knnlm-hf"), "eval", "--model", tmp_path / "model", "--text", tmp_path / "valid.txt", *win,
          "--knnlm", "--dstore-filename", tmp_path / "ds_shards.json", "--k", "8", "--probe", "2"]
    merged = run([*ev, "--indexfile", tmp_path / "merged.index"])
    on_ray = run([*ev, "--indexfile", tmp_path / "parts.index.shards.json", "--knn-executor", "ray"])
    a, b = (knn_summary(r.stdout + r.stderr)[1] for r in (merged, on_ray))
    assert abs(a - b) <= 1e-4 * a


# ----------------------------------------------------------------------------- a lost node (last: it removes one)

def test_a_node_removed_mid_run_is_a_named_error_and_no_perplexity(dumps, indexes, queries, cluster):
    c, nodes = cluster
    ds = open_datastore(dumps["prefix"] + "_shards.json")
    q, targets, lp_lm = queries
    r = ShardedRetriever(indexes["parts_ray"], ds, k=8, nprobe=2, executor="ray")
    knn = KNNLM(r, lmbda=0.25)
    try:
        knn.score(q[:32], targets[:32], lp_lm[:32])  # the first batch is scored
        c.remove_node(nodes[1])
        with pytest.raises(ShardUnavailableError) as e:
            knn.score(q[32:], targets[32:], lp_lm[32:])
    finally:
        r.close()
    msg = str(e.value)
    assert "shard 1" in msg and nodes[1].node_id[:12] in msg and "no result is computed" in msg, msg
    assert knn.tally.tokens == 32  # nothing of the failed batch was counted from the other shards
