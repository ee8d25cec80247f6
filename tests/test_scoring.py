"""The kNN-LM math against an independent numpy reference and its defining properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from knnlm.errors import ConfigError
from knnlm.scoring import (
    continuous_cache_log_prob,
    interpolate,
    knn_full_log_probs,
    knn_log_prob,
    neighbor_scores,
)


def reference_log_p_knn(query, keys, vals, target, k, temperature, sim):
    """Brute force in float64 with plain loops: search every key, softmax, sum per word."""
    if sim == "l2":
        d = ((keys - query) ** 2).sum(1)
        order = np.argsort(d, kind="stable")[:k]
        logits = -d[order] / temperature
    else:
        s = keys @ query
        order = np.argsort(-s, kind="stable")[:k]
        logits = s[order] / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    mass = sum(pj for pj, j in zip(p, order) if vals[j] == target)
    return math.log(mass) if mass > 0 else -math.inf


@pytest.mark.parametrize("sim", ["l2", "dot"])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 10.0])
def test_knn_log_prob_matches_numpy_reference(sim, temperature):
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(500, 16))
    vals = rng.integers(0, 20, size=500)
    queries = rng.normal(size=(40, 16))
    targets = rng.integers(0, 20, size=40)
    k = 32
    want = [reference_log_p_knn(q, keys, vals, t, k, temperature, sim) for q, t in zip(queries, targets)]
    # Neighbors found by torch (the retriever's job), scored by the library function.
    kq = torch.tensor(keys, dtype=torch.float32)
    qq = torch.tensor(queries, dtype=torch.float32)
    if sim == "l2":
        dist = torch.cdist(qq.double(), kq.double()).pow(2)
        d, ids = dist.topk(k, largest=False)
    else:
        d, ids = (qq.double() @ kq.double().T).topk(k)
    scores = neighbor_scores(d.float(), sim, temperature)
    got = knn_log_prob(scores, torch.tensor(vals)[ids], torch.tensor(targets))
    want = torch.tensor(want, dtype=torch.float32)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert finite.any() and (~finite).any()  # both cases exercised
    torch.testing.assert_close(got[finite], want[finite], atol=1e-5, rtol=1e-5)


def test_hand_computed_example():
    # distances 0, 1, 2 at T=1: weights e^0, e^-1, e^-2; the target is carried by the first and last.
    d = torch.tensor([[0.0, 1.0, 2.0]])
    vals = torch.tensor([[7, 3, 7]])
    lp = knn_log_prob(neighbor_scores(d), vals, torch.tensor([7]))
    want = math.log((1 + math.exp(-2)) / (1 + math.exp(-1) + math.exp(-2)))
    assert lp.item() == pytest.approx(want, abs=1e-6)
    mixed = interpolate(torch.tensor([math.log(0.1)]), lp, 0.25)
    assert mixed.item() == pytest.approx(math.log(0.25 * math.exp(want) + 0.75 * 0.1), abs=1e-6)


def test_missing_neighbors_and_no_match():
    d = torch.tensor([[0.0, 1.0, 5.0], [0.0, 0.0, 0.0]])
    vals = torch.tensor([[1, 2, 3], [1, 1, 1]])
    valid = torch.tensor([[True, True, False], [False, False, False]])
    lp = knn_log_prob(neighbor_scores(d), vals, torch.tensor([3, 1]), valid)
    assert torch.isneginf(lp).all()  # the only carrier of 3 is invalid; no neighbor at all
    out = interpolate(torch.tensor([-2.0, -3.0]), lp, 0.3)
    assert torch.isfinite(out).all()  # lambda < 1 keeps the LM term: no NaN, no inf
    assert torch.isneginf(interpolate(torch.tensor([-2.0, -3.0]), lp, 1.0)).all()


def test_out_of_range_options():
    with pytest.raises(ConfigError):
        interpolate(torch.zeros(1), torch.zeros(1), 1.5)
    with pytest.raises(ConfigError):
        neighbor_scores(torch.zeros(1, 1), "l2", 0.0)
    with pytest.raises(ConfigError):
        neighbor_scores(torch.zeros(1, 1), "l2", -1.0)


def test_fp16_distances_do_not_overflow():
    # Squared L2 of 1024-d vectors is far beyond fp16's 65504; scoring must run in fp32.
    d = torch.tensor([[7e4, 8e4]], dtype=torch.float32)
    lp = knn_log_prob(neighbor_scores(d, "l2", 1e4), torch.tensor([[1, 2]]), torch.tensor([1]))
    assert torch.isfinite(lp).all()


finite_floats = st.floats(-30, 30, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 100, width=32), st.integers(0, 4)), min_size=1, max_size=12),
       st.integers(0, 4), st.floats(0.01, 100), st.randoms())
def test_properties_of_p_knn(neighbors, target, temperature, rnd):
    d = torch.tensor([[n[0] for n in neighbors]])
    v = torch.tensor([[n[1] for n in neighbors]])
    lp = knn_log_prob(neighbor_scores(d, "l2", temperature), v, torch.tensor([target]))
    assert lp.item() <= 1e-6  # a probability
    # Invariant to the order of neighbors.
    perm = list(range(len(neighbors)))
    rnd.shuffle(perm)
    lp2 = knn_log_prob(neighbor_scores(d[:, perm], "l2", temperature), v[:, perm], torch.tensor([target]))
    torch.testing.assert_close(lp, lp2, atol=1e-5, rtol=1e-5)
    # The distribution over all words sums to one.
    total = sum(math.exp(knn_log_prob(neighbor_scores(d, "l2", temperature), v, torch.tensor([w])).item()) for w in range(5))
    assert total == pytest.approx(1.0, abs=1e-4)


@settings(max_examples=60, deadline=None)
@given(st.floats(-20, 0, width=32), st.floats(-20, 0, width=32), st.floats(0, 1))
def test_interpolation_bounds_and_limits(lp_lm, lp_knn, lmbda):
    a, b = torch.tensor([lp_lm]), torch.tensor([lp_knn])
    out = interpolate(a, b, lmbda).item()
    assert min(lp_lm, lp_knn) - 1e-5 <= out <= max(lp_lm, lp_knn) + 1e-5
    assert interpolate(a, b, 0.0).item() == a.item()
    assert interpolate(a, b, 1.0).item() == b.item()


def test_high_temperature_gives_neighbor_count_frequencies():
    d = torch.tensor([[0.0, 3.0, 9.0, 20.0]])
    v = torch.tensor([[5, 6, 5, 5]])
    lp = knn_log_prob(neighbor_scores(d, "l2", 1e9), v, torch.tensor([5]))
    assert lp.exp().item() == pytest.approx(3 / 4, abs=1e-6)
    # And low temperature puts everything on the nearest neighbor.
    lp = knn_log_prob(neighbor_scores(d, "l2", 1e-3), v, torch.tensor([6]))
    assert lp.exp().item() == pytest.approx(0.0, abs=1e-6)


def test_full_distribution_sums_to_one_and_agrees_with_target_only_math():
    rng = torch.Generator().manual_seed(0)
    V, k = 30, 8
    lm = torch.log_softmax(torch.randn(5, V, generator=rng), -1)
    d = torch.rand(5, k, generator=rng) * 10
    vals = torch.randint(0, V, (5, k), generator=rng)
    full = knn_full_log_probs(lm, neighbor_scores(d), vals, 0.3)
    torch.testing.assert_close(full.exp().sum(-1), torch.ones(5), atol=1e-5, rtol=0)
    for y in range(V):
        t = torch.full((5,), y)
        want = interpolate(lm[:, y], knn_log_prob(neighbor_scores(d), vals, t), 0.3)
        torch.testing.assert_close(full[:, y], want, atol=1e-5, rtol=1e-5)


def test_continuous_cache_against_loops():
    torch.manual_seed(0)
    B, T, D = 2, 7, 4
    keys = torch.randn(B, T, D)
    targets = torch.randint(0, 3, (B, T))
    scored = torch.ones(B, T, dtype=torch.bool)
    theta = 0.7
    got = continuous_cache_log_prob(keys, targets, scored, theta)
    for b in range(B):
        for t in range(T):
            w = [math.exp(theta * float(keys[b, t] @ keys[b, j])) for j in range(t)]
            mass = sum(wj for wj, j in zip(w, range(t)) if targets[b, j] == targets[b, t])
            want = math.log(mass / sum(w)) if mass > 0 else -math.inf
            if math.isinf(want):
                assert torch.isneginf(got[b, t])
            else:
                assert got[b, t].item() == pytest.approx(want, abs=1e-5)


def test_large_distances_keep_precision():
    # Squared L2 of real 1024-d keys is in the thousands; fp32 must still give log p to ~1e-6.
    rng = np.random.default_rng(1)
    d = rng.uniform(1000, 4000, size=(50, 64)).astype(np.float32).astype(np.float64)  # same inputs
    vals = rng.integers(0, 5, size=(50, 64))
    targets = rng.integers(0, 5, size=50)
    s = -d
    ref = []
    for row, v, t in zip(s, vals, targets):
        m = row.max()
        w = np.exp(row - m)
        mass = w[v == t].sum()
        ref.append(np.log(mass / w.sum()) if mass > 0 else -np.inf)
    got = knn_log_prob(neighbor_scores(torch.tensor(d, dtype=torch.float32)), torch.tensor(vals), torch.tensor(targets))
    ref = torch.tensor(ref, dtype=torch.float32)
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], atol=2e-6, rtol=1e-6)


def test_row_blocks_give_the_same_result_as_one_row_at_a_time(monkeypatch):
    """knn_log_prob scores long batches in row blocks; block edges must not change anything."""
    import knnlm.scoring as scoring

    monkeypatch.setattr(scoring, "KNN_ROWS_PER_BLOCK", 7)
    g = torch.Generator().manual_seed(0)
    n, k = 40, 9
    d = torch.rand(n, k, generator=g) * 300
    vals = torch.randint(0, 4, (n, k), generator=g)
    targets = torch.randint(0, 4, (n,), generator=g)
    valid = torch.rand(n, k, generator=g) > 0.2
    valid[3] = False  # a row with no neighbor at all
    got = knn_log_prob(neighbor_scores(d, "l2", 3.0), vals, targets, valid)
    for i in range(n):
        keep = valid[i]
        if not keep.any():
            assert got[i] == -math.inf
            continue
        p = torch.softmax(-d[i][keep].double() / 3.0, 0)
        mass = p[vals[i][keep] == targets[i]].sum().item()
        want = math.log(mass) if mass > 0 else -math.inf
        assert got[i].item() == pytest.approx(want, abs=1e-5)
