"""Datastore pruning by greedy merging (knnlm.store.prune) and reduced keys (knnlm.store.reduce):
each against a reference written here, each in its limit equal to the plain kNN-LM, and each
refused with the wrong index or the wrong model."""

import math
import faiss
import numpy as np
import pytest
import torch

from knnlm import KNNLM, Datastore, DatastoreWriter, FaissRetriever, Neighbors, Retriever
from knnlm.artefacts import write_json_atomic
from knnlm.errors import MismatchError
from knnlm.offline import prune as pr
from knnlm.store.reduce import reduce_keys

D, V = 8, 6


def make_datastore(prefix, keys, vals):
    w = DatastoreWriter(str(prefix), keys.shape[1], keytype="x", dict_size=V, dict_fingerprint="dict",
                        model_fingerprint="weights", extra={"sample_break_mode": "none"})
    w.add(keys, vals)
    w.finalize()
    return Datastore.open(str(prefix))


def flat_index(ds, path):
    index = faiss.IndexFlatL2(ds.dim)
    index.add(np.ascontiguousarray(np.asarray(ds.keys, dtype=np.float32)))
    faiss.write_index(index, str(path))
    write_json_atomic(f"{path}.meta.json", {"complete": True, "datastore_fingerprint": ds.fingerprint,
                                            "datastore": ds.prefix, "metric": "l2", "ntotal": ds.size, "dim": ds.dim})
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, D)) * 4
    which = rng.integers(0, 12, size=600)
    keys = (centers[which] + 0.3 * rng.normal(size=(600, D))).astype(np.float32)
    vals = (which % V).astype(np.int64)  # neighbors in a cluster mostly share a value: merging has work
    noisy = rng.random(600) < 0.2
    vals[noisy] = rng.integers(0, V, size=int(noisy.sum()))  # some disagree with their cluster
    ds = make_datastore(root / "ds", keys, vals)
    queries = torch.from_numpy((centers[rng.integers(0, 12, size=50)] + 0.5 * rng.normal(size=(50, D))).astype(np.float32))
    targets = torch.from_numpy(rng.integers(0, V, size=50))
    return {"root": root, "ds": ds, "index": flat_index(ds, root / "ds.index"), "keys": keys, "vals": vals,
            "queries": queries, "targets": targets, "lp_lm": torch.full((50,), math.log(1 / V))}


def test_weighted_neighbor_softmax_by_hand():
    """p(k_i) ∝ w_i exp(-d_i / T): distances 1, 2, 3, weights 2, 1, 1, values 7, 8, 7, T = 1."""
    class Fixed(Retriever):
        datastore = type("DS", (), {"weighted": False, "query_transform": lambda self: None})()
        k, sim_func = 3, "l2"

        def retrieve(self, queries, context=None, *, nearest_first=True):
            return Neighbors(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[7, 8, 7]]),
                             torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0, 1, 2]]),
                             weights=torch.tensor([[2.0, 1.0, 1.0]]))

    knn = KNNLM(Fixed(), lmbda=1.0, temperature=1.0)
    lp = knn.score(torch.zeros(1, 4), torch.tensor([7]), torch.tensor([-1.0])).lp_knn
    e = math.exp
    want = math.log((2 * e(-1) + e(-3)) / (2 * e(-1) + e(-2) + e(-3)))
    assert lp.item() == pytest.approx(want, abs=1e-6)


def ref_greedy(vals, table, seed):
    """The merge of He et al. on plain lists, visiting rows in the module's documented order."""
    n = len(vals)
    w = [1] * n
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(np.arange(0, n, pr.BLOCK_ROWS))
    for b in blocks:
        rows = list(range(b, min(n, b + pr.BLOCK_ROWS)))
        for r in rng.permutation(len(rows)).tolist():
            i = rows[r]
            if w[i] <= 0:
                continue
            for j in table[i]:
                if j >= 0 and w[j] == 1 and vals[j] == vals[i]:
                    w[j], w[i] = 0, w[i] + 1
    return w


def test_greedy_merge_matches_the_reference_and_keeps_the_total_weight(data, tmp_path):
    ds = data["ds"]
    index = faiss.read_index(data["index"])
    table = pr.neighbor_table(ds, index, 5, str(tmp_path / "t.npy"))
    assert not (np.asarray(table) == np.arange(ds.size)[:, None]).any()  # an entry is not its own neighbor
    w = pr.greedy_merge(np.asarray(ds.vals), table, seed=3)
    assert w.tolist() == ref_greedy(np.asarray(ds.vals).tolist(), np.asarray(table).tolist(), 3)
    assert w.sum() == ds.size and (w == 0).sum() > ds.size // 4


def test_pruned_datastore_scores_with_its_weights(data, tmp_path):
    out = tmp_path / "pruned"
    meta = pr.prune(data["ds"].prefix, data["index"], str(out), k=5, seed=3)
    pruned = Datastore.open(str(out))
    assert meta["size"] == pruned.size < data["ds"].size and meta["pruned_from_fingerprint"] == data["ds"].fingerprint
    w = pruned.gather_weights(np.arange(pruned.size))
    assert w.sum() == data["ds"].size
    # Against a brute-force weighted kNN-LM over the pruned entries.
    knn = KNNLM(FaissRetriever(flat_index(pruned, tmp_path / "p.index"), pruned, k=8), lmbda=0.5, temperature=3.0)
    got = knn.score(data["queries"], data["targets"], data["lp_lm"]).final.numpy()
    keys, vals = np.asarray(pruned.keys, np.float64), np.asarray(pruned.vals)
    for q, t, g in zip(data["queries"].numpy().astype(np.float64), data["targets"].numpy(), got):
        d = ((keys - q) ** 2).sum(1)
        nn = np.argsort(d, kind="stable")[:8]
        s = np.log(w[nn]) - d[nn] / 3.0
        p = np.exp(s - s.max())
        p_knn = p[vals[nn] == t].sum() / p.sum()
        assert g == pytest.approx(math.log(0.5 * p_knn + 0.5 / V), abs=1e-5)


def test_pruning_that_merges_nothing_is_the_plain_knnlm(data, tmp_path):
    """Distinct values everywhere: nothing merges; the copy scores bit for bit like the original."""
    keys = data["keys"][:V]
    ds = make_datastore(tmp_path / "distinct", keys, np.arange(V))
    pr.prune(ds.prefix, flat_index(ds, tmp_path / "d.index"), str(tmp_path / "same"), k=3)
    same = Datastore.open(str(tmp_path / "same"))
    assert same.size == V and same.gather_weights(np.arange(V)).tolist() == [1] * V
    a = KNNLM(FaissRetriever(flat_index(ds, tmp_path / "a.index"), ds, k=4), lmbda=0.3)
    b = KNNLM(FaissRetriever(flat_index(same, tmp_path / "b.index"), same, k=4), lmbda=0.3)
    args = (data["queries"], data["targets"] % V, data["lp_lm"])
    assert torch.equal(a.score(*args).final, b.score(*args).final)


def test_reduced_keys_keeping_every_dimension_keep_the_distances(data, tmp_path):
    reduce_keys(data["ds"].prefix, str(tmp_path / "pca"), D, n_train=600)
    red = Datastore.open(str(tmp_path / "pca"))
    assert red.dim == D and red.model_dim == D and red.meta["transform"]["method"] == "pca"
    plain = KNNLM(FaissRetriever(data["index"], data["ds"], k=8), lmbda=0.5, temperature=2.0)
    pca = KNNLM(FaissRetriever(flat_index(red, tmp_path / "r.index"), red, k=8), lmbda=0.5, temperature=2.0)
    args = (data["queries"], data["targets"], data["lp_lm"])
    p, r = plain.score(*args), pca.score(*args)
    assert torch.equal(p.neighbors.ids.sort(1).values, r.neighbors.ids.sort(1).values)
    torch.testing.assert_close(r.neighbors.distances.sort(1).values, p.neighbors.distances.sort(1).values,
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(r.final, p.final, rtol=0, atol=1e-4)


def test_reduced_keys_of_half_the_dimension(data, tmp_path):
    meta = reduce_keys(data["ds"].prefix, str(tmp_path / "half"), D // 2, n_train=600)
    red = Datastore.open(str(tmp_path / "half"))
    assert red.dim == D // 2 and red.model_dim == D and meta["bytes"] < data["ds"].meta["bytes"]
    knn = KNNLM(FaissRetriever(flat_index(red, tmp_path / "h.index"), red, k=8), lmbda=0.5)
    assert torch.isfinite(knn.score(data["queries"], data["targets"], data["lp_lm"]).final).all()
    # The model's states are D-dimensional: the reduced datastore still belongs to the same model.
    red.check_compatible(dim=D, keytype="x", dict_size=V, dict_fingerprint="dict", model_fingerprint="weights")


@pytest.mark.parametrize("kind", ["pruned", "reduced"])
def test_derived_datastores_refuse_the_wrong_index_and_model(data, tmp_path, kind):
    out = str(tmp_path / kind)
    if kind == "pruned":
        pr.prune(data["ds"].prefix, data["index"], out, k=5)
    else:
        reduce_keys(data["ds"].prefix, out, D, n_train=600)
    derived = Datastore.open(out)
    with pytest.raises(MismatchError, match="was built from datastore"):
        FaissRetriever(data["index"], derived, k=4)  # the source's index, not the derived datastore's
    with pytest.raises(MismatchError, match="different model weights"):
        derived.check_compatible(dim=D, keytype="x", dict_size=V, dict_fingerprint="dict", model_fingerprint="other")
    with pytest.raises(MismatchError, match="dimension"):
        derived.check_compatible(dim=D + 1, keytype="x")


def test_through_fairseq_eval_lm(tmp_path):
    """The tiny LM's datastore pruned and reduced to half its dimension, each with its own index,
    scored by fairseq-eval-lm with the usual flags: finite perplexities near the full kNN-LM's."""
    import shutil
    from pathlib import Path

    from tests.conftest import eval_lm, knn_summary, run

    old = Path(__file__).resolve().parent / "data" / "format_v1"
    for name in ("bin", "lm", "dstore"):
        shutil.copytree(old / name, tmp_path / name)
    src = str(tmp_path / "dstore" / "train")
    run(["knnlm-prune", src, str(tmp_path / "dstore" / "knn.index"), str(tmp_path / "pruned"), "--k", "5", "--probe", "16"])
    run(["knnlm-reduce", src, str(tmp_path / "pca16"), "--dim", "16"])
    ppl = {}
    for name in ("dstore/train", "pruned", "pca16"):
        prefix = str(tmp_path / name)
        index = flat_index(Datastore.open(prefix), f"{prefix}.flat")
        out = eval_lm(str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), "--tokens-per-sample", "64",
                      "--context-window", "32", "--gen-subset", "test", "--knnlm", "--dstore-filename", prefix,
                      "--indexfile", index, "--k", "16", "--lmbda", "0.25", "--knn-temp", "2.0")
        ppl[name] = knn_summary(out.stderr)[1]
    assert all(math.isfinite(p) for p in ppl.values())
    assert abs(ppl["pruned"] / ppl["dstore/train"] - 1) < 0.1 and abs(ppl["pca16"] / ppl["dstore/train"] - 1) < 0.1, ppl


def test_a_pruned_copy_of_reduced_keys_keeps_their_query_transform(data, tmp_path):
    """Issue #26's stacked rows (PCA + pruned): pruning a PCA datastore into another directory
    carries the transform file along, and queries go through the very same transform."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    reduce_keys(data["ds"].prefix, str(tmp_path / "a" / "half"), D // 2, n_train=600)
    red = Datastore.open(str(tmp_path / "a" / "half"))
    pr.prune(red.prefix, flat_index(red, tmp_path / "a" / "half.index"), str(tmp_path / "b" / "pruned"), k=1)
    pruned = Datastore.open(str(tmp_path / "b" / "pruned"))
    assert (tmp_path / "b" / "pruned_transform.faiss").is_file()
    assert pruned.meta["transform"]["file"] == "pruned_transform.faiss" and pruned.model_dim == D
    q = data["queries"]
    assert torch.equal(pruned.query_transform()(q), red.query_transform()(q))
    knn = KNNLM(FaissRetriever(flat_index(pruned, tmp_path / "p.index"), pruned, k=8), lmbda=0.5)
    assert torch.isfinite(knn.score(q, data["targets"], data["lp_lm"]).final).all()
    # the source's transform file gone: the copy does not depend on it
    (tmp_path / "a" / "half_transform.faiss").unlink()
    assert torch.equal(Datastore.open(str(tmp_path / "b" / "pruned")).query_transform()(q), pruned.query_transform()(q))
