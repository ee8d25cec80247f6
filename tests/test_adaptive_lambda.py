"""--adaptive-lambda (issue #26): each searched token mixed with the predictor's own lambda.

Against a float64 hand computation on a tiny datastore (scoring and the whole next-token
distribution), the option off equal to the constant-lambda kNN-LM bit for bit, the refusals
by name, and one run through knnlm-hf eval checked against its own export."""

import json
import math

import numpy as np
import pytest
import torch

from knnlm import KNNLM, AdaptiveRetriever, Context, FaissRetriever
from knnlm.errors import ConfigError
from knnlm.options import ExportOptions, RetrievalOptions, validate
from knnlm.retrieval.adaptive.features import TokenFeatures, lm_features
from knnlm.scoring import interpolate
from tests.test_adaptive import K, V, make_predictor, small  # noqa: F401  (small: the shared fixture)

T, LMBDA = 2.0, 0.3


def hand_p_knn(ds, q, k=K, temperature=T):
    """(N, V) float64 p_kNN: exact squared L2 to every key, the k nearest, softmax of -d / T."""
    keys = np.asarray(ds.gather_keys(np.arange(ds.size)), np.float64)
    vals = np.asarray(ds.gather_vals(np.arange(ds.size)), np.int64)
    d = ((q.double().numpy()[:, None, :] - keys[None]) ** 2).sum(-1)
    out = np.zeros((len(q), V))
    for i, row in enumerate(d):
        near = np.argsort(row, kind="stable")[:k]
        w = np.exp(-row[near] / temperature - (-row[near] / temperature).max())
        np.add.at(out[i], vals.reshape(-1)[near], w / w.sum())
    return out


def predicted_lambda(pred, feats):
    return 1 / (1 + np.exp(-pred.scores(feats).double().numpy()))


@pytest.mark.parametrize("skip", [0.0, 0.5])
def test_per_token_lambda_equals_a_hand_computation(small, skip):  # noqa: F811
    ds, index, q, t, lp_lm, feats = small
    pred = make_predictor(feats, ds)
    knn = KNNLM(AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred, skip=skip, per_token_lambda=True),
                lmbda=LMBDA, temperature=T)
    got = knn.score(q, t, lp_lm, context=Context(lm_features=feats))
    lam = predicted_lambda(pred, feats)
    assert got.neighbors.lmbda is not None and got.neighbors.lmbda.dtype == torch.float32
    np.testing.assert_allclose(got.neighbors.lmbda.double().numpy(), lam, rtol=1e-6)
    assert len(set(np.round(lam, 3))) > 10  # truly per token, not one number
    p_knn = hand_p_knn(ds, q)[np.arange(len(q)), t.numpy()]
    p_lm = np.exp(lp_lm.double().numpy())
    want = np.log(lam * p_knn + (1 - lam) * p_lm)
    searched = got.neighbors.searched_mask().numpy()
    assert searched.mean() == (1.0 if skip == 0 else pytest.approx(0.5, abs=0.05))
    np.testing.assert_allclose(got.final.double().numpy()[searched], want[searched], rtol=1e-5, atol=1e-6)
    # unsearched tokens: p_LM alone, exactly
    assert torch.equal(got.final[~torch.from_numpy(searched)], lp_lm[~torch.from_numpy(searched)])
    # and it is not the constant lambda's result
    const = np.log(LMBDA * p_knn + (1 - LMBDA) * p_lm)
    assert np.abs(got.final.double().numpy()[searched] - const[searched]).max() > 1e-3
    summary = knn.describe()
    assert "lambda=per-token (predicted)" in summary and f"adaptive skip {skip:g}, per-token lambda:" in summary


def test_next_token_distribution_with_per_token_lambda(small):  # noqa: F811
    ds, index, q, t, _, _ = small
    rng = np.random.default_rng(5)
    full = torch.log_softmax(torch.from_numpy(rng.normal(size=(len(q), V)).astype(np.float32)), -1)
    feats = lm_features(full, top_k=3)
    pred = make_predictor(feats, ds, seed=3)
    knn = KNNLM(AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred, skip=0.5, per_token_lambda=True),
                lmbda=LMBDA, temperature=T)
    got = knn.next_token_log_probs(q, full).double().numpy()
    lam = predicted_lambda(pred, feats)
    want = np.log(lam[:, None] * hand_p_knn(ds, q) + (1 - lam[:, None]) * np.exp(full.double().numpy()))
    kept = knn.retriever.last_kept.numpy()
    assert 0 < kept.sum() < len(q)
    np.testing.assert_allclose(got[kept], want[kept], rtol=1e-5, atol=1e-6)
    assert np.array_equal(got[~kept], full.double().numpy()[~kept])
    # the same numbers as scoring the targets
    scored = knn.score(q, t, full.gather(1, t[:, None]).squeeze(1), context=Context(lm_features=feats))
    np.testing.assert_allclose(got[np.arange(len(q)), t.numpy()], scored.final.double().numpy(), rtol=1e-5, atol=1e-6)


def test_lambda_zero_and_one_are_exact(small):  # noqa: F811
    ds, index, *_ = small
    knn = KNNLM(FaissRetriever(index, ds, k=K), lmbda=LMBDA)
    lp_lm = torch.tensor([-1.5, -2.0, -0.7, -3.0])
    lp_knn = torch.tensor([-0.2, -0.4, float("-inf"), -1.0])
    out = knn.mix(lp_lm, lp_knn, None, torch.tensor([0.0, 1.0, 0.5, 0.25]))
    assert out[0] == lp_lm[0] and out[1] == lp_knn[1]
    assert out[2].item() == pytest.approx(math.log(0.5) - 0.7, rel=1e-6)
    assert out[3].item() == pytest.approx(math.log(0.25 * math.exp(-1.0) + 0.75 * math.exp(-3.0)), rel=1e-6)


@pytest.mark.parametrize("skip", [0.0, 0.5])
def test_option_off_is_the_constant_lambda_bit_for_bit(small, skip):  # noqa: F811
    ds, index, q, t, lp_lm, feats = small
    pred = make_predictor(feats, ds)
    off = KNNLM(AdaptiveRetriever(FaissRetriever(index, ds, k=K), pred, skip=skip), lmbda=LMBDA, temperature=T)
    got = off.score(q, t, lp_lm, context=Context(lm_features=feats))
    assert got.neighbors.lmbda is None and "per-token" not in off.describe()
    plain = KNNLM(FaissRetriever(index, ds, k=K), lmbda=LMBDA, temperature=T).score(q, t, lp_lm)
    kept = got.neighbors.searched_mask()
    # today's formula, on the same p_kNN: the constant lambda, p_LM where not searched
    assert torch.equal(got.final[kept], interpolate(lp_lm, plain.lp_knn, LMBDA)[kept])
    assert torch.equal(got.final[kept], plain.final[kept]) and torch.equal(got.final[~kept], lp_lm[~kept])
    assert f"(k={K}, lambda={LMBDA}, T={T}, l2; adaptive skip {skip:g}: " in f"({off.describe()}"


def test_refusals(small, tmp_path):  # noqa: F811
    ds, index, q, t, lp_lm, feats = small
    gain = make_predictor(feats, ds, objective="gain")
    with pytest.raises(ConfigError, match="--adaptive-lambda .* has objective 'gain'.*--objective lambda"):
        AdaptiveRetriever(FaissRetriever(index, ds, k=K), gain, per_token_lambda=True)
    AdaptiveRetriever(FaissRetriever(index, ds, k=K), gain)  # without the option, a gain predictor is fine
    opts = dict(knnlm=True, dstore_filename=str(tmp_path / "ds"), indexfile=str(tmp_path / "i"))
    with pytest.raises(ConfigError, match="--adaptive-lambda is an option of adaptive retrieval: add "
                                          "--adaptive-retrieval PREDICTOR"):
        validate(RetrievalOptions(**opts, adaptive_lambda=True))
    with pytest.raises(ConfigError, match="--adaptive-lambda .* an export"):
        validate(RetrievalOptions(**opts, adaptive_retrieval="p.json", adaptive_lambda=True),
                 export=ExportOptions(knnlm_dump_probs=str(tmp_path / "e")))
    validate(RetrievalOptions(**opts, adaptive_retrieval="p.json", adaptive_lambda=True))  # accepted
    with pytest.raises(ConfigError, match="--adaptive-lambda is an option of kNN-LM scoring"):
        validate(RetrievalOptions(adaptive_lambda=True))


def test_through_knnlm_hf_eval(tmp_path, capsys):
    """The per-token perplexity of knnlm-hf eval --adaptive-lambda equals the one computed from
    the plain run's export (its p_LM, p_kNN, features) and the predictor's lambdas."""
    pytest.importorskip("transformers")
    from knnlm.hf.cli import main as hf
    from knnlm.offline.export import load_export
    from knnlm.retrieval.adaptive import train as trainer
    from knnlm.retrieval.adaptive.retriever import Predictor
    from tests.conftest import knn_summary
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
    assert trainer.main(["train", str(tmp_path / "export"), "--out", str(tmp_path / "pred.json"), "--epochs", "3"]) == 0
    capsys.readouterr()
    adaptive = [*knn, "--adaptive-retrieval", str(tmp_path / "pred.json"), "--adaptive-lambda"]
    assert hf([*adaptive, "--adaptive-skip", "0", "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["per_token_lambda"] is True
    assert "lambda=per-token (predicted)" in out and "adaptive skip 0, per-token lambda: 0.0% of" in out
    e = load_export(str(tmp_path / "export"))
    pred = Predictor.load(str(tmp_path / "pred.json"))
    state = TokenFeatures(torch.from_numpy(np.array(e.features)), np.array(e.context))
    lam = 1 / (1 + np.exp(-pred.scores(pred.inputs(state)).double().numpy()))
    final = np.log(lam * np.exp(np.array(e.lp_knn, np.float64)) + (1 - lam) * np.exp(np.array(e.lp_lm, np.float64)))
    want = math.exp(-final.mean())
    base, ppl = knn_summary(out)
    assert base == knn_summary(plain)[0] and ppl == pytest.approx(want, abs=1e-4 + 1e-6 * want)
    assert ppl != knn_summary(plain)[1]
    # with half the tokens skipped it still runs; refused with an export, by name
    assert hf([*adaptive, "--adaptive-skip", "0.5"]) == 0
    assert "adaptive skip 0.5, per-token lambda:" in capsys.readouterr().out
    assert hf([*adaptive, "--knnlm-dump-probs", str(tmp_path / "export2")]) == 2
    assert "--adaptive-lambda mixes each token with its own predicted lambda" in capsys.readouterr().err


def test_through_fairseq_eval_lm(tmp_path, capsys):
    """The same check through fairseq-eval-lm: its flag exists and mixes with the predicted lambdas."""
    import shutil

    from knnlm.offline.export import load_export
    from knnlm.retrieval.adaptive import train as trainer
    from knnlm.retrieval.adaptive.retriever import Predictor
    from tests.conftest import knn_summary
    from tests.helpers import EvalLM, knn_argv
    from tests.test_adaptive import OLD

    for name in ("bin", "lm", "dstore"):
        shutil.copytree(OLD / name, tmp_path / name)
    common = ["--tokens-per-sample", "64", "--context-window", "32", "--gen-subset", "test", "--knnlm",
              "--dstore-filename", tmp_path / "dstore" / "train", "--indexfile", tmp_path / "dstore" / "knn.index",
              "--k", "16", "--probe", "4", "--lmbda", "0.25", "--knn-temp", "2.0"]
    argv = lambda *extra: knn_argv(str(tmp_path / "bin"), str(tmp_path / "lm" / "model.pt"), *common, *extra)  # noqa: E731
    ev = EvalLM(tmp_path / "evallm")
    try:
        plain = ev.run(argv("--knnlm-dump-probs", tmp_path / "export")).stderr
        assert trainer.main(["train", str(tmp_path / "export"), "--out", str(tmp_path / "pred.json"),
                             "--epochs", "5"]) == 0
        capsys.readouterr()
        pred_path = str(tmp_path / "pred.json")
        runs = [argv("--adaptive-retrieval", pred_path, "--adaptive-skip", "0", "--adaptive-lambda"),
                argv("--adaptive-lambda")]
        ok, refused = ev.run_many([{"argv": a} for a in runs])
    finally:
        ev.close()
    assert ok.returncode == 0, str(ok)
    assert "lambda=per-token (predicted)" in ok.stderr and "adaptive skip 0, per-token lambda: 0.0% of 802" in ok.stderr
    e = load_export(str(tmp_path / "export"))
    pred = Predictor.load(pred_path)
    state = TokenFeatures(torch.from_numpy(np.array(e.features)), np.array(e.context))
    lam = 1 / (1 + np.exp(-pred.scores(pred.inputs(state)).double().numpy()))
    final = np.log(lam * np.exp(np.array(e.lp_knn, np.float64)) + (1 - lam) * np.exp(np.array(e.lp_lm, np.float64)))
    want = math.exp(-final.mean())
    base, ppl = knn_summary(ok.stderr)
    assert base == knn_summary(plain)[0] and ppl == pytest.approx(want, abs=1e-4 + 1e-6 * want)
    assert ppl != knn_summary(plain)[1]
    assert refused.returncode != 0
    assert "ConfigError: --adaptive-lambda is an option of adaptive retrieval" in refused.stderr, refused.stderr[-1500:]
