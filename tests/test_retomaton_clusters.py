"""RetoMaton's optional states (k-means clusters of the entries): against the pointer algorithm
with clusters written here on plain Python lists; one entry per cluster is RetoMaton without
clusters, bit for bit; knnlm-retomaton-cluster recovers well-separated groups and its file is
refused with another datastore."""

import math

import faiss
import numpy as np
import pytest
import torch

from knnlm import KNNLM, Datastore, DatastoreWriter, FaissRetriever, RetoMatonRetriever, Context
from knnlm.errors import ConfigError, IncompleteError, MismatchError
from knnlm.offline.retomaton_clusters import cluster_datastore, main as cluster_main

D, V, K = 8, 5, 4


def ref_retomaton_clusters(keys, vals, follows, cluster, queries, targets, k, min_pointers, max_pointers, temperature):
    """One stream, token by token: (searched?, sorted candidate ids, log p_kNN(target))."""
    def dist(i, q):
        return sum((float(a) - float(b)) ** 2 for a, b in zip(keys[i], q))

    out, pointers = [], []
    for q, t in zip(queries, targets):
        searched = len(pointers) < min_pointers
        if searched:
            d_all = [dist(i, q) for i in range(len(keys))]
            ids = sorted(range(len(keys)), key=lambda i: d_all[i])[:k]
        else:
            ids = list(pointers)
            if len(ids) < max_pointers:
                # clusters by how many pointers they hold (most first), ties: the nearer pointer's first
                counts = {}
                for p in pointers:
                    counts[cluster[p]] = counts.get(cluster[p], 0) + 1
                order = sorted(counts, key=lambda c: (-counts[c], [cluster[p] for p in pointers].index(c)))
                for c in order:
                    for i in range(len(keys)):
                        if cluster[i] == c and i not in ids and len(ids) < max_pointers:
                            ids.append(i)
        ds = [dist(i, q) for i in ids]
        s = [-d / temperature for d in ds]
        top = max(s)
        num = sum(math.exp(x - top) for x, i in zip(s, ids) if vals[i] == t)
        den = sum(math.exp(x - top) for x in s)
        out.append((searched, sorted(ids), math.log(num / den) if num > 0 else -math.inf))
        order = sorted(range(len(ids)), key=lambda j: ds[j])
        pointers = [ids[j] + 1 for j in order if vals[ids[j]] == t and follows[ids[j]]][:max_pointers]
    return out


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    rng = np.random.default_rng(0)
    text = rng.integers(0, V, size=201)
    keys = rng.normal(size=(200, D)).astype(np.float32)
    prefix = str(tmp_path_factory.mktemp("reto_cl") / "ds")
    w = DatastoreWriter(prefix, D, keytype="x", dict_size=V, dict_fingerprint="f", extra={"sample_break_mode": "none"})
    w.add(keys, text[1:])
    w.finalize()
    ds = Datastore.open(prefix)
    index = faiss.IndexFlatL2(D)
    index.add(keys)
    streams = []
    for start, n in ((20, 30), (120, 25)):
        streams.append((keys[start:start + n] + 0.05 * rng.normal(size=(n, D)).astype(np.float32),
                        text[start + 1:start + 1 + n]))
    streams.append((rng.normal(size=(12, D)).astype(np.float32), rng.integers(0, V, size=12)))
    return ds, index, keys, text[1:], streams


def _run(memorised, clusters, min_pointers, max_pointers):
    ds, index, keys, vals, streams = memorised
    reto = RetoMatonRetriever(FaissRetriever(index, ds, k=K), min_pointers=min_pointers, max_pointers=max_pointers,
                              clusters=clusters)
    q = torch.from_numpy(np.concatenate([s[0] for s in streams]))
    t = torch.from_numpy(np.concatenate([s[1] for s in streams]))
    scored = KNNLM(reto, lmbda=0.5, temperature=2.0).score(q, t, torch.full((len(q),), -1.0),
                                                           context=Context(lengths=[len(s[0]) for s in streams]))
    return reto, scored


@pytest.mark.parametrize("min_pointers, max_pointers", [(1, 4), (2, 6), (1, 12)])
def test_clusters_match_the_reference(memorised, min_pointers, max_pointers):
    ds, index, keys, vals, streams = memorised
    cluster = np.random.default_rng(1).integers(0, 40, size=len(keys))  # ~5 entries a cluster
    reto, scored = _run(memorised, cluster, min_pointers, max_pointers)
    follows = [True] * (len(keys) - 1) + [False]
    want = [r for qs, ts in streams for r in ref_retomaton_clusters(
        keys, vals, follows, cluster.tolist(), qs, ts, K, min_pointers, max_pointers, 2.0)]
    assert reto.last_searched.tolist() == [w[0] for w in want]
    got_ids = [sorted(i for i, v in zip(row.tolist(), ok.tolist()) if v)
               for row, ok in zip(scored.neighbors.ids, scored.neighbors.valid)]
    assert got_ids == [w[1] for w in want]
    ref = np.array([w[2] for w in want])
    got = scored.lp_knn.numpy().astype(np.float64)
    assert np.array_equal(np.isinf(got), np.isinf(ref))
    np.testing.assert_allclose(got[np.isfinite(got)], ref[np.isfinite(ref)], atol=1e-5)
    # Clusters add candidates: some followed token is scored against more entries than pointers alone give.
    assert max(len(w[1]) for w in want if not w[0]) > 1
    assert f"min-pointers {min_pointers}, {cluster.max() + 1} clusters: " in reto.describe()


def test_one_entry_per_cluster_is_retomaton_without_clusters(memorised):
    ds, _, keys, *_ = memorised
    a_reto, a = _run(memorised, None, 1, 4)
    b_reto, b = _run(memorised, np.arange(len(keys)), 1, 4)
    assert torch.equal(a.final, b.final) and torch.equal(a.neighbors.dense().ids, b.neighbors.dense().ids)
    assert torch.equal(a_reto.last_searched, b_reto.last_searched)


def test_cluster_command_finds_separated_groups_and_is_refused_elsewhere(tmp_path, memorised, capsys):
    rng = np.random.default_rng(0)
    centers = np.array([[0] * D, [50] * D, [-50] * D], np.float32)
    group = rng.integers(0, 3, size=300)
    keys = centers[group] + rng.normal(size=(300, D)).astype(np.float32)
    prefix = str(tmp_path / "blobs")
    w = DatastoreWriter(prefix, D, keytype="x", dict_size=V, dict_fingerprint="f", extra={"sample_break_mode": "none"})
    w.add(keys, rng.integers(0, V, size=300))
    w.finalize()
    out = str(tmp_path / "clusters.npy")
    assert cluster_main([prefix, out, "--clusters", "3", "--sample", "200"]) == 0
    assert "300 entries in 3 clusters" in capsys.readouterr().out
    ids = np.load(out)
    assert ids.shape == (300,)
    # Same group <=> same cluster: the partition is the groups'.
    assert all(len(set(ids[group == g])) == 1 for g in range(3)) and len(set(ids.tolist())) == 3
    blobs = Datastore.open(prefix)
    index = faiss.IndexFlatL2(D)
    index.add(keys)
    RetoMatonRetriever(FaissRetriever(index, blobs, k=K), clusters=out)  # accepted with its own datastore
    ds, other_index, *_ = memorised
    with pytest.raises(MismatchError, match="belong to datastore"):
        RetoMatonRetriever(FaissRetriever(other_index, ds, k=K), clusters=out)
    with pytest.raises(IncompleteError, match="meta.json"):
        RetoMatonRetriever(FaissRetriever(index, blobs, k=K), clusters=str(tmp_path / "none.npy"))
    with pytest.raises(ConfigError, match="already holds clusters"):
        cluster_datastore(prefix, out, 3, sample=200)
    with pytest.raises(ConfigError, match="--clusters must lie"):
        cluster_datastore(prefix, str(tmp_path / "x.npy"), 0)
    with pytest.raises(ConfigError, match="one non-negative cluster id per entry"):
        RetoMatonRetriever(FaissRetriever(index, blobs, k=K), clusters=np.zeros(5, np.int64))


def test_through_fairseq_eval_lm(tmp_path):
    """--retomaton-cluster on the tests' tiny LM: the summary names the clusters, and the flag
    without --retomaton is refused by name."""
    import shutil
    from pathlib import Path

    from tests.conftest import eval_lm, knn_summary

    old = Path(__file__).resolve().parent / "data" / "format_v1"
    for name in ("bin", "lm", "dstore"):
        shutil.copytree(old / name, tmp_path / name)
    clusters = str(tmp_path / "clusters.npy")
    cluster_datastore(str(tmp_path / "dstore" / "train"), clusters, 8)
    common = ["--tokens-per-sample", "64", "--context-window", "32", "--gen-subset", "test", "--knnlm",
              "--dstore-filename", tmp_path / "dstore" / "train", "--indexfile", tmp_path / "dstore" / "knn.index",
              "--k", "16", "--probe", "4", "--lmbda", "0.25", "--knn-temp", "2.0", "--retomaton-cluster", clusters]
    run = eval_lm(str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), *common, "--retomaton")
    assert "retomaton min-pointers 1, 8 clusters: " in run.stderr and math.isfinite(knn_summary(run.stderr)[1])
    refused = eval_lm(str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), *common, check=False)
    assert refused.returncode != 0 and "--retomaton-cluster is an option of RetoMaton: add --retomaton" in refused.stderr
