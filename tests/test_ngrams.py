"""The n-gram features of adaptive retrieval (He et al. 2021, section 4: freq and fert) against
plain-Python counting, context extraction by hand, and the predictor files that carry them."""

import collections
import os

import faiss
import numpy as np
import pytest
import torch

from knnlm import Context

from knnlm import KNNLM, AdaptiveRetriever, Datastore, DatastoreWriter, FaissRetriever, Predictor
from knnlm.errors import ConfigError, CorruptError, KNNLMError
from knnlm.retrieval.adaptive.features import TokenFeatures, lm_features
from knnlm.retrieval.adaptive.ngrams import NgramStats, context_tokens, feature_names
from knnlm.retrieval.adaptive.retriever import CALIBRATION_POINTS, build_net, stats_path


def brute_counts(text, n):
    """context n-gram (tuple) -> (count, set of next tokens), over text[i-n..i-1] -> text[i]."""
    seen = collections.defaultdict(lambda: [0, set()])
    for i in range(n, len(text)):
        g = tuple(text[i - n:i])
        seen[g][0] += 1
        seen[g][1].add(text[i])
    return seen


def test_counts_and_fertility_equal_plain_python_counting():
    rng = np.random.default_rng(0)
    text = rng.integers(0, 6, 3000)  # a small vocabulary: n-grams repeat, with varied continuations
    stats = NgramStats.build(text)
    ctx = np.concatenate([
        np.stack([text[i - 4:i] for i in rng.integers(4, len(text), 300)]),   # seen contexts
        rng.integers(0, 6, (100, 4)),                                           # some unseen at order 4
        np.array([[-1, -1, -1, 2], [-1, -1, 3, 1], [-1, 5, 0, 2], [7, 7, 7, 7]]),  # text starts; an unknown id
    ])
    feats = stats.features(ctx)
    assert feats.shape == (len(ctx), 8) and stats.feature_names == feature_names((1, 2, 3, 4))
    for n in (1, 2, 3, 4):
        ref = brute_counts(text.tolist(), n)
        for row, c in zip(ctx, feats):
            g = tuple(row[4 - n:].tolist())
            count, nexts = (0, set()) if -1 in g or g not in ref else (ref[g][0], ref[g][1])
            assert c[2 * (n - 1)] == pytest.approx(np.log1p(count)), (n, g)
            assert c[2 * (n - 1) + 1] == pytest.approx(np.log1p(len(nexts))), (n, g)
    # the counts of order 1 add up to the text's length less one
    u, counts, _ = stats.tables[1]
    assert counts.sum() == len(text) - 1 and len(u) == 6


def test_context_tokens_by_hand():
    tokens = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]])
    rows, cols = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 3, 2, 4])
    got = context_tokens(tokens, cols, rows=rows)
    assert got.tolist() == [[-1, -1, -1, 5], [5, 6, 7, 8], [-1, 1, 2, 3], [2, 3, 4, 0]]
    assert context_tokens(tokens[1], torch.tensor([1]), order=2).tolist() == [[1, 2]]


def _store(tmp_path, n=300, d=8, v=12, seed=3):
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(n, d)).astype(np.float32)
    vals = rng.integers(0, v, n)
    prefix = str(tmp_path / "ds")
    w = DatastoreWriter(prefix, d, keytype="x", dict_size=v, dict_fingerprint="f", model_fingerprint="m")
    w.add(keys, vals)
    w.finalize()
    return Datastore.open(prefix), keys, vals


def _predictor(ds, stats, lm_feats, ctx, top_k=3, seed=0):
    torch.manual_seed(seed)
    f = 1 + top_k + len(stats.feature_names)
    net = build_net(f, [5])
    pred = Predictor.from_net(net, hidden=[5], mean=[0.0] * f, std=[1.0] * f, top_k=top_k, calibration=[0.0, 1.0],
                              info={"datastore": ds.prefix, "datastore_fingerprint": ds.fingerprint,
                                    "lmbda": 0.3, "temperature": 2.0}, ngrams=stats)
    with torch.no_grad():
        s = pred.scores(pred.inputs(TokenFeatures(lm_feats, ctx))).double().numpy()
    pred.calibration = np.quantile(s, np.linspace(0, 1, CALIBRATION_POINTS))
    pred.meta["calibration"] = pred.calibration.tolist()
    return pred


def test_predictor_with_ngram_features_saves_loads_and_refuses_a_changed_or_missing_table(tmp_path):
    ds, keys, vals = _store(tmp_path)
    stats = NgramStats.build(ds.vals)
    rng = np.random.default_rng(0)
    lm = lm_features(torch.log_softmax(torch.from_numpy(rng.normal(size=(40, 12)).astype(np.float32)), -1), 3)
    ctx = torch.from_numpy(np.stack([vals[i - 4:i] for i in rng.integers(4, 300, 40)]))
    pred = _predictor(ds, stats, lm, ctx)
    path = str(tmp_path / "pred.json")
    pred.save(path)
    assert os.path.isfile(stats_path(path)) and stats_path(path).endswith("pred.ngrams.npz")
    back = Predictor.load(path)
    assert back.needs_context and back.feature_names[-8:] == feature_names()
    x = TokenFeatures(lm, ctx)
    assert torch.equal(back.scores(back.inputs(x)), pred.scores(pred.inputs(x)))
    with pytest.raises(ConfigError, match="n-gram features"):
        back.inputs(lm)  # no context
    # other statistics in their place (another text): refused by the recorded checksum
    NgramStats.build(np.roll(ds.vals, 7)).save(stats_path(path), overwrite=True)
    with pytest.raises(CorruptError, match="n-gram statistics"):
        Predictor.load(path)
    os.remove(stats_path(path))
    with pytest.raises(KNNLMError, match="are missing"):
        Predictor.load(path)


def test_nothing_skipped_with_ngram_features_is_the_plain_knnlm_bit_for_bit(tmp_path):
    ds, keys, vals = _store(tmp_path)
    stats = NgramStats.build(ds.vals)
    rng = np.random.default_rng(1)
    n = 50
    q = torch.from_numpy(keys[rng.integers(0, 300, n)] + 0.2 * rng.normal(size=(n, 8)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 12, n))
    lp = torch.log_softmax(torch.from_numpy(rng.normal(size=(n, 12)).astype(np.float32)), -1)
    lp_lm = lp.gather(1, t[:, None]).squeeze(1)
    ctx = torch.from_numpy(np.stack([vals[i - 4:i] for i in rng.integers(4, 300, n)]))
    x = TokenFeatures(lm_features(lp, 3), ctx)
    pred = _predictor(ds, stats, x.lm, ctx)
    index = faiss.IndexFlatL2(8)
    index.add(keys)
    plain = KNNLM(FaissRetriever(index, ds, k=16), lmbda=0.3, temperature=2.0).score(q, t, lp_lm)
    got = KNNLM(AdaptiveRetriever(FaissRetriever(index, ds, k=16), pred, skip=0.0), lmbda=0.3,
                temperature=2.0).score(q, t, lp_lm, context=Context(lm_features=x.lm, context_tokens=x.context))
    assert torch.equal(got.final, plain.final)
    # skipping half: the skipped ones are the lowest scored on LM + n-gram features, and get p_LM
    ad = AdaptiveRetriever(FaissRetriever(index, ds, k=16), pred, skip=0.5)
    half = KNNLM(ad, lmbda=0.3, temperature=2.0).score(q, t, lp_lm, context=Context(lm_features=x.lm, context_tokens=x.context))
    kept = pred.scores(pred.inputs(x)) >= ad.cut
    assert torch.equal(half.neighbors.retrieved, kept) and 0 < int(kept.sum()) < n
    assert torch.equal(half.final[~kept], lp_lm[~kept]) and torch.equal(half.final[kept], plain.final[kept])


def test_the_trainer_counts_the_exports_own_datastore_and_refuses_another(tmp_path):
    from types import SimpleNamespace

    from knnlm.errors import MismatchError
    from knnlm.retrieval.adaptive.train import ngram_stats

    ds, _, vals = _store(tmp_path)
    export = SimpleNamespace(path="E", meta={"datastore": ds.prefix, "datastore_fingerprint": ds.fingerprint})
    stats = ngram_stats(export)
    assert stats.meta["datastore_fingerprint"] == ds.fingerprint and stats.tables[1][1].sum() == len(vals) - 1
    (tmp_path / "other").mkdir()
    other, _, _ = _store(tmp_path / "other", seed=4)
    with pytest.raises(MismatchError, match="wrong n-gram counts"):
        ngram_stats(export, other.prefix)
