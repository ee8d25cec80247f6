"""Adaptive retrieval (He et al. 2021, section 4): the LM features against numpy, the retriever
in its limit (nothing skipped: the plain kNN-LM bit for bit) and with tokens skipped (exactly
the lowest-scored ones get p_LM alone, the base searched with only the kept queries), the
trainer on an export whose answer is known, the refusals, and the whole path through
fairseq-eval-lm on the tests' tiny LM."""

import json
import math
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch

from knnlm import KNNLM, AdaptiveRetriever, Context, Datastore, DatastoreWriter, FaissRetriever, Predictor
from knnlm.errors import ConfigError, CorruptError, KNNLMError, MismatchError
from knnlm.retrieval.adaptive.features import feature_names, lm_features
from knnlm.retrieval.adaptive import train as trainer
from knnlm.offline.export import ExportWriter, load_export
from knnlm.retrieval.adaptive.retriever import CALIBRATION_POINTS, build_net
from tests.helpers import EvalLM, knn_argv
from tests.conftest import knn_summary

D, V, K = 8, 5, 4
OLD = Path(__file__).resolve().parent / "data" / "format_v1"


# ----------------------------------------------------------------------------- features
def test_features_equal_a_numpy_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(7, 30)) * 3
    logits[2, :5] = -np.inf  # tokens of probability 0 add nothing to the entropy
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    p = np.exp(lp)
    ent = np.array([-sum(pi * li for pi, li in zip(pr, lr) if pi > 0) for pr, lr in zip(p, lp)])
    top = -np.sort(-lp, axis=1)[:, :4]
    got = lm_features(torch.from_numpy(lp), top_k=4, chunk_rows=3)
    assert got.dtype == torch.float32 and got.shape == (7, 5)
    np.testing.assert_allclose(got[:, 0].numpy(), ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:, 1:].numpy(), top, rtol=1e-6)
    # the hand case: uniform over 4 of 30 words -> entropy log 4, top-4 all log(1/4), 5th -inf
    u = torch.full((1, 30), -math.inf)
    u[0, :4] = math.log(0.25)
    f = lm_features(u, top_k=5)[0]
    assert f[0].item() == pytest.approx(math.log(4)) and torch.all(f[1:5] == math.log(0.25)) and f[5] == -math.inf
    # any leading shape, any chunk size, fp16 input computed in fp32
    three = lm_features(torch.from_numpy(lp).view(7, 1, 30), top_k=4)
    assert torch.equal(three.view(7, 5), lm_features(torch.from_numpy(lp), top_k=4, chunk_rows=256))
    assert feature_names(2) == ["entropy", "top1_log_prob", "top2_log_prob"]
    assert lm_features(torch.from_numpy(lp).half(), top_k=2).dtype == torch.float32


# ----------------------------------------------------------------------------- the retriever
class Counting:
    """A base retriever that records the queries of each call."""

    def __init__(self, base):
        self.base, self.calls = base, []
        self.datastore, self.k, self.sim_func = base.datastore, base.k, base.sim_func

    def retrieve(self, queries, context=None, *, nearest_first=True):
        self.calls.append(queries.clone())
        return self.base.retrieve(queries, context, nearest_first=nearest_first)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(200, D)).astype(np.float32)
    prefix = str(tmp_path_factory.mktemp("adaptive") / "ds")
    w = DatastoreWriter(prefix, D, keytype="x", dict_size=V, dict_fingerprint="f", model_fingerprint="m")
    w.add(keys, rng.integers(0, V, size=200))
    w.finalize()
    ds = Datastore.open(prefix)
    index = faiss.IndexFlatL2(D)
    index.add(keys)
    n = 60
    queries = torch.from_numpy(keys[rng.integers(0, 200, n)] + 0.3 * rng.normal(size=(n, D)).astype(np.float32))
    targets = torch.from_numpy(rng.integers(0, V, n))
    lp_lm = torch.log_softmax(torch.from_numpy(rng.normal(size=(n, V)).astype(np.float32)), -1)
    feats = lm_features(lp_lm, top_k=3)
    return ds, index, queries, targets, lp_lm.gather(1, targets[:, None]).squeeze(1), feats


def make_predictor(feats, ds, seed=0, top_k=3, objective="lambda"):
    """A predictor with random weights, calibrated on `feats`, tied to datastore `ds`."""
    torch.manual_seed(seed)
    net = build_net(1 + top_k, [6])
    with torch.no_grad():
        logits = net(feats).squeeze(-1).double().numpy()
    cal = np.quantile(logits, np.linspace(0, 1, CALIBRATION_POINTS))
    return Predictor.from_net(net, hidden=[6], mean=[0.0] * (1 + top_k), std=[1.0] * (1 + top_k), top_k=top_k,
                              calibration=cal, info={"datastore": ds.prefix, "datastore_fingerprint": ds.fingerprint,
                                                     "dict_fingerprint": "f", "model_fingerprint": "m",
                                                     "lmbda": 0.3, "temperature": 2.0}, objective=objective)


@pytest.mark.parametrize("how", [{"skip": 0.0}, {"threshold": 0.0}, {}])
def test_nothing_skipped_is_the_plain_knnlm_bit_for_bit(small, how):
    ds, index, q, t, lp_lm, feats = small
    plain = KNNLM(FaissRetriever(index, ds, k=K), lmbda=0.3, temperature=2.0).score(q, t, lp_lm)
    base = Counting(FaissRetriever(index, ds, k=K))
    ad = AdaptiveRetriever(base, make_predictor(feats, ds), **how)
    knn = KNNLM(ad, lmbda=0.3, temperature=2.0)
    got = knn.score(q, t, lp_lm, context=Context(lm_features=feats))
    assert torch.equal(got.final, plain.final) and torch.equal(got.lp_knn, plain.lp_knn)
    assert len(base.calls) == 1 and torch.equal(base.calls[0], q)
    ref = KNNLM(FaissRetriever(index, ds, k=K), lmbda=0.3, temperature=2.0)
    ref.score(q, t, lp_lm)
    assert knn.summary() == ref.summary()
    assert knn.tally.searched == len(q) and "0.0% of 60 searches saved" in knn.describe()


@pytest.mark.parametrize("skip", [0.25, 0.5, 0.9])
def test_skip_gives_p_lm_to_exactly_the_lowest_scored_and_searches_only_the_rest(small, skip):
    ds, index, q, t, lp_lm, feats = small
    pred = make_predictor(feats, ds)
    plain = KNNLM(FaissRetriever(index, ds, k=K), lmbda=0.3, temperature=2.0).score(q, t, lp_lm)
    base = Counting(FaissRetriever(index, ds, k=K))
    knn = KNNLM(AdaptiveRetriever(base, pred, skip=skip), lmbda=0.3, temperature=2.0)
    got = knn.score(q, t, lp_lm, context=Context(lm_features=feats))
    # the expected decision, from the predictor's scores ranked here
    scores = pred.scores(feats).numpy()
    order = np.argsort(scores, kind="stable")
    n_skip = int(round(skip * len(q)))  # calibrated on these very features: the quantile is exact up to ties
    kept = np.ones(len(q), bool)
    kept[order[:n_skip]] = False
    assert np.array_equal(got.neighbors.retrieved.numpy(), kept)
    assert torch.equal(got.final[~torch.from_numpy(kept)], lp_lm[~torch.from_numpy(kept)])
    assert torch.equal(got.final[torch.from_numpy(kept)], plain.final[torch.from_numpy(kept)])
    assert len(base.calls) == 1 and torch.equal(base.calls[0], q[torch.from_numpy(kept)])
    assert knn.tally.searched == int(kept.sum())
    pct = 100 * (1 - kept.mean())
    assert f"adaptive skip {skip:g}: {pct:.1f}% of 60 searches saved" in knn.describe()
    # a threshold (a predicted lambda) keeps the tokens at or above it
    lam = torch.sigmoid(pred.scores(feats))
    cut = float(lam.median())
    got2 = KNNLM(AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred, threshold=cut), lmbda=0.3,
                 temperature=2.0).score(q, t, lp_lm, context=Context(lm_features=feats))
    assert torch.equal(got2.neighbors.retrieved, pred.scores(feats) >= math.log(cut / (1 - cut)))


def test_everything_skipped_searches_nothing(small):
    ds, index, q, t, lp_lm, feats = small
    base = Counting(FaissRetriever(index, ds, k=K))
    knn = KNNLM(AdaptiveRetriever(base, make_predictor(feats, ds), threshold=1.0), lmbda=0.3)
    got = knn.score(q, t, lp_lm, context=Context(lm_features=feats))
    assert base.calls == [] and torch.equal(got.final, lp_lm) and knn.tally.searched == 0


# ----------------------------------------------------------------------------- the trainer
def synthetic_export(path, n=3000, seed=0):
    """p_kNN helps (carries the target) exactly where the LM is unsure (high entropy)."""
    rng = np.random.default_rng(seed)
    ent = rng.uniform(0, 4, n).astype(np.float32)
    top = -np.sort(rng.uniform(0.1, 3, (n, 8)), axis=1).astype(np.float32) - ent[:, None] / 4
    lp_lm = np.where(ent > 2, -4.0, -0.7).astype(np.float32) + rng.normal(0, 0.05, n).astype(np.float32)
    lp_knn = np.where(ent > 2, -0.05, -12.0).astype(np.float32)
    w = ExportWriter(str(path), 0, sim_func="l2", temperature=1.0, lmbda=0.25, feature_names=feature_names(8),
                     meta={"datastore": "ds", "datastore_fingerprint": "fp", "dict_fingerprint": "f",
                           "model_fingerprint": "m", "dim": 8, "dict_size": V})
    for s in range(0, n, 1000):
        w.add(lp_lm[s:s + 1000], lp_knn[s:s + 1000], np.zeros(min(1000, n - s), np.int64),
              features=np.concatenate([ent[:, None], top], 1)[s:s + 1000])
    w.finalize()
    return path


@pytest.mark.parametrize("objective", ["lambda", "gain"])
def test_trainer_learns_where_pknn_helps(tmp_path, capsys, objective):
    exp = synthetic_export(tmp_path / "export")
    assert load_export(str(exp)).features.shape == (3000, 9)
    out = tmp_path / "pred.json"
    assert trainer.main(["train", str(exp), "--out", str(out), "--epochs", "15", "--plot", str(tmp_path / "c.png"),
                         "--objective", objective]) == 0
    text = capsys.readouterr().out
    assert "held out (the last 20% of the export)" in text and (tmp_path / "c.png").stat().st_size > 0
    pred = Predictor.load(str(out))
    held = pred.meta["heldout_curve"]
    assert held["tokens"] == 600 and pred.meta["training"]["tokens"] == 2400
    assert pred.meta["members"] == trainer.ENSEMBLE == pred.meta["training"]["ensemble"]
    at = {round(r["skip_target"], 1): r for r in held["rows"]}
    # Half the tokens have low entropy (p_kNN useless there): skipping them costs nothing, and
    # is far better than skipping half at random.
    assert abs(at[0.5]["skipped"] - 0.5) < 0.06
    assert at[0.4]["ppl"] <= held["knnlm_ppl"] * 1.001
    assert at[0.4]["ppl"] < 0.8 * at[0.4]["ppl_random"]
    # the learned lambda (or gain) separates the two kinds of tokens
    e = load_export(str(exp))
    high = torch.from_numpy(np.array(e.features[:, 0]) > 2)
    if objective == "lambda":
        lam = pred.lmbda(torch.from_numpy(np.array(e.features)))
        assert lam[high].mean() > 0.8 and lam[~high].mean() < 0.2
    else:  # the true gains: log(0.25 e^-0.05 + 0.75 e^-4) + 4 = 2.62 where p_kNN helps, log 0.75 = -0.29 elsewhere
        gain = pred.scores(torch.from_numpy(np.array(e.features)))
        assert gain[high].mean() - gain[~high].mean() > 1.5 and float(gain[high].min()) > float(gain[~high].median())
        with pytest.raises(ConfigError, match="not a lambda"):
            pred.lmbda(torch.from_numpy(np.array(e.features)))
    # deterministic: the same seed gives the same file's weights
    assert trainer.main(["train", str(exp), "--out", str(tmp_path / "again.json"), "--epochs", "15",
                         "--objective", objective]) == 0
    assert Predictor.load(str(tmp_path / "again.json")).meta["params"] == pred.meta["params"]
    # the curve on a whole export
    assert trainer.main(["curve", str(exp), "--predictor", str(out)]) == 0
    assert "| 50% |" in capsys.readouterr().out


def test_ensemble_is_the_mean_of_its_seeds_networks(tmp_path, small):
    """fit(members=3) holds exactly the networks fit(seed=s) trains for s = 0, 1, 2; the
    ensemble's score is the mean of theirs; saved and loaded it scores the same, a changed member
    count fails the checksum, and a version 1 file (one network, no members field) still loads."""
    exp = load_export(str(synthetic_export(tmp_path / "export", n=600)))
    x, a, b = (np.array(v, dtype=np.float32) for v in (exp.features, exp.lp_lm, exp.lp_knn))
    ens, mean, std = trainer.fit(x, a, b, epochs=2, seed=0, members=3, progress=False)
    singles = [trainer.fit(x, a, b, epochs=2, seed=s, progress=False) for s in range(3)]
    assert len(ens) == 3
    for member, (net, m, sd) in zip(ens, singles):
        assert torch.equal(m, mean) and torch.equal(sd, std)
        for (k, v), (k2, v2) in zip(member.state_dict().items(), net.state_dict().items()):
            assert k == k2 and torch.equal(v, v2)
    z = (torch.from_numpy(x) - mean) / std
    with torch.no_grad():
        by_hand = sum(net(z).squeeze(-1).double() for net, _, _ in singles) / 3
        assert torch.allclose(ens(z).squeeze(-1).double(), by_hand, atol=1e-6)
    ds = small[0]
    info = {"datastore": ds.prefix, "datastore_fingerprint": ds.fingerprint, "lmbda": 0.25, "temperature": 1.0}
    pred = Predictor.from_net(ens, hidden=[32, 32], mean=mean.tolist(), std=std.tolist(), top_k=8,
                              calibration=np.linspace(-1, 1, CALIBRATION_POINTS), info=info)
    pred.save(str(tmp_path / "ens.json"))
    back = Predictor.load(str(tmp_path / "ens.json"))
    assert back.meta["members"] == 3 and back.meta["format_version"] == 2
    assert torch.equal(back.scores(torch.from_numpy(x)), pred.scores(torch.from_numpy(x)))
    assert torch.allclose(back.scores(torch.from_numpy(x)).double(), by_hand, atol=1e-5)
    meta = json.loads((tmp_path / "ens.json").read_text())
    meta["members"] = 2
    (tmp_path / "fewer.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptError, match="fails its checksum"):
        Predictor.load(str(tmp_path / "fewer.json"))
    one = Predictor.from_net(singles[0][0], hidden=[32, 32], mean=mean.tolist(), std=std.tolist(), top_k=8,
                             calibration=np.linspace(-1, 1, CALIBRATION_POINTS), info=info)
    one.save(str(tmp_path / "one.json"))
    meta = json.loads((tmp_path / "one.json").read_text())
    assert meta["members"] == 1
    del meta["members"]
    meta["format_version"] = 1
    (tmp_path / "v1.json").write_text(json.dumps(meta))
    assert torch.equal(Predictor.load(str(tmp_path / "v1.json")).scores(torch.from_numpy(x)),
                       one.scores(torch.from_numpy(x)))
    with pytest.raises(ConfigError, match="--ensemble"):
        trainer.fit(x, a, b, members=0, progress=False)


# ----------------------------------------------------------------------------- refusals
def test_refusals(small, tmp_path, capsys):
    ds, index, q, t, lp_lm, feats = small
    pred = make_predictor(feats, ds)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="--adaptive-skip .* in \\[0, 1\\)"):
            AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred, skip=bad)
    with pytest.raises(ConfigError, match="--adaptive-threshold"):
        AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred, threshold=2.0)
    # a gain predictor's threshold is a gain in nats: any number; below every score keeps every token
    gp = make_predictor(feats, ds, objective="gain")
    low = float(gp.scores(feats).min()) - 1
    assert bool(AdaptiveRetriever(FaissRetriever(index, ds, k=K), gp, threshold=low).keep(feats).all())
    with pytest.raises(ConfigError, match="predicted gain in nats"):
        AdaptiveRetriever(FaissRetriever(index, ds, k=K), gp, threshold=float("nan"))
    with pytest.raises(ConfigError, match="not both"):
        AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred, skip=0.1, threshold=0.1)
    with pytest.raises(ConfigError, match="LM's features"):
        AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred).retrieve(q)
    with pytest.raises(ConfigError, match="takes 4 features"):
        AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred).retrieve(q, Context(lm_features=feats[:, :2]))
    # another datastore (here: another model's, other keys)
    w = DatastoreWriter(str(tmp_path / "other"), D, keytype="x", dict_size=V, dict_fingerprint="f")
    w.add(np.ones((10, D), np.float32), np.zeros(10, np.int64))
    w.finalize()
    other = Datastore.open(str(tmp_path / "other"))
    flat = faiss.IndexFlatL2(D)
    flat.add(np.ones((10, D), np.float32))
    with pytest.raises(MismatchError, match="was trained on an export scored with datastore"):
        AdaptiveRetriever(FaissRetriever(flat, other, k=2), pred)
    with pytest.raises(MismatchError, match="other model weights"):
        pred.check_compatible(identity={"dict_fingerprint": "f", "model_fingerprint": "another"})
    # corrupt and foreign files
    path = tmp_path / "pred.json"
    pred.save(str(path))
    with pytest.raises(KNNLMError, match="already exists"):
        pred.save(str(path))
    meta = json.loads(path.read_text())
    meta["params"]["0.weight"][0][0] += 1.0
    (tmp_path / "tampered.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptError, match="fails its checksum"):
        Predictor.load(str(tmp_path / "tampered.json"))
    (tmp_path / "half.json").write_text(path.read_text()[:100])
    with pytest.raises(CorruptError, match="unreadable"):
        Predictor.load(str(tmp_path / "half.json"))
    (tmp_path / "foreign.json").write_text(json.dumps({"format": "knnlm-export"}))
    with pytest.raises(CorruptError, match="not an adaptive-retrieval predictor"):
        Predictor.load(str(tmp_path / "foreign.json"))
    with pytest.raises(KNNLMError, match="no adaptive-retrieval predictor"):
        Predictor.load(str(tmp_path / "missing.json"))
    assert trainer.main(["train", str(OLD / "export"), "--out", str(tmp_path / "p.json"), "--ensemble", "0"]) == 2
    assert "--ensemble must be at least 1" in capsys.readouterr().err
    # an export written before features existed
    assert trainer.main(["train", str(OLD / "export"), "--out", str(tmp_path / "p.json")]) == 2
    assert "has no LM features (features.npy)" in capsys.readouterr().err


# ----------------------------------------------------------------------------- fairseq-eval-lm
@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    e = EvalLM(tmp_path_factory.mktemp("evallm_adaptive"))
    yield e
    e.close()


def test_through_fairseq_eval_lm(ev, tmp_path, capsys):
    """Export with features, train, then: skip 0 is the plain kNN-LM's summary exactly; skip 0.5
    saves half the searches; bad options and another model's predictor are refused by name."""
    for name in ("bin", "lm", "dstore"):
        shutil.copytree(OLD / name, tmp_path / name)
    common = ["--tokens-per-sample", "64", "--context-window", "32", "--gen-subset", "test", "--knnlm",
              "--dstore-filename", tmp_path / "dstore" / "train", "--indexfile", tmp_path / "dstore" / "knn.index",
              "--k", "16", "--probe", "4", "--lmbda", "0.25", "--knn-temp", "2.0"]
    argv = lambda *extra: knn_argv(str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), *common, *extra)  # noqa: E731
    exported = ev.run(argv("--knnlm-dump-probs", tmp_path / "export", "--softmax-batch", "100"))
    e = load_export(str(tmp_path / "export"))
    assert e.features.shape == (802, 9) and e.feature_names == feature_names()
    # the features are those of the LM's log-probs at each target's position: their top-1 is at
    # least the target's log-prob, and the entropy is positive
    assert np.all(e.features[:, 1] >= e.lp_lm - 1e-5) and np.all(e.features[:, 0] > 0)
    # each token's context: the tokens the LM read last, i.e. the previous targets, in text order
    assert e.context.shape == (802, 4)
    assert np.array_equal(e.context[1:, -1], e.targets[:-1]) and np.array_equal(e.context[1:, :-1], e.context[:-1, 1:])
    assert trainer.main(["train", str(tmp_path / "export"), "--out", str(tmp_path / "pred.json"), "--epochs", "5"]) == 0
    assert "n-gram features of orders [1, 2, 3, 4]" in capsys.readouterr().out
    assert (tmp_path / "pred.ngrams.npz").is_file()
    pred = str(tmp_path / "pred.json")
    meta = json.loads(Path(pred).read_text())
    meta["model_fingerprint"] = "0000000000000000"  # outside the checksum: the identity check catches it
    Path(tmp_path / "other_model.json").write_text(json.dumps(meta))
    shutil.copy(tmp_path / "pred.ngrams.npz", tmp_path / "other_model.ngrams.npz")
    runs = {
        "plain": argv(),
        "skip 0": argv("--adaptive-retrieval", pred, "--adaptive-skip", "0"),
        "skip 0.5": argv("--adaptive-retrieval", pred, "--adaptive-skip", "0.5"),
        "skip 1": argv("--adaptive-retrieval", pred, "--adaptive-skip", "1"),
        "no predictor": argv("--adaptive-skip", "0.5"),
        "export": argv("--adaptive-retrieval", pred, "--knnlm-dump-probs", tmp_path / "export2"),
        "other model": argv("--adaptive-retrieval", str(tmp_path / "other_model.json"), "--adaptive-skip", "0.5"),
    }
    res = dict(zip(runs, ev.run_many([{"argv": a} for a in runs.values()])))
    for name in ("plain", "skip 0", "skip 0.5"):
        assert res[name].returncode == 0, str(res[name])
    plain, zero, half = (res[n].stderr for n in ("plain", "skip 0", "skip 0.5"))
    assert knn_summary(zero) == knn_summary(plain) == knn_summary(exported.stderr)
    assert "(k=16, lambda=0.25, T=2.0, l2; adaptive skip 0: 0.0% of 802 searches saved)" in zero
    pct = float(half.split("adaptive skip 0.5: ")[1].split("%")[0])
    assert 40 < pct < 60 and math.isfinite(knn_summary(half)[1]), half[-1500:]
    assert knn_summary(half)[0] == knn_summary(plain)[0]
    for name, msg in (("skip 1", "ConfigError: --adaptive-skip is the fraction of tokens not searched, in [0, 1)"),
                      ("no predictor", "ConfigError: --adaptive-skip is an option of adaptive retrieval"),
                      ("other model", "MismatchError: predictor")):
        assert res[name].returncode != 0 and msg in res[name].stderr, (name, res[name].stderr[-1500:])
    # Issue #27: an adaptive run's export records which tokens were searched (knnlm-explain marks
    # the others); re-scoring tools, which need every token searched, open it only on request.
    assert res["export"].returncode == 0, str(res["export"])
    e = load_export(str(tmp_path / "export2"), partial_search=True)
    assert e.meta["unsearched"] == "lm_only" and e.searched.shape == (e.count,)


# ----------------------------------------------------------------------------- knnlm-hf eval
def test_through_knnlm_hf_eval(tmp_path, capsys):
    pytest.importorskip("transformers")
    from knnlm.hf.cli import main as hf
    from tests.helpers import build_index
    from tests.test_hf import WORDS, make_tokenizer, text, tiny

    tok = make_tokenizer(WORDS)
    tiny("gpt2", len(tok), seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text(text(40, 1))
    (tmp_path / "valid.txt").write_text(text(12, 2))
    model = ["--model", str(tmp_path / "model"), "--max-length", "20", "--stride", "10"]
    assert hf(["dump", *model, "--text", str(tmp_path / "train.txt"), "--dstore-mmap", str(tmp_path / "ds")]) == 0
    build_index(str(tmp_path / "ds"), str(tmp_path / "ds.index"), "Flat")
    knn = ["eval", *model, "--text", str(tmp_path / "valid.txt"), "--knnlm", "--dstore-filename", str(tmp_path / "ds"),
           "--indexfile", str(tmp_path / "ds.index"), "--k", "8", "--lmbda", "0.3", "--knn-temp", "2.0"]
    assert hf([*knn, "--knnlm-dump-probs", str(tmp_path / "export")]) == 0
    plain = capsys.readouterr().out
    e = load_export(str(tmp_path / "export"))
    assert e.features.shape == (e.count, 9) and np.all(e.features[:, 1] >= e.lp_lm - 1e-5)
    # windows of 20 every 10: each scored token read at least its 9 predecessors, so its context
    # is the previous targets (the text's first scored token excepted)
    assert np.array_equal(e.context[4:, -1], e.targets[3:-1]) and np.array_equal(e.context[4:, 0], e.targets[:-4])
    assert trainer.main(["train", str(tmp_path / "export"), "--out", str(tmp_path / "pred.json"), "--epochs", "3"]) == 0
    assert "n-gram features of orders [1, 2, 3, 4]" in capsys.readouterr().out
    assert hf([*knn, "--adaptive-retrieval", str(tmp_path / "pred.json"), "--adaptive-skip", "0"]) == 0
    zero = capsys.readouterr().out
    assert knn_summary(zero) == knn_summary(plain) and "adaptive skip 0: 0.0% of" in zero
    assert hf([*knn, "--adaptive-retrieval", str(tmp_path / "pred.json"), "--adaptive-skip", "0.5"]) == 0
    half = capsys.readouterr().out
    pct = float(half.split("adaptive skip 0.5: ")[1].split("%")[0])
    assert 35 < pct < 65 and knn_summary(half)[0] == knn_summary(plain)[0]
    assert hf([*knn, "--adaptive-skip", "0.5"]) == 2
    assert "--adaptive-skip is an option of adaptive retrieval" in capsys.readouterr().err
