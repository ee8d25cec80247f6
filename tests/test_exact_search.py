"""--knn-search exact (knnlm.retrieval.exact.ExactRetriever): exact search by chunked matrix
products, keys resident on a device, the k kept re-scored in fp32.

On the CPU, as CI runs it: brute force in numpy (float64) is the reference; several "cpu"
devices stand in for GPUs in the sharded merge; fairseq-eval-lm with --knn-search exact is
compared with a FAISS IndexFlatL2 over the same keys. Also FAISS's multi-GPU clone route
(with a stand-in for GPU faiss) and the GPU benchmark's Python part at a tiny size.
"""

import re
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from knnlm import KNNLM, ExactRetriever, FaissRetriever
from knnlm.errors import ConfigError
from knnlm.index import faiss_utils
from knnlm.retrieval import exact as exact_mod
from knnlm.retrieval.exact import parse_devices
from knnlm.store import Datastore, DatastoreWriter
from knnlm.store.sharded import ShardedDatastore

from .conftest import knn_summary
from .helpers import EvalLM, build_index, knn_argv

REPO = Path(__file__).resolve().parent.parent
N, D, V = 2000, 24, 50


def make_datastore(prefix, keys, vals=None, fp16=False):
    w = DatastoreWriter(str(prefix), keys.shape[1], keytype="last_ffn_input", fp16=fp16, dict_size=V,
                        dict_fingerprint="x")
    w.add(keys, np.arange(len(keys)) % V if vals is None else vals)
    w.finalize()
    return Datastore.open(str(prefix))


def random_keys(n=N, d=D, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    keys = (rng.standard_normal((n, d)) * 2).astype(np.float32)
    if ties:  # exact duplicates: equal distances, any of them may come first
        keys[n // 2:n // 2 + 100] = keys[:100]
    return keys


def reference(keys, queries, sim):
    """float64 brute force: (N, n) distances (squared L2) or inner products."""
    k64, q64 = keys.astype(np.float64), queries.astype(np.float64)
    if sim == "dot":
        return q64 @ k64.T
    return (q64 ** 2).sum(1)[:, None] - 2 * q64 @ k64.T + (k64 ** 2).sum(1)[None, :]


def check_against(nb, keys, vals, queries, k, sim, sorted_=True):
    ref = reference(keys, queries, sim)
    order = np.sort(-ref if sim == "dot" else ref, 1)[:, :k] * (-1 if sim == "dot" else 1)
    d = nb.distances.numpy()
    ids = nb.ids.numpy()
    assert nb.distances.dtype == torch.float32 and nb.values.dtype == torch.int64 and nb.ids.dtype == torch.int64
    assert nb.valid.dtype == torch.bool and nb.valid.all() and d.shape == (len(queries), k)
    # the distances returned are the exact ones of the ids returned ...
    np.testing.assert_allclose(d, np.take_along_axis(ref, ids, 1), rtol=1e-5, atol=1e-3)
    # ... and they are the k best (ties: any of the equals)
    got = d if sorted_ else (-np.sort(-d, 1) if sim == "dot" else np.sort(d, 1))
    np.testing.assert_allclose(got, order, rtol=1e-5, atol=1e-3)
    assert (nb.values.numpy() == vals[ids]).all()
    assert len(np.unique(ids[0])) == k  # no row twice


@pytest.fixture(scope="module")
def keys():
    return random_keys()


@pytest.fixture(scope="module")
def queries():
    return (np.random.default_rng(1).standard_normal((40, D)) * 2).astype(np.float32)


@pytest.fixture(scope="module")
def ds(tmp_path_factory, keys):
    return make_datastore(tmp_path_factory.mktemp("exact") / "ds", keys)


@pytest.fixture(scope="module")
def ds16(tmp_path_factory, keys):
    return make_datastore(tmp_path_factory.mktemp("exact16") / "ds", keys, fp16=True)


@pytest.mark.parametrize("sim", ["l2", "dot"])
@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_matches_brute_force_numpy(ds, keys, queries, sim, dtype):
    k = 30
    r = ExactRetriever(ds, k=k, sim_func=sim, dtype=dtype, devices=["cpu"])
    nb = r.retrieve(torch.from_numpy(queries))
    check_against(nb, keys, np.asarray(ds.vals), queries, k, sim)
    assert r.stats["queries"] == len(queries)
    if dtype == "fp32":
        assert r.stats["uncertified"] == 0  # the a-posteriori bound proves every result exact


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "bf16"])
def test_fp16_datastore(ds16, queries, dtype):
    """fp16 keys on disk: their values are the full precision; fp16 resident keys re-score on the device."""
    keys16 = np.asarray(ds16.keys).astype(np.float32)
    r = ExactRetriever(ds16, k=25, dtype=dtype, devices=["cpu"])
    assert r.rescore_resident == (dtype in ("fp16", "fp32"))
    check_against(r.retrieve(queries), keys16, np.asarray(ds16.vals), queries, 25, "l2")


def test_any_order_keeps_the_same_neighbors(ds, queries):
    r = ExactRetriever(ds, k=40, devices=["cpu"])
    a = r.retrieve(torch.from_numpy(queries))
    b = r.retrieve(torch.from_numpy(queries), nearest_first=False)
    assert (np.diff(a.distances.numpy(), axis=1) >= 0).all()  # nearest first
    for x, y in ((a.distances, b.distances), (a.values, b.values)):
        assert torch.equal(x.sort(1).values, y.sort(1).values)


def test_chunking_and_lazy_device(ds, keys, queries):
    """Tiny score chunks (many merges) give the same neighbors; devices=None loads on the queries' device."""
    whole = ExactRetriever(ds, k=20, dtype="fp16", devices=["cpu"]).retrieve(queries)
    lazy = ExactRetriever(ds, k=20, dtype="fp16", score_chunk_bytes=4096)
    assert lazy.shards is None
    chunked = lazy.retrieve(torch.from_numpy(queries))
    assert lazy.devices == ["cpu"] and chunked.distances.device.type == "cpu"
    torch.testing.assert_close(whole.distances, chunked.distances)
    check_against(chunked, keys, np.asarray(ds.vals), queries, 20, "l2")
    # a float16 query tensor (an --fp16 model's keys) is searched as fp32
    h = ExactRetriever(ds, k=20, devices=["cpu"]).retrieve(torch.from_numpy(queries).half())
    check_against(h, keys, np.asarray(ds.vals), torch.from_numpy(queries).half().float().numpy(), 20, "l2")


def test_half_precision_reorders_and_the_margin_recovers(tmp_path):
    """A dozen keys closer together than fp16's resolution (the rest far away): rounding them
    reorders the neighbors. Without a margin the fp16 pass keeps the wrong k (their distances
    are still the exact fp32 ones of the keys kept, and the bound flags the query); with the
    default margin (k + 32 candidates) the k are the exact k nearest, certified."""
    rng = np.random.default_rng(0)
    d, n, k, close = 8, 400, 3, 12
    base = rng.uniform(1.0, 2.0, size=d).astype(np.float32)
    keys = (rng.standard_normal((n, d)) * 3 + 6).astype(np.float32)
    keys[:close] = base + rng.uniform(0, 2.0 ** -10, size=(close, d))  # within one fp16 ulp of each other
    q = (base + 0.3).astype(np.float32)[None]
    store = make_datastore(tmp_path / "close", keys)
    exact = reference(keys, q, "l2")[0]
    rounded = reference(keys.astype(np.float16).astype(np.float32), q, "l2")[0]
    true_k = set(np.argsort(exact, kind="stable")[:k])
    assert set(np.argsort(rounded, kind="stable")[:k]) != true_k  # fp16 really reorders them

    tight = ExactRetriever(store, k=k, dtype="fp16", devices=["cpu"], candidate_factor=1, candidate_margin=0)
    nb = tight.retrieve(q)
    ids = nb.ids.numpy()[0]
    assert set(ids) != true_k  # the fp16 pass alone picks other keys ...
    np.testing.assert_allclose(nb.distances.numpy()[0], exact[ids], rtol=1e-6, atol=1e-9)  # ... scored exactly
    assert tight.stats["uncertified"] == 1  # and the bound says it cannot vouch for them

    margin = ExactRetriever(store, k=k, dtype="fp16", devices=["cpu"])  # k + 32 candidates
    nb = margin.retrieve(q)
    assert set(nb.ids.numpy()[0]) == true_k and margin.stats["uncertified"] == 0
    np.testing.assert_allclose(nb.distances.numpy()[0], np.sort(exact)[:k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("sim", ["l2", "dot"])
def test_sharded_merge_equals_one_shard(tmp_path, sim):
    keys = random_keys(seed=5, ties=False)
    q = (np.random.default_rng(6).standard_normal((30, D)) * 2).astype(np.float32)
    store = make_datastore(tmp_path / "one", keys)
    one = ExactRetriever(store, k=50, sim_func=sim, dtype="fp16", devices=["cpu"]).retrieve(q)
    many = ExactRetriever(store, k=50, sim_func=sim, dtype="fp16", devices=["cpu"] * 3)
    assert [(s.start, s.stop) for s in many.shards] == [(0, 667), (667, 1333), (1333, 2000)]
    three = many.retrieve(q)
    for a, b in ((one.ids, three.ids), (one.values, three.values)):
        assert torch.equal(a, b)
    torch.testing.assert_close(one.distances, three.distances)
    # a datastore dumped in shards (a manifest) reads the same, rows straddling its shards
    parts = [make_datastore(tmp_path / f"part{i}", keys[a:b], np.arange(a, b) % V)
             for i, (a, b) in enumerate(((0, 700), (700, 2000)))]
    sharded = ShardedDatastore(parts)
    split = ExactRetriever(sharded, k=50, sim_func=sim, dtype="fp16", devices=["cpu"] * 4).retrieve(q)
    assert torch.equal(one.ids, split.ids) and torch.equal(one.values, split.values)
    torch.testing.assert_close(one.distances, split.distances)


def test_knnlm_in_python_equals_faiss_flat(ds, keys, queries):
    """KNNLM(ExactRetriever(...)) scores as KNNLM(FaissRetriever(IndexFlatL2)); describe() names it."""
    flat = faiss.IndexFlatL2(D)
    flat.add(keys)
    targets = torch.from_numpy(np.asarray(ds.vals)[:len(queries)].astype(np.int64))
    lp_lm = torch.full((len(queries),), -3.0)
    a = KNNLM(ExactRetriever(ds, k=16, devices=["cpu"]), lmbda=0.4, temperature=5.0)
    b = KNNLM(FaissRetriever(flat, ds, k=16), lmbda=0.4, temperature=5.0)
    sa, sb = a.score(torch.from_numpy(queries), targets, lp_lm), b.score(torch.from_numpy(queries), targets, lp_lm)
    torch.testing.assert_close(sa.final, sb.final, rtol=1e-5, atol=1e-5)
    assert a.summary()["ppl"] == pytest.approx(b.summary()["ppl"], rel=1e-6)
    assert b.describe() == "k=16, lambda=0.4, T=5.0, l2"
    assert a.describe() == "k=16, lambda=0.4, T=5.0, l2, exact"
    full = a.next_token_log_probs(torch.from_numpy(queries), torch.log_softmax(torch.randn(len(queries), V), -1))
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(len(queries)))


def test_refusals_by_name(ds, tmp_path):
    with pytest.raises(ConfigError, match=r"does not fit on cpu: its 2,000 x 24 keys as fp16 .* need [0-9,]+ bytes .* "
                                          r"but 1,000,000 bytes .* allowed"):
        ExactRetriever(ds, k=8, dtype="fp16", devices=["cpu"], memory_budget=1_000_000)
    need = ExactRetriever(ds, k=8, dtype="fp16", devices=["cpu"]).required_bytes(ds.size, torch.device("cpu"))
    assert need == 2000 * (32 * 2 + 8) + exact_mod.SCORE_CHUNK_BYTES["cpu"] + exact_mod.RESCORE_CHUNK_BYTES["cpu"]
    ExactRetriever(ds, k=8, dtype="fp16", devices=["cpu"], memory_budget=need)  # just fits
    with pytest.raises(ConfigError, match="does not fit on cpu: its 2,000 x 24"):  # two shards, one device: they add up
        ExactRetriever(ds, k=8, dtype="fp16", devices=["cpu", "cpu"], memory_budget=need - 1)
    with pytest.raises(ConfigError, match="exceeds the 2,000 entries"):
        ExactRetriever(ds, k=2001, devices=["cpu"])
    with pytest.raises(ConfigError, match="--k must be at least 1"):
        ExactRetriever(ds, k=0, devices=["cpu"])
    with pytest.raises(ConfigError, match="do_not_recomp_l2 needs --knn-search faiss"):
        ExactRetriever(ds, k=8, sim_func="do_not_recomp_l2")
    with pytest.raises(ConfigError, match="--knn-exact-dtype must be one of auto, fp32, fp16, bf16"):
        ExactRetriever(ds, k=8, dtype="int8")
    with pytest.raises(ConfigError, match="candidate_factor must be"):
        ExactRetriever(ds, k=8, candidate_factor=0.5)
    with pytest.raises(ConfigError, match="do not match the datastore's dimension 24"):
        ExactRetriever(ds, k=8, devices=["cpu"]).retrieve(np.zeros((2, 5), np.float32))
    big = make_datastore(tmp_path / "big", np.full((10, 4), 1e5, np.float32))
    with pytest.raises(ConfigError, match="exceed its range"):
        ExactRetriever(big, k=2, dtype="fp16", devices=["cpu"])
    ExactRetriever(big, k=2, dtype="bf16", devices=["cpu"])  # bf16 holds them
    # FAISS's GPU cap stays a refusal by name, checked before any GPU work
    wide = make_datastore(tmp_path / "wide", random_keys(n=2100, d=4, ties=False))
    flat = faiss.IndexFlatL2(4)
    flat.add(np.asarray(wide.keys))
    with pytest.raises(ConfigError, match="above FAISS's GPU limit of 2048 neighbors.*--knn-search exact"):
        FaissRetriever(flat, wide, k=2049, gpu=True)


@pytest.mark.parametrize("change, message", [
    ({}, None),
    ({"indexfile": "ignored.index"}, None),
    ({"dstore_filename": None}, "--knnlm --knn-search exact needs --dstore-filename PREFIX (no index file)"),
    ({"knn_sim_func": "do_not_recomp_l2"}, "do_not_recomp_l2 needs --knn-search faiss"),
    ({"no_load_keys": True}, "searches the keys themselves: drop --no-load-keys"),
    ({"knn_k_factor": 2.0}, "--knn-k-factor re-ranks FAISS's candidates"),
    ({"knn_search": "faiss"}, "--knnlm needs both --dstore-filename PREFIX and --indexfile INDEX"),
])
def test_task_validation_with_exact_search(change, message):
    """validate(): --knn-search exact needs no --indexfile; the options it has no use for are refused."""
    import argparse
    import dataclasses

    from fairseq_plugins.config import KNNLMConfig
    from fairseq_plugins.task import validate

    defaults = KNNLMConfig()
    a = argparse.Namespace(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(KNNLMConfig)})
    assert a.knn_search == "faiss" and a.knn_exact_dtype == "auto" and a.knn_exact_devices is None
    vars(a).update({"knnlm": True, "dstore_filename": "ds", "knn_search": "exact", **change})
    if message is None:
        validate(a)
    else:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(a)


def test_parse_devices():
    assert parse_devices(None) is None and parse_devices("") is None
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    assert parse_devices("all") == ([f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cpu"])
    with pytest.raises(ConfigError, match="is not a device"):
        parse_devices("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA device"):
            parse_devices("cuda:0")


def test_faiss_multi_gpu_route_shards_with_a_common_quantizer(monkeypatch):
    """With more than one GPU (a stand-in for GPU faiss here), --knn-gpu shards the index over
    all of them with index_cpu_to_all_gpus(shard=True, common_ivf_quantizer=True)."""
    calls = {}

    class Options:
        pass

    def to_all(index, co=None, ngpu=-1):
        calls.update(index=index, shard=co.shard, common=co.common_ivf_quantizer, fp16=co.useFloat16, ngpu=ngpu)
        return "sharded"

    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", Options, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all, raising=False)
    quantizer = faiss.IndexFlatL2(8)
    ivfpq = faiss.IndexIVFPQ(quantizer, 8, 4, 2, 8)
    out, on_gpu = faiss_utils.maybe_to_gpu(ivfpq, True, "test", all_gpus=True)
    assert (out, on_gpu) == ("sharded", True)
    assert calls == {"index": ivfpq, "shard": True, "common": True, "fp16": True, "ngpu": 2}


def test_gpu_benchmark_runs_at_tiny_size():
    p = subprocess.run([sys.executable, "-m", "benchmarks.exact_gpu", "--tiny"], capture_output=True,
                       text=True, timeout=120, cwd=str(REPO))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "exact search:" in p.stdout and "recall vs brute force: 1.0000" in p.stdout, p.stdout


# ----------------------------------------------------------------------------- through fairseq-eval-lm
@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    e = EvalLM(tmp_path_factory.mktemp("evallm_exact"))
    yield e
    e.close()


TPS = ("--tokens-per-sample", "64")
SETTING = ("--k", "8", "--lmbda", "0.3", "--knn-temp", "2.0")


def test_eval_lm_exact_equals_faiss_flat(tiny, ev, tmp_path):
    prefix = tmp_path / "train"
    ev.run(knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--gen-subset", "train", "--save-knnlm-dstore",
                    "--dstore-mmap", prefix))
    build_index(str(prefix), f"{prefix}.flat", factory="Flat")
    base = knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--knnlm", "--dstore-filename", prefix, *SETTING)
    runs = {
        "faiss": [*base, "--indexfile", f"{prefix}.flat"],
        "exact": [*base, "--knn-search", "exact"],  # no --indexfile
        "exact sharded fp16": [*base, "--knn-search", "exact", "--knn-exact-devices", "cpu,cpu",
                               "--knn-exact-dtype", "fp16"],
        "exact do_not_recomp_l2": [*base, "--knn-search", "exact", "--knn-sim-func", "do_not_recomp_l2"],
        "bad search": [*base, "--knn-search", "annoy"],
    }
    res = dict(zip(runs, ev.run_many([{"argv": a} for a in runs.values()])))
    for name in ("faiss", "exact", "exact sharded fp16"):
        assert res[name].returncode == 0, str(res[name])
    want = knn_summary(res["faiss"].output)
    assert knn_summary(res["exact"].output) == want
    # fp16 search over two shards finds the same distances; where several keys tie exactly at
    # the k-th distance (repeated contexts of the tiny corpus), another of them may be kept
    assert knn_summary(res["exact sharded fp16"].output) == pytest.approx(want, rel=1e-4)
    assert "(k=8, lambda=0.3, T=2.0, l2)" in res["faiss"].output  # the FAISS line, unchanged
    assert "(k=8, lambda=0.3, T=2.0, l2, exact)" in res["exact"].output
    bad = res["exact do_not_recomp_l2"]
    assert bad.returncode != 0 and "ConfigError: --knn-search exact computes exact distances" in bad.output
    assert "Traceback" not in bad.output
    assert res["bad search"].returncode != 0 and "invalid choice: 'annoy'" in res["bad search"].output
