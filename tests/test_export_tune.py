"""Per-token export (knnlm.offline.export) and the lambda/temperature search (knnlm.offline.tune).

References here are plain numpy written for the test (float64, np.logaddexp), not knnlm.scoring.
"""

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from knnlm.offline import export as ex
from knnlm.offline import rescoring as rs
from knnlm.offline import tune
from knnlm.errors import ConfigError, CorruptError, IncompleteError, KNNLMError
from knnlm.scoring import knn_log_prob, neighbor_scores


# ---------------------------------------------------------------- independent references

def ref_lp_knn(dists, match, sim_func, temperature):
    """log p_kNN per row: log sum_{match} e^{s_j} - log sum_{valid} e^{s_j}; NaN distance = missing."""
    out = np.empty(len(dists))
    for i in range(len(dists)):
        norm = matched = -np.inf
        for d, m in zip(dists[i].astype(np.float64), match[i]):
            if np.isnan(d):
                continue
            s = (d if sim_func == "dot" else -d) / temperature
            norm = np.logaddexp(norm, s)
            if m:
                matched = np.logaddexp(matched, s)
        out[i] = matched - norm if matched > -np.inf else -np.inf
    return out


def ref_ppl(lp_lm, lp_knn, lmbda):
    with np.errstate(divide="ignore"):
        p = lmbda * np.exp(lp_knn.astype(np.float64)) + (1 - lmbda) * np.exp(lp_lm.astype(np.float64))
        return float(np.exp(-np.mean(np.log(p))))


# ---------------------------------------------------------------- synthetic exports

def synth(n, k, vocab, seed, *, missing=0.0, sim_func="l2"):
    """Neighbors sorted nearest-first, some missing (NaN), values, targets, LM log-probs."""
    rng = np.random.default_rng(seed)
    d = np.sort(rng.uniform(0, 20, size=(n, k)), axis=1).astype(np.float32)
    if sim_func == "dot":
        d = -d  # similarities, nearest (largest) first
    valid = rng.random((n, k)) >= missing
    vals = rng.integers(0, vocab, size=(n, k))
    targets = rng.integers(0, vocab, size=n)
    logits = rng.normal(size=(n, vocab)) * 2
    lp_lm = (logits - np.logaddexp.reduce(logits, axis=1, keepdims=True))[np.arange(n), targets]
    return d, valid, vals, targets, lp_lm.astype(np.float32)


def scored(d, valid, vals, targets, sim_func, temperature):
    """What the evaluation computes (knnlm.scoring), to store as lp_knn."""
    return knn_log_prob(neighbor_scores(torch.from_numpy(d), sim_func, temperature),
                        torch.from_numpy(vals), torch.from_numpy(targets), torch.from_numpy(valid))


def write_export(path, n=300, k=16, vocab=6, seed=0, *, k_kept=None, temperature=2.0, lmbda=0.3,
                 sim_func="l2", missing=0.1, with_dists=True, batch=128):
    d, valid, vals, targets, lp_lm = synth(n, k, vocab, seed, missing=missing, sim_func=sim_func)
    w = ex.ExportWriter(path, k_kept or k, sim_func=sim_func, temperature=temperature, lmbda=lmbda)
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        lp_knn = scored(d[sl], valid[sl], vals[sl], targets[sl], sim_func, temperature)
        if with_dists:
            w.add(torch.from_numpy(lp_lm[sl]), lp_knn, targets[sl], dists=d[sl], vals=vals[sl], valid=valid[sl])
        else:
            w.add(lp_lm[sl], lp_knn, targets[sl])
    w.finalize()
    return d, valid, vals, targets, lp_lm


# ---------------------------------------------------------------- writer / reader

def test_round_trip_missing_neighbors_and_truncation(tmp_path):
    path = str(tmp_path / "exp")
    rng = np.random.default_rng(1)
    n, k, K = 7, 5, 3
    d = np.sort(rng.uniform(1, 9, size=(n, k)), axis=1).astype(np.float32)
    vals = rng.integers(0, 4, size=(n, k))
    targets = rng.integers(0, 4, size=n)
    ids = rng.integers(0, 1000, size=(n, k))
    ids[0, 1] = -1  # FAISS found too few neighbors: id -1 ...
    d[0, 1] = 3e38  # ... with a float-max distance
    valid = np.ones((n, k), bool)
    valid[2, 0] = False
    d[4, 2] = np.nan
    lp_lm = np.log(rng.uniform(0.01, 1, n)).astype(np.float32)
    lp_knn = np.log(rng.uniform(0.01, 1, n)).astype(np.float32)

    w = ex.ExportWriter(path, K, sim_func="l2", temperature=1.5, lmbda=0.25, with_ids=True,
                        meta={"split": "valid"})
    w.add(torch.from_numpy(lp_lm[:3]), torch.from_numpy(lp_knn[:3]), torch.from_numpy(targets[:3]),
          dists=torch.from_numpy(d[:3]), ids=torch.from_numpy(ids[:3]), vals=torch.from_numpy(vals[:3]),
          valid=torch.from_numpy(valid[:3]))
    w.add(lp_lm[3:], lp_knn[3:], targets[3:], dists=d[3:], ids=ids[3:], vals=vals[3:], valid=valid[3:])
    meta = w.finalize(extra_meta={"datastore": "abc:123"})
    assert meta["complete"] and meta["count"] == n and meta["k"] == k and meta["k_kept"] == K

    e = ex.load_export(path)
    missing = np.zeros((n, K), bool)
    missing[0, 1] = missing[2, 0] = missing[4, 2] = True
    want_d = d[:, :K].copy()
    want_d[missing] = np.nan
    np.testing.assert_array_equal(e.dists, want_d)  # NaN == NaN position-wise here
    np.testing.assert_array_equal(e.match, (vals[:, :K] == targets[:, None]) & ~missing)
    np.testing.assert_array_equal(e.ids, np.where(missing, -1, ids[:, :K]))
    np.testing.assert_array_equal(e.vals, np.where(missing, -1, vals[:, :K]))
    np.testing.assert_array_equal(e.lp_lm, lp_lm)
    np.testing.assert_array_equal(e.lp_knn, lp_knn)
    np.testing.assert_array_equal(e.targets, targets)
    assert e.dists.dtype == np.float32 and e.match.dtype == np.bool_ and e.targets.dtype == np.int64
    assert e.meta["split"] == "valid" and e.meta["datastore"] == "abc:123"
    assert e.meta["sim_func"] == "l2" and e.meta["temperature"] == 1.5 and e.meta["lmbda"] == 0.25
    assert e.truncated and e.k == k and e.k_kept == K and e.count == n


def test_k_kept_above_k_keeps_all_and_no_dists_export(tmp_path):
    w = ex.ExportWriter(str(tmp_path / "a"), 100, sim_func="dot", temperature=1.0, lmbda=0.5)
    w.add(np.zeros(2), np.zeros(2), np.array([1, 2]), dists=np.ones((2, 4)), match=np.ones((2, 4), bool))
    w.finalize()
    e = ex.load_export(str(tmp_path / "a"))
    assert e.k_kept == 4 and e.k == 4 and not e.truncated

    w = ex.ExportWriter(str(tmp_path / "b"), 8, sim_func="l2", temperature=1.0, lmbda=0.5)
    w.add(np.zeros(3), np.full(3, -np.inf), np.arange(3))
    w.finalize()
    e = ex.load_export(str(tmp_path / "b"))
    assert e.dists is None and not e.has_neighbors and e.count == 3

    w = ex.ExportWriter(str(tmp_path / "c"), 0, sim_func="l2", temperature=1.0, lmbda=0.5)
    for _ in range(2):  # neighbors given, none kept
        w.add(np.zeros(2), np.zeros(2), np.arange(2), dists=np.ones((2, 4)), match=np.ones((2, 4), bool))
    w.finalize()
    e = ex.load_export(str(tmp_path / "c"))
    assert e.dists is None and e.count == 4 and e.k == 4 and e.meta["k_kept"] == 0


def test_incomplete_corrupt_and_existing_exports(tmp_path):
    path = str(tmp_path / "exp")
    w = ex.ExportWriter(path, 4, sim_func="l2", temperature=1.0, lmbda=0.25)
    w.add(np.zeros(2), np.zeros(2), np.arange(2), dists=np.ones((2, 4)), match=np.ones((2, 4), bool))
    with pytest.raises(IncompleteError):
        ex.load_export(path)
    w.abandon()
    with pytest.raises(IncompleteError):
        ex.load_export(path)

    write_export(path, n=20)
    with pytest.raises(KNNLMError, match="already exists"):
        ex.ExportWriter(path, 4, sim_func="l2", temperature=1.0, lmbda=0.25)
    ex.load_export(path)
    with open(os.path.join(path, "dists.npy"), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(path, "dists.npy")) - 8)
    with pytest.raises(CorruptError):
        ex.load_export(path)
    other = str(tmp_path / "other")
    write_export(other, n=20)
    os.remove(os.path.join(other, "match.npy"))
    with pytest.raises(CorruptError, match="missing"):
        ex.load_export(other)

    w = ex.ExportWriter(path, 4, sim_func="l2", temperature=1.0, lmbda=0.25, overwrite=True)
    assert not os.path.exists(os.path.join(path, "dists.npy"))  # stale arrays are gone at once
    with pytest.raises(IncompleteError):
        ex.load_export(path)
    with pytest.raises(KNNLMError, match="no export directory"):
        ex.load_export(str(tmp_path / "nowhere"))


def test_writer_rejects_bad_input(tmp_path):
    with pytest.raises(ConfigError):
        ex.ExportWriter(str(tmp_path / "a"), 4, sim_func="cosine", temperature=1.0, lmbda=0.25)
    with pytest.raises(ConfigError):
        ex.ExportWriter(str(tmp_path / "a"), 4, sim_func="l2", temperature=0.0, lmbda=0.25)
    with pytest.raises(ConfigError):
        ex.ExportWriter(str(tmp_path / "a"), 4, sim_func="l2", temperature=1.0, lmbda=1.5)
    with pytest.raises(ConfigError):
        ex.ExportWriter(str(tmp_path / "a"), -1, sim_func="l2", temperature=1.0, lmbda=0.5)
    with pytest.raises(ConfigError, match="reserved"):
        ex.ExportWriter(str(tmp_path / "a"), 4, sim_func="l2", temperature=1.0, lmbda=0.5, meta={"complete": True})
    w = ex.ExportWriter(str(tmp_path / "b"), 4, sim_func="l2", temperature=1.0, lmbda=0.25)
    with pytest.raises(CorruptError, match="lp_lm"):
        w.add(np.array([np.nan]), np.zeros(1), np.zeros(1, int))
    with pytest.raises(CorruptError, match="lp_knn"):
        w.add(np.zeros(1), np.array([0.5]), np.zeros(1, int))
    with pytest.raises(ValueError, match="shape"):
        w.add(np.zeros(2), np.zeros(3), np.zeros(2, int))
    with pytest.raises(ValueError, match="match or vals"):
        w.add(np.zeros(2), np.zeros(2), np.zeros(2, int), dists=np.ones((2, 4)))
    w.add(np.zeros(2), np.zeros(2), np.zeros(2, int), dists=np.ones((2, 4)), match=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="shape"):  # the run's k is fixed by the first add()
        w.add(np.zeros(2), np.zeros(2), np.zeros(2, int), dists=np.ones((2, 5)), match=np.ones((2, 5), bool))
    with pytest.raises(ValueError, match="none"):
        w.add(np.zeros(2), np.zeros(2), np.zeros(2, int))
    with pytest.raises(ValueError, match="disagrees"):
        w.add(np.zeros(1), np.zeros(1), np.zeros(1, int), dists=np.ones((1, 4)),
              match=np.zeros((1, 4), bool), vals=np.zeros((1, 4), int))


# ---------------------------------------------------------------- temperature re-scoring

@pytest.mark.parametrize("sim_func", ["l2", "dot"])
def test_rescoring_matches_scoring_and_numpy(tmp_path, sim_func):
    path = str(tmp_path / "exp")
    d, valid, vals, targets, _ = write_export(path, n=200, k=12, vocab=5, sim_func=sim_func, missing=0.15)
    e = ex.load_export(path)
    # Edge rows: no neighbor at all, none carries the target, all carry it, far-only match.
    assert (~e.match.any(axis=1)).any() and np.isnan(e.dists).any()
    for t in (0.05, 0.5, 2.0, 7.0):
        got = rs.lp_knn_at(e, t)
        want = scored(d, valid, vals, targets, sim_func, t).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(got, ref_lp_knn(e.dists, e.match, sim_func, t), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(rs.lp_knn_at(e, 2.0), e.lp_knn, atol=1e-5)  # the run's own T
    rows = np.array([5, 3, 150, 3])
    np.testing.assert_array_equal(rs.lp_knn_at(e, 0.7, rows=rows), rs.lp_knn_at(e, 0.7)[rows])
    np.testing.assert_array_equal(rs.lp_knn_at(e, 0.7, rows=slice(10, 90)), rs.lp_knn_at(e, 0.7)[10:90])


def test_rescoring_underflow_and_empty_rows(tmp_path, monkeypatch):
    """Matching neighbors too far for fp32 exp at this T, rows with no neighbor: still exact."""
    monkeypatch.setattr(rs, "CHUNK_ELEMENTS", 8)  # several chunks of 2 rows
    d = np.array([[0.0, 150.0, 300.0, np.nan],   # only the farthest valid one matches
                  [np.nan, np.nan, np.nan, np.nan],  # nothing found
                  [1.0, 2.0, 3.0, 4.0],         # all match
                  [5.0, 6.0, np.nan, 7.0],      # none matches
                  [0.0, 1e-3, 2e-3, 3e-3]], np.float32)
    match = np.array([[0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], bool)
    path = str(tmp_path / "exp")
    w = ex.ExportWriter(path, 4, sim_func="l2", temperature=1.0, lmbda=0.5)
    w.add(np.zeros(5), np.zeros(5), np.zeros(5, int), dists=d, match=match)
    w.finalize()
    e = ex.load_export(path)
    for t in (0.5, 1.0, 100.0):
        got = rs.lp_knn_at(e, t)
        want = ref_lp_knn(d, match, "l2", t)
        assert np.isfinite(got[0]) and np.isneginf(got[1]) and np.isneginf(got[3])
        if t <= 1.0:
            assert got[0] < -250  # e^(-300/T) underflows fp32: redone exactly, not -inf
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-5)


def test_truncated_rescoring_warns(tmp_path, caplog):
    path = str(tmp_path / "exp")
    d, valid, vals, targets, _ = write_export(path, n=50, k=16, k_kept=8)
    e = ex.load_export(path)
    with caplog.at_level(logging.WARNING, logger="knnlm.offline.export"):
        got = rs.lp_knn_at(e, 3.0)
    assert "approximation" in caplog.text
    # It is the softmax over the 8 nearest: exact for them.
    np.testing.assert_allclose(got, scored(d[:, :8], valid[:, :8], vals[:, :8], targets, "l2", 3.0).numpy(),
                               rtol=1e-6, atol=1e-5)


def test_rescoring_needs_distances(tmp_path):
    path = str(tmp_path / "exp")
    write_export(path, n=10, with_dists=False)
    with pytest.raises(ConfigError, match="no neighbor distances"):
        rs.lp_knn_at(ex.load_export(path), 1.0)


# ---------------------------------------------------------------- tuning

def test_tune_finds_brute_force_best(tmp_path):
    path = str(tmp_path / "exp")
    write_export(path, n=400, k=16, vocab=8, seed=5, missing=0.1, temperature=2.0, lmbda=0.3)
    e = ex.load_export(path)
    lambdas = tune.parse_lambdas("0:1:0.05")
    temps = [0.5, 1.0, 2.0, 4.0, 8.0]
    res = tune.tune(e, lambdas, temps)
    lp_lm = np.asarray(e.lp_lm)
    ref = {t: ref_lp_knn(e.dists, e.match, "l2", t) for t in temps}
    brute = {(lam, t): ref_ppl(lp_lm, ref[t], lam) for t in temps for lam in lambdas}
    (blam, bt), bppl = min(brute.items(), key=lambda kv: kv[1])
    assert 0 < blam < 1 and (res["best_lambda"], res["best_temperature"]) == (blam, bt)
    assert res["best_ppl"] == pytest.approx(bppl, rel=1e-5)
    assert res["base_ppl"] == pytest.approx(ref_ppl(lp_lm, lp_lm, 0.0), rel=1e-6)
    assert res["run_ppl"] == pytest.approx(ref_ppl(lp_lm, np.asarray(e.lp_knn), 0.3), rel=1e-5)
    for i, t in enumerate(temps):
        for j, lam in enumerate(lambdas):
            assert res["ppl"][i, j] == pytest.approx(brute[(lam, t)], rel=1e-5)
    assert res["consistency_max_abs_diff"] < 1e-5
    stored = {lam: ref_ppl(lp_lm, np.asarray(e.lp_knn), lam) for lam in lambdas}
    lam_run = min(stored, key=stored.get)
    assert res["best_lambda_at_run_temperature"] == lam_run
    assert res["best_ppl_at_run_temperature"] == pytest.approx(stored[lam_run], rel=1e-5)


def test_default_temperature_grid():
    grid = tune.default_temperatures(3.0)
    assert len(grid) == 13 and grid[6] == 3.0
    assert grid[0] == pytest.approx(3.0 / 8) and grid[-1] == pytest.approx(24.0)
    assert np.allclose(np.diff(np.log(grid)), math.log(2) / 2)


def test_parse_lambdas():
    assert tune.parse_lambdas("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert tune.parse_lambdas("0:1:0.1")[3] == 0.3
    assert len(tune.parse_lambdas("0:1:0.01")) == 101
    assert tune.parse_lambdas("0.5, 0.1,0.5") == [0.1, 0.5]
    for bad in ("0:1:0.3", "0.5,2", "a,b", "1:0:0.1", "0:1:0", ""):
        with pytest.raises(ConfigError):
            tune.parse_lambdas(bad)
    with pytest.raises(ConfigError):
        tune.parse_temperatures("1,-2")


def test_cli_inf_at_lambda_one_json_and_plot(tmp_path, capsys):
    path = str(tmp_path / "exp")
    write_export(path, n=300, k=8, vocab=20, seed=2, missing=0.2)
    e = ex.load_export(path)
    no_target = int(np.isneginf(e.lp_knn).sum())
    assert no_target > 0
    out_json, out_png = str(tmp_path / "r.json"), str(tmp_path / "r.png")
    rc = tune.main([path, "--lambdas", "0:1:0.1", "--temperatures", "1,2,4", "--json", out_json, "--plot", out_png])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"{no_target:,} of 300 tokens" in out and "inf" in out
    with open(out_json) as f:
        r = json.load(f)
    assert r["tokens_without_target"] == [no_target] * 3
    assert all(row[-1] is None for row in r["ppl"])  # lambda = 1: infinite, as null
    assert all(x is not None and math.isfinite(x) for row in r["ppl"] for x in row[:-1])
    assert math.isfinite(r["best_ppl"]) and r["best_lambda"] < 1 and r["best_temperature"] in (1.0, 2.0, 4.0)
    assert r["base_ppl"] == pytest.approx(ref_ppl(np.asarray(e.lp_lm), np.asarray(e.lp_lm), 0.0), rel=1e-6)
    with open(out_png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out_png) > 5000


def test_cli_errors(tmp_path, capsys):
    assert tune.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("knnlm-tune: error: ")
    path = str(tmp_path / "exp")
    write_export(path, n=50)
    assert tune.main([path, "--lambdas", "0:2:0.5"]) == 2
    assert tune.main([path, "--plot", str(tmp_path / "no" / "dir" / "x.png")]) == 2
    assert "cannot write" in capsys.readouterr().err
    # An lp_knn that its distances do not reproduce: the export is inconsistent.
    lp = np.load(os.path.join(path, "lp_knn.npy"))
    lp[lp > -np.inf] -= 0.01
    np.save(os.path.join(path, "lp_knn.npy"), lp)
    assert tune.main([path]) == 2
    assert "inconsistent" in capsys.readouterr().err


def test_cli_truncated_and_lm_only_exports(tmp_path, capsys):
    path = str(tmp_path / "trunc")
    write_export(path, n=60, k=16, k_kept=4)
    assert tune.main([path, "--lambdas", "0,0.5"]) == 0
    assert "an approximation" in capsys.readouterr().out
    path = str(tmp_path / "nodists")
    write_export(path, n=60, with_dists=False)
    assert tune.main([path, "--lambdas", "0:1:0.5"]) == 0
    assert tune.main([path, "--temperatures", "1,4"]) == 2
    assert "no neighbor distances" in capsys.readouterr().err


def test_consistency_check_tolerates_fp32_rounding_of_large_distances(tmp_path):
    """Squared L2 distances in the thousands (real keys): fp32 scores are only good to ~1e-4 there."""
    path = str(tmp_path / "exp")
    d, valid, vals, targets, lp_lm = synth(500, 64, 5, seed=4)
    d = np.sort(d * 100 + 2000, axis=1).astype(np.float32)  # 2000 .. 4000
    w = ex.ExportWriter(path, 64, sim_func="l2", temperature=1.0, lmbda=0.3)
    w.add(lp_lm, scored(d, valid, vals, targets, "l2", 1.0), targets, dists=d, vals=vals, valid=valid)
    w.finalize()
    e = ex.load_export(path)
    ref = ref_lp_knn(e.dists[:100], e.match[:100], "l2", 1.0)
    np.testing.assert_allclose(rs.lp_knn_at(e, 1.0, rows=slice(0, 100)), ref, atol=4 * 4e3 * 1.2e-7)
    res = tune.tune(e, [0.0, 0.3], [1.0])
    # knn_log_prob now shifts by the row maximum, so scoring and re-scoring agree far inside the
    # tolerance; exports written by older code or on other hardware may differ by up to ~1e-3.
    assert res["consistency_max_abs_diff"] < 1e-3
    assert res["run_ppl"] == pytest.approx(ref_ppl(lp_lm, np.asarray(e.lp_knn), 0.3), rel=1e-5)
