"""knnlm.subset (random datastore fractions) and knnlm.sweeps (perplexity vs k, vs datastore size).

Sweeps are checked against a float64 numpy computation written from the paper's formulas,
independent of knnlm.scoring; subsets against the rows of their source.
"""

import json
import math

import numpy as np
import pytest

from knnlm.offline import sweeps
from knnlm.store import subset
from knnlm.store import Datastore, DatastoreWriter
from knnlm.errors import ConfigError, CorruptError, KNNLMError
from knnlm.offline.export import ExportWriter, load_export

# ------------------------------------------------------------------------------- subsets

N, D, V = 5000, 8, 50


@pytest.fixture
def source(tmp_path):
    prefix = str(tmp_path / "src")
    rng = np.random.default_rng(0)
    w = DatastoreWriter(prefix, D, keytype="last_attn_input", fp16=True, dict_size=V,
                        dict_fingerprint="dictfp", model_fingerprint="modelfp",
                        extra={"split": "train", "data": "/data", "context_window": 1536,
                               "checkpoint": "ckpt.pt"})
    keys = rng.normal(size=(N, D)).astype(np.float16)
    w.add(keys, rng.integers(0, V, N))
    w.finalize()
    return prefix


def test_subset_rows_are_source_rows_in_order(source, tmp_path):
    out = str(tmp_path / "sub")
    m = subset.make_subset(source, 0.3, out, seed=5)
    sub, src = Datastore.open(out), Datastore.open(source)
    rows = np.load(f"{out}_source_rows.npy")
    assert sub.size == len(rows) == round(0.3 * N) == m["size"]
    assert (np.diff(rows) > 0).all() and rows[0] >= 0 and rows[-1] < N  # a subset, in order
    np.testing.assert_array_equal(sub.keys, src.keys[rows])
    np.testing.assert_array_equal(sub.vals, src.vals[rows])
    # Independently of the rows file: each key is found at that row of the source.
    where = {src.keys[i].tobytes(): i for i in range(N)}
    assert [where[k.tobytes()] for k in sub.keys] == rows.tolist()


def test_subset_metadata_is_complete(source, tmp_path):
    out = str(tmp_path / "sub")
    subset.make_subset(source, 0.1, out, seed=2)
    m, s = Datastore.open(out).meta, Datastore.open(source).meta
    assert m["complete"] and m["size"] == 500 and m["dim"] == D
    for field in ("keytype", "keys_dtype", "vals_dtype", "dict_size", "dict_fingerprint",
                  "model_fingerprint", "split", "data", "context_window", "checkpoint"):
        assert m[field] == s[field], field
    assert m["subset_of_size"] == N and m["fraction"] == 0.1 and m["seed"] == 2
    assert m["subset_of"].endswith("src") and m["subset_of_fingerprint"] == Datastore.open(source).fingerprint
    assert m["uuid"] != s["uuid"]  # another datastore: an index of the source will not open it
    # It is accepted wherever the source would be.
    Datastore.open(out).check_compatible(dim=D, keytype="last_attn_input", dict_size=V,
                                         dict_fingerprint="dictfp", model_fingerprint="modelfp")


def test_subset_is_reproducible_by_seed(source, tmp_path):
    rows = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        subset.make_subset(source, 0.5, str(tmp_path / name), seed=seed)
        rows[name] = np.load(tmp_path / f"{name}_source_rows.npy")
    np.testing.assert_array_equal(rows["a"], rows["b"])
    assert not np.array_equal(rows["a"], rows["c"])


def test_whole_datastore_fraction_one(source, tmp_path):
    subset.make_subset(source, 1.0, str(tmp_path / "all"))
    np.testing.assert_array_equal(Datastore.open(str(tmp_path / "all")).keys, Datastore.open(source).keys)


@pytest.mark.parametrize("hypergeometric_max", [10**9, 10])  # 10: the binomial path too
def test_selection_across_blocks_is_exact_and_uniform(monkeypatch, hypergeometric_max):
    monkeypatch.setattr(subset, "BLOCK_ROWS", 7)
    monkeypatch.setattr(subset, "_HYPERGEOMETRIC_MAX", hypergeometric_max)
    total, n, trials = 60, 15, 3000
    counts = np.zeros(total)
    for seed in range(trials):
        chosen = np.concatenate([start + rows for start, rows in subset.select_rows(total, n, seed)])
        assert len(chosen) == n and len(set(chosen)) == n and chosen.max() < total
        counts[chosen] += 1
    # Each row is kept with probability n / total: 750 +- 24 (binomial sd) per row.
    expected = trials * n / total
    sd = math.sqrt(trials * (n / total) * (1 - n / total))
    assert np.abs(counts - expected).max() < 5 * sd


def test_subset_refusals(source, tmp_path):
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="FRACTION"):
            subset.make_subset(source, bad, str(tmp_path / "x"))
    with pytest.raises(ConfigError, match="source datastore itself"):
        subset.make_subset(source, 0.5, source)
    subset.make_subset(source, 0.5, str(tmp_path / "done"))
    with pytest.raises(KNNLMError, match="already exists"):
        subset.make_subset(source, 0.5, str(tmp_path / "done"))
    subset.make_subset(source, 0.2, str(tmp_path / "done"), overwrite=True)
    assert Datastore.open(str(tmp_path / "done")).size == 1000


def test_subset_refuses_a_datastore_without_metadata(tmp_path):
    prefix = str(tmp_path / "raw")
    np.zeros((10, 4), np.float32).tofile(f"{prefix}_keys.npy")
    np.zeros(10, np.int64).tofile(f"{prefix}_vals.npy")
    with pytest.raises(KNNLMError, match="raw format"):
        subset.make_subset(prefix, 0.5, str(tmp_path / "out"))


def test_subset_cli(source, tmp_path, capsys):
    assert subset.main([source, "0.25", str(tmp_path / "cli"), "--seed", "9"]) == 0
    assert "1,250 of 5,000 entries" in capsys.readouterr().out
    assert subset.main([source, "2", str(tmp_path / "bad")]) == 2
    assert "FRACTION" in capsys.readouterr().err


# ------------------------------------------------------------------------------- sweeps

def ref_lp_knn(dists, match, k, temperature, sim_func):
    """log sum_{j<=k: match} softmax_j(s_j), s = -d/T (L2) or d/T (dot), float64, NaN = missing."""
    d = np.asarray(dists, np.float64)[:, :k]
    m = np.asarray(match, bool)[:, :k]
    valid = ~np.isnan(d)
    s = np.where(valid, (d if sim_func == "dot" else -d) / temperature, -np.inf)
    out = np.full(len(d), -np.inf)
    for i in range(len(d)):
        if not valid[i].any():
            continue
        p = np.exp(s[i] - s[i][valid[i]].max())
        p_knn = p[m[i] & valid[i]].sum() / p.sum()
        if p_knn > 0:
            out[i] = math.log(p_knn)
    return out


def ref_ppl(lp_lm, lp_knn, lmbda):
    p = lmbda * np.exp(lp_knn) + (1 - lmbda) * np.exp(np.asarray(lp_lm, np.float64))
    return math.inf if (p == 0).any() else math.exp(-np.log(p).mean())


def make_export(path, n=300, k=32, k_kept=None, sim_func="l2", temperature=2.0, lmbda=0.25,
                size=12345, seed=0):
    """An export as the scorer writes it: neighbors best-first, some missing, lp_knn consistent."""
    rng = np.random.default_rng(seed)
    if sim_func == "dot":
        d = -np.sort(-rng.normal(10, 3, size=(n, k)), axis=1)
    else:
        d = np.sort(rng.exponential(5, size=(n, k)), axis=1)
    d = d.astype(np.float32)
    vals = rng.integers(0, 6, size=(n, k))
    targets = rng.integers(0, 6, size=n)
    valid = np.ones((n, k), bool)
    valid[:7, 20:] = False  # FAISS found fewer than k
    valid[7, :] = False     # and none at all
    match = (vals == targets[:, None]) & valid
    d_nan = np.where(valid, d, np.nan)
    lp_knn = ref_lp_knn(d_nan, match, k, temperature, sim_func)
    lp_lm = np.log(rng.uniform(0.01, 0.6, size=n))
    w = ExportWriter(str(path), k_kept or k, sim_func=sim_func, temperature=temperature, lmbda=lmbda,
                     meta={"datastore": "dstore", "datastore_fingerprint": f"abc:{size}"})
    w.add(lp_lm, lp_knn, targets, dists=d_nan, match=match, valid=valid)
    w.finalize()
    return load_export(str(path)), d_nan, match, lp_lm


@pytest.mark.parametrize("sim_func,temperature", [("l2", 2.0), ("l2", 0.5), ("dot", 3.0), ("do_not_recomp_l2", 1.0)])
def test_k_sweep_equals_direct_computation(tmp_path, sim_func, temperature):
    ex, d, match, lp_lm = make_export(tmp_path / "ex", sim_func=sim_func)
    ks = [1, 2, 8, 20, 32]
    lambdas = [0.0, 0.1, 0.25, 0.5, 0.9]
    r = sweeps.sweep_k(ex, ks, lmbda=0.3, temperature=temperature, lambdas=lambdas)
    assert [row["k"] for row in r["rows"]] == ks
    for row in r["rows"]:
        lp = ref_lp_knn(d, match, row["k"], temperature, sim_func)
        assert row["ppl"] == pytest.approx(ref_ppl(lp_lm, lp, 0.3), rel=1e-5)
        assert row["tokens_without_target"] == int(np.isneginf(lp).sum())
        ppls = [ref_ppl(lp_lm, lp, lam) for lam in lambdas]
        assert row["best_lambda"] == lambdas[int(np.argmin(ppls))]
        assert row["best_ppl"] == pytest.approx(min(ppls), rel=1e-5)
    assert r["base_ppl"] == pytest.approx(math.exp(-lp_lm.mean()), rel=1e-6)
    grid = sweeps.lp_knn_first_k(ex, ks, temperature)
    for i, k in enumerate(ks):
        want = ref_lp_knn(d, match, k, temperature, sim_func)
        np.testing.assert_array_equal(np.isneginf(grid[i]), np.isneginf(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(grid[i][fin], want[fin], atol=2e-5)


def test_k_sweep_defaults_to_the_runs_settings_and_checks_consistency(tmp_path, monkeypatch):
    ex, d, match, lp_lm = make_export(tmp_path / "ex", k=32, temperature=2.0, lmbda=0.25)
    r = sweeps.sweep_k(ex)
    assert [row["k"] for row in r["rows"]] == [8, 16, 32] and r["lmbda"] == 0.25 and r["temperature"] == 2.0
    assert r["consistency_max_abs_diff"] < 1e-5
    # At k = k_kept and the run's T the sweep reproduces the run's own perplexity.
    stored = np.asarray(ex.lp_knn, np.float64)
    assert r["rows"][-1]["ppl"] == pytest.approx(ref_ppl(lp_lm, stored, 0.25), rel=1e-6)
    # An export whose stored lp_knn disagrees with its distances is refused.
    monkeypatch.setattr(ex, "lp_knn", np.asarray(ex.lp_knn) - 0.01)
    with pytest.raises(CorruptError, match="differs from its stored lp_knn"):
        sweeps.sweep_k(ex)


def test_k_sweep_of_a_truncated_export_is_exact_for_kept_neighbors(tmp_path):
    ex, d, match, lp_lm = make_export(tmp_path / "ex", k=32, k_kept=16)
    assert ex.truncated
    r = sweeps.sweep_k(ex, [4, 16], temperature=1.0)
    assert r["consistency_max_abs_diff"] is None
    for row in r["rows"]:
        assert row["ppl"] == pytest.approx(ref_ppl(lp_lm, ref_lp_knn(d, match, row["k"], 1.0, "l2"), 0.25), rel=1e-5)
    with pytest.raises(ConfigError, match="kept 16 neighbors"):
        sweeps.sweep_k(ex, [32])


def test_default_ks():
    assert sweeps.default_ks(1024) == [8, 16, 32, 64, 128, 256, 512, 1024]
    assert sweeps.default_ks(100) == [8, 16, 32, 64, 100]
    assert sweeps.default_ks(4) == [1, 2, 4]


def test_sizes_sweep(tmp_path):
    exports, refs = [], {}
    for size, seed in ((4000, 1), (1000, 2)):
        ex, d, match, lp_lm = make_export(tmp_path / f"ex{size}", size=size, seed=seed)
        exports.append(ex)
        refs[size] = (d, match, lp_lm, np.asarray(ex.lp_knn, np.float64))
    lambdas = [0.0, 0.2, 0.4, 0.6]
    r = sweeps.sweep_sizes(exports, lmbda=0.4, lambdas=lambdas)
    assert [row["size"] for row in r["rows"]] == [1000, 4000]
    for row in r["rows"]:
        d, match, lp_lm, stored = refs[row["size"]]
        assert row["ppl"] == pytest.approx(ref_ppl(lp_lm, stored, 0.4), rel=1e-6)
        ppls = [ref_ppl(lp_lm, stored, lam) for lam in lambdas]
        assert row["best_lambda"] == lambdas[int(np.argmin(ppls))]
    # Another temperature: re-scored from the distances.
    r = sweeps.sweep_sizes(exports[:1], lmbda=0.4, temperature=0.7, lambdas=lambdas)
    d, match, lp_lm, _ = refs[4000]
    assert r["rows"][0]["ppl"] == pytest.approx(ref_ppl(lp_lm, ref_lp_knn(d, match, 32, 0.7, "l2"), 0.4), rel=1e-5)


def test_sweeps_cli(tmp_path, capsys):
    make_export(tmp_path / "ex", k=16)
    out = tmp_path / "k.json"
    assert sweeps.main(["k", str(tmp_path / "ex"), "--ks", "1,4,16", "--lmbda", "1", "--tune-lambda",
                        "--lambdas", "0:1:0.5", "--json", str(out), "--plot", str(tmp_path / "k.png")]) == 0
    printed = capsys.readouterr().out
    assert "best l" in printed and "wrote" in printed
    result = json.loads(out.read_text())
    assert [row["k"] for row in result["rows"]] == [1, 4, 16]
    # lambda = 1 and some token without its target: infinite, null in JSON.
    assert result["rows"][0]["ppl"] is None and result["rows"][0]["tokens_without_target"] > 0
    assert (tmp_path / "k.png").stat().st_size > 1000
    assert sweeps.main(["sizes", str(tmp_path / "ex"), "--plot", str(tmp_path / "s.png"),
                        "--json", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["size"] == 12345
    assert sweeps.main(["k", str(tmp_path / "ex"), "--ks", "64"]) == 2
    assert "kept 16 neighbors" in capsys.readouterr().err
    assert sweeps.main(["k", str(tmp_path / "missing")]) == 2


def test_console_scripts_equal_the_module_forms(source, tmp_path):
    """`knnlm-subset` / `knnlm-sweeps` (pyproject's console scripts) run the same commands as
    `python -m knnlm.subset` / `python -m knnlm.sweeps`: the same rows, the same sweep."""
    import sys

    from .conftest import run

    run(["knnlm-subset", source, "0.3", tmp_path / "script", "--seed", "4"])
    run([sys.executable, "-m", "knnlm.subset", source, "0.3", tmp_path / "module", "--seed", "4"])
    a, b = Datastore.open(str(tmp_path / "script")), Datastore.open(str(tmp_path / "module"))
    assert a.size == b.size == 1500
    assert np.array_equal(np.asarray(a.keys), np.asarray(b.keys)) and np.array_equal(a.vals, b.vals)
    make_export(tmp_path / "ex", k=16)
    run(["knnlm-sweeps", "k", tmp_path / "ex", "--ks", "1,4,16", "--json", tmp_path / "script.json"])
    run([sys.executable, "-m", "knnlm.sweeps", "k", tmp_path / "ex", "--ks", "1,4,16", "--json",
         tmp_path / "module.json"])
    assert json.loads((tmp_path / "script.json").read_text()) == json.loads((tmp_path / "module.json").read_text())
