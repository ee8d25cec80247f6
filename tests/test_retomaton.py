"""RetoMaton (knnlm.retrieval.retomaton) against the pointer algorithm written here on plain
Python lists, and in its limit (a threshold above k) equal to the plain kNN-LM, bit for bit."""

import math
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from knnlm import KNNLM, Datastore, DatastoreWriter, FaissRetriever, RetoMatonRetriever, Context
from knnlm.errors import ConfigError
from tests.conftest import eval_lm, knn_summary

D, V, K = 8, 5, 4


def ref_retomaton(keys, vals, follows, queries, targets, k, min_pointers, max_pointers, temperature):
    """One stream, token by token: (searched?, sorted neighbor ids, log p_kNN(target)) per token."""
    def dist(i, q):
        return sum((float(a) - float(b)) ** 2 for a, b in zip(keys[i], q))

    out, cands = [], []
    for q, t in zip(queries, targets):
        searched = len(cands) < min_pointers
        if searched:
            d_all = [dist(i, q) for i in range(len(keys))]
            ids = sorted(range(len(keys)), key=lambda i: d_all[i])[:k]
            ds = [d_all[i] for i in ids]
        else:
            ids, ds = list(cands), [dist(i, q) for i in cands]
        s = [-d / temperature for d in ds]
        top = max(s)
        num = sum(math.exp(x - top) for x, i in zip(s, ids) if vals[i] == t)
        den = sum(math.exp(x - top) for x in s)
        out.append((searched, sorted(ids), math.log(num / den) if num > 0 else -math.inf))
        order = sorted(range(len(ids)), key=lambda j: ds[j])
        cands = [ids[j] + 1 for j in order if vals[ids[j]] == t and follows[ids[j]]][:max_pointers]
    return out


@pytest.fixture(scope="module")
def memorised(tmp_path_factory):
    """A datastore over one text; two test streams copied from it (with noise) and one random."""
    rng = np.random.default_rng(0)
    text = rng.integers(0, V, size=301)
    keys = rng.normal(size=(300, D)).astype(np.float32)
    prefix = str(tmp_path_factory.mktemp("reto") / "ds")
    w = DatastoreWriter(prefix, D, keytype="x", dict_size=V, dict_fingerprint="f", extra={"sample_break_mode": "none"})
    w.add(keys, text[1:])  # entry i: the context up to token i, value: token i + 1
    w.finalize()
    ds = Datastore.open(prefix)
    index = faiss.IndexFlatL2(D)
    index.add(keys)
    streams = []
    for start, n in ((20, 30), (150, 25)):
        streams.append((keys[start:start + n] + 0.05 * rng.normal(size=(n, D)).astype(np.float32), text[start + 1:start + 1 + n]))
    streams.append((rng.normal(size=(12, D)).astype(np.float32), rng.integers(0, V, size=12)))
    return ds, index, keys, text[1:], streams


@pytest.mark.parametrize("min_pointers, max_pointers", [(1, 4), (2, 3), (3, 8)])
def test_pointers_searches_and_probabilities_match_the_reference(memorised, min_pointers, max_pointers):
    ds, index, keys, vals, streams = memorised
    follows = [True] * (len(keys) - 1) + [False]
    reto = RetoMatonRetriever(FaissRetriever(index, ds, k=K), min_pointers=min_pointers, max_pointers=max_pointers)
    knn = KNNLM(reto, lmbda=0.5, temperature=2.0)
    q = torch.from_numpy(np.concatenate([s[0] for s in streams]))
    t = torch.from_numpy(np.concatenate([s[1] for s in streams]))
    scored = knn.score(q, t, torch.full((len(q),), -1.0), context=Context(lengths=[len(s[0]) for s in streams]))
    want = [r for qs, ts in streams for r in ref_retomaton(keys, vals, follows, qs, ts, K, min_pointers, max_pointers, 2.0)]
    assert reto.last_searched.tolist() == [w[0] for w in want]
    got_ids = [sorted(i for i, v in zip(row.tolist(), ok.tolist()) if v)
               for row, ok in zip(scored.neighbors.dense().ids, scored.neighbors.dense().valid)]
    assert got_ids == [w[1] for w in want]
    ref_lp = np.array([w[2] for w in want])
    got = scored.lp_knn.numpy().astype(np.float64)
    assert np.array_equal(np.isinf(got), np.isinf(ref_lp))
    np.testing.assert_allclose(got[np.isfinite(got)], ref_lp[np.isfinite(ref_lp)], atol=1e-5)
    # The memorised streams follow pointers more often than the random one.
    assert 0 < reto.summary()["searches_saved"] < 1
    assert reto.last_searched[:55].float().mean() < reto.last_searched[-12:].float().mean()


def test_a_threshold_above_k_searches_every_token_like_the_plain_knnlm(memorised):
    ds, index, keys, vals, streams = memorised
    q = torch.from_numpy(np.concatenate([s[0] for s in streams]))
    t = torch.from_numpy(np.concatenate([s[1] for s in streams]))
    lp_lm = torch.full((len(q),), -1.5)
    plain = KNNLM(FaissRetriever(index, ds, k=K), lmbda=0.3).score(q, t, lp_lm)
    reto = RetoMatonRetriever(FaissRetriever(index, ds, k=K), min_pointers=K + 1)
    got = KNNLM(reto, lmbda=0.3).score(q, t, lp_lm, context=Context(lengths=[len(s[0]) for s in streams]))
    assert bool(reto.last_searched.all()) and reto.summary()["searches_saved"] == 0
    assert torch.equal(got.final, plain.final)


def test_refusals(memorised, tmp_path):
    ds, index, *_ = memorised
    with pytest.raises(ConfigError, match="--retomaton-min-pointers"):
        RetoMatonRetriever(FaissRetriever(index, ds, k=K), min_pointers=0)
    with pytest.raises(ConfigError, match="do_not_recomp_l2"):
        RetoMatonRetriever(FaissRetriever(index, ds, k=K, sim_func="do_not_recomp_l2"))
    w = DatastoreWriter(str(tmp_path / "eos"), D, keytype="x", dict_size=V, dict_fingerprint="f",
                        extra={"sample_break_mode": "eos"})
    w.add(np.zeros((10, D), np.float32), np.zeros(10, np.int64))
    w.finalize()
    eos = Datastore.open(str(tmp_path / "eos"))
    flat = faiss.IndexFlatL2(D)
    flat.add(np.zeros((10, D), np.float32))
    with pytest.raises(ConfigError, match="sample-break-mode eos"):
        RetoMatonRetriever(FaissRetriever(flat, eos, k=2))


OLD = Path(__file__).resolve().parent / "data" / "format_v1"


def test_through_fairseq_eval_lm(tmp_path):
    """On the tests' tiny LM and the memorised test split: a threshold above k gives the plain
    kNN-LM's perplexity exactly; the default saves searches; the summary line says how many."""
    for name in ("bin", "lm", "dstore"):
        shutil.copytree(OLD / name, tmp_path / name)
    common = ["--tokens-per-sample", "64", "--context-window", "32", "--gen-subset", "test", "--knnlm",
              "--dstore-filename", tmp_path / "dstore" / "train", "--indexfile", tmp_path / "dstore" / "knn.index",
              "--k", "16", "--probe", "4", "--lmbda", "0.25", "--knn-temp", "2.0"]
    run = lambda *extra: eval_lm(str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), *common, *extra)  # noqa: E731
    plain = knn_summary(run().stderr)
    full = run("--retomaton", "--retomaton-min-pointers", "17")
    assert knn_summary(full.stderr) == plain and "retomaton min-pointers 17: 0.0% of 802 searches saved" in full.stderr
    saved = run("--retomaton")
    text = saved.stderr
    pct = float(text.split("retomaton min-pointers 1: ")[1].split("%")[0])
    assert pct > 10, text[-1500:]
    assert math.isfinite(knn_summary(text)[1])
    # Issue #27: a RetoMaton run's export records which tokens were searched (the others were
    # scored against the pointers' entries); re-scoring opens it only on request.
    from knnlm.errors import ConfigError
    from knnlm.offline.export import load_export

    exported = eval_lm(str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), *common, "--retomaton",
                       "--knnlm-dump-probs", tmp_path / "export")
    assert knn_summary(exported.stderr) == knn_summary(text)
    e = load_export(str(tmp_path / "export"), partial_search=True)
    assert e.meta["unsearched"] == "pointers"
    assert abs(100 * (1 - e.searched.mean()) - pct) < 0.06  # the summary line's share, to its rounding
    with pytest.raises(ConfigError, match="searched only some tokens"):
        load_export(str(tmp_path / "export"))
