"""The efficiency round's speed-ups, each held bit for bit (torch.equal / np.array_equal) against
the unoptimised path it replaces, on a tiny datastore built from a text that repeats a passage
three times (so RetoMaton's pointers survive for many tokens, with up to three of them):

* RetoMaton's vectorised chains (`_follow_chains`) against the position-by-position reference;
* RetoMaton stacked over adaptive retrieval (the factory's order), and its refusals;
* adaptive retrieval's compact neighbors (`Neighbors.rows`) against the dense layout;
* LM features at the scored positions only (`lm_features(rows=...)`, fairseq's `FeatureTap`);
* exact distances of (query, row) pairs, and the fused recompute's unsorted small blocks;
* the stage timings line.
"""

import re
import types

import faiss
import numpy as np
import pytest
import torch

import knnlm
from knnlm import (KNNLM, AdaptiveRetriever, Context, Datastore, DatastoreWriter, ExactRetriever, FaissRetriever,
                   RetoMatonRetriever, Wrapper)
from knnlm.errors import ConfigError
from knnlm.options import RetrievalOptions
from knnlm.retrieval import faiss_search
from knnlm.retrieval.adaptive.features import lm_features
from knnlm.retrieval.base import Retriever
from knnlm.timing import STAGES
from tests.helpers import build_index
from tests.test_adaptive import make_predictor

D, V, K = 16, 6, 8
T, LMBDA = 2.0, 0.3
NEIGHBOR_FIELDS = ("ids", "distances", "values", "valid", "searched", "retrieved", "weights", "lmbda", "rows")


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 entries: random text around three copies of one 60-token passage whose keys are nearly
    equal (up to three pointers survive along it). Streams of queries: the datastore's own keys of
    consecutive entries (+ noise, a few targets changed to break chains), one of length 1, one of
    length 0, one of random queries and targets, one running off a copy's end, one past the
    datastore's last entry."""
    rng = np.random.default_rng(0)
    passage, passage_keys = rng.integers(0, V, 60), rng.normal(size=(60, D)).astype(np.float32)
    tokens, keys = [], []
    for part in ("rand", "copy", "rand", "copy", "rand", "copy", "rand"):
        if part == "copy":
            tokens.append(passage)
            keys.append(passage_keys + 0.05 * rng.normal(size=passage_keys.shape).astype(np.float32))
        else:
            n = 31 if len(tokens) == 6 else 30
            tokens.append(rng.integers(0, V, n))
            keys.append(rng.normal(size=(n, D)).astype(np.float32))
    text = np.concatenate(tokens)
    keys = np.ascontiguousarray(np.concatenate(keys)[:len(text) - 1])
    vals = text[1:]  # entry i: the context up to token i, value: token i + 1
    prefix = str(tmp_path_factory.mktemp("speedups") / "ds")
    w = DatastoreWriter(prefix, D, keytype="x", dict_size=V, dict_fingerprint="f", model_fingerprint="m",
                        extra={"sample_break_mode": "none"})
    w.add(keys, vals)
    w.finalize()
    ds = Datastore.open(prefix)
    index, ip_index = faiss.IndexFlatL2(D), faiss.IndexFlatIP(D)
    index.add(keys)
    ip_index.add(keys)
    qs, ts, lengths = [], [], []
    for start, n in ((30, 45), (120, 20), (5, 1), (0, 0), (None, 15), (250, 40), (95, 28), (287, 16)):
        if start is None:
            q, t = rng.normal(size=(n, D)).astype(np.float32), rng.integers(0, V, n)
        else:
            q, t = keys[start:start + n], vals[start:start + n].copy()
            q = q + 0.02 * rng.normal(size=q.shape).astype(np.float32)
            if n > 20:
                flip = rng.choice(n, 2, replace=False)
                t[flip] = (t[flip] + 1) % V
            if len(q) < n:  # past the datastore's last entry (which has no successor): random
                q = np.concatenate([q, rng.normal(size=(n - len(q), D)).astype(np.float32)])
                t = np.concatenate([t, rng.integers(0, V, n - len(t))])
        qs.append(q), ts.append(t), lengths.append(n)
    q = torch.from_numpy(np.concatenate(qs))
    t = torch.from_numpy(np.concatenate(ts).astype(np.int64))
    full = torch.log_softmax(torch.from_numpy(3 * rng.normal(size=(len(q), V)).astype(np.float32)), -1)
    feats = lm_features(full, top_k=3)
    assert len({row.tobytes() for row in q.numpy()}) == len(q)  # each query names its token
    return types.SimpleNamespace(prefix=prefix, ds=ds, index=index, ip_index=ip_index, keys=keys, vals=vals, q=q, t=t,
                                 lengths=lengths, full=full, lp_lm=full.gather(1, t[:, None]).squeeze(1), feats=feats,
                                 pred=make_predictor(feats, ds))


def make_base(data, kind):
    if kind == "faiss-dot":
        return FaissRetriever(data.ip_index, data.ds, k=K, sim_func="dot")
    return FaissRetriever(data.index, data.ds, k=K) if kind == "faiss" else ExactRetriever(data.ds, k=K)


class Recording(Wrapper):
    """Passes everything to `base`, recording the queries (and nearest_first) of each retrieve."""

    def __init__(self, base):
        super().__init__(base)
        self.calls, self.orders = [], []

    def retrieve(self, queries, context=None, *, nearest_first=True):
        self.calls.append(queries.detach().clone())
        self.orders.append(nearest_first)
        return self.base.retrieve(queries, context, nearest_first=nearest_first)

    def summary(self):
        return self.base.summary()

    def describe(self):
        return self.base.describe()

    def tokens(self, q):
        """The indices (into q) of every query recorded, in call order."""
        at = {row.tobytes(): i for i, row in enumerate(q.numpy())}
        return [at[row.tobytes()] for c in self.calls for row in c.numpy()]


def spy(obj, name):
    """Count the calls of obj.name (an instance attribute shadowing the method)."""
    calls = []
    method = getattr(obj, name)

    def wrapped(*args, **kwargs):
        calls.append(1)
        return method(*args, **kwargs)

    setattr(obj, name, wrapped)
    return calls


def assert_same_neighbors(a, b):
    """The same neighbors of every token, whichever the layout (compact blocks or one row each)."""
    a, b = a.dense(), b.dense()
    for f in NEIGHBOR_FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        assert x is None or torch.equal(x, y), f


def assert_same_scored(a, b):
    for f in ("final", "lp_lm", "lp_knn"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert_same_neighbors(a.neighbors, b.neighbors)


def stream_of(lengths):
    """(N,) the stream index of each token."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


def longest_run(mask, lengths):
    """The longest run of True within one stream."""
    best, run, stream = 0, 0, stream_of(lengths).tolist()
    for i, m in enumerate(mask.tolist()):
        run = run + 1 if m and i and stream[i] == stream[i - 1] else int(m)
        best = max(best, run)
    return best


def reto_score(data, base, vectorised, *, context=None, **kw):
    reto = RetoMatonRetriever(base, vectorised=vectorised, **kw)
    chains, reference = spy(reto, "_follow_chains"), spy(reto, "_follow_reference")
    ctx = context or Context(lengths=data.lengths)
    scored = KNNLM(reto, lmbda=LMBDA, temperature=T).score(data.q, data.t, data.lp_lm, context=ctx)
    return reto, scored, (len(chains), len(reference))


# ----------------------------------------------------------------------------- 1. RetoMaton's chains
@pytest.mark.parametrize("kind", ["faiss", "exact", "faiss-dot"])
@pytest.mark.parametrize("min_pointers", [1, 2, 3])
def test_retomaton_chains_equal_the_reference(data, kind, min_pointers):
    """Vectorised chains vs the position-by-position loop: final, lp_kNN, every neighbor field and
    the counters, bit for bit; on streams where most tokens follow pointers for long chains."""
    kw = {"max_pointers": 12} if kind == "faiss-dot" else {}  # above k: nothing ranked, still the chains
    fast, a, used_a = reto_score(data, make_base(data, kind), True, min_pointers=min_pointers, **kw)
    ref, b, used_b = reto_score(data, make_base(data, kind), False, min_pointers=min_pointers, **kw)
    assert used_a == (1, 0) and used_b == (0, 1)  # each went the way it was asked
    assert_same_scored(a, b)
    assert torch.equal(fast.last_searched, ref.last_searched)
    assert fast.summary() == ref.summary() and fast.describe() == ref.describe()
    # non-trivial: many tokens followed pointers, in chains of many tokens; others were searched
    nb = a.neighbors.dense()
    followed = ~nb.searched
    assert nb.retrieved is None and len(a.final) == sum(data.lengths) == 165
    assert followed.float().mean() > 0.5 and longest_run(followed, data.lengths) > 10
    assert 20 <= fast.summary()["searched"] < 100
    # a followed token is scored against at least min_pointers pointers, their exact distances filled in
    valid = nb.valid[followed]
    assert bool((valid.sum(1) >= min_pointers).all()) and bool((nb.distances[followed][valid] != 0).all())
    # the chains' followed tokens sit in their own block, as wide as their most candidates (not k)
    extra = a.neighbors.extra
    assert torch.equal(extra.rows.sort().values, torch.nonzero(followed).squeeze(1))
    assert extra.distances.shape[1] == min(kw.get("max_pointers", K), 64) and int(extra.valid.sum(1).max()) <= K
    assert torch.isfinite(a.lp_knn).sum() > 100


@pytest.mark.parametrize("kind", ["faiss", "exact"])
def test_followed_tokens_are_not_padded_to_k(data, kind):
    """With k above 64, the followed tokens' block is as wide as their most candidates rounded up to
    64, not k, and the scores are still the reference's, bit for bit (a row's value does not depend
    on its block's width)."""
    k = 160
    base = lambda: FaissRetriever(data.index, data.ds, k=k) if kind == "faiss" else ExactRetriever(data.ds, k=k)  # noqa: E731
    fast, a, _ = reto_score(data, base(), True, min_pointers=2)
    ref, b, _ = reto_score(data, base(), False, min_pointers=2)
    assert_same_scored(a, b)
    extra, main = a.neighbors.extra, a.neighbors
    most = int(extra.valid.sum(1).max())
    assert main.distances.shape[1] == k and extra.distances.shape[1] == -(-most // 64) * 64 < k
    assert len(extra.rows) > 20 and torch.isfinite(a.lp_knn[extra.rows]).sum() > 20


def test_retomaton_chains_depend_on_min_pointers(data):
    """The comparison above can fail: a higher min_pointers searches more and changes the scores."""
    _, one, _ = reto_score(data, make_base(data, "faiss"), True, min_pointers=1)
    _, three, _ = reto_score(data, make_base(data, "faiss"), True, min_pointers=3)
    assert int(three.neighbors.searched.sum()) > int(one.neighbors.searched.sum())
    assert not torch.equal(one.final, three.final)


@pytest.mark.parametrize("max_pointers", [2, 5])
def test_ranked_pointers_take_the_reference_either_way(data, max_pointers):
    """max_pointers below k ranks pointers: both settings go through the reference, same bits."""
    r1, a, used_a = reto_score(data, make_base(data, "faiss"), True, min_pointers=2, max_pointers=max_pointers)
    r2, b, used_b = reto_score(data, make_base(data, "faiss"), False, min_pointers=2, max_pointers=max_pointers)
    assert r1.ranks and used_a == used_b == (0, 1)
    assert_same_scored(a, b)
    assert r1.summary() == r2.summary() and (~a.neighbors.searched).sum() > 20
    assert int(a.neighbors.valid.sum(1).max()) == K  # searched tokens keep their k
    assert int(a.neighbors.valid[~a.neighbors.searched].sum(1).max()) <= max_pointers


@pytest.mark.parametrize("kind", ["faiss", "exact"])
def test_nearest_first_retrieve_is_equal_in_both_paths(data, kind):
    """A direct retrieve(nearest_first=True): the same neighbors both ways, the flag reaching the base."""
    out = []
    for vectorised in (True, False):
        base = Recording(make_base(data, kind))
        reto = RetoMatonRetriever(base, min_pointers=2, vectorised=vectorised)
        out.append(reto.retrieve(data.q, Context(lengths=data.lengths, targets=data.t), nearest_first=True))
        assert base.orders and all(base.orders)
        assert reto.summary()["searched"] == len(base.tokens(data.q))
    assert_same_neighbors(*out)
    nb = out[0].dense()
    searched = nb.searched
    assert 0 < int(searched.sum()) < len(searched)
    d = nb.distances[searched]
    assert bool((d[:, 1:] >= d[:, :-1]).all())  # the searched rows really are nearest first


def test_zero_length_streams_only(data):
    """Streams of length 0 are accepted; with all of them empty there is nothing to do."""
    base = Recording(make_base(data, "faiss"))
    nb = RetoMatonRetriever(base).retrieve(data.q[:0], Context(lengths=[0, 0], targets=data.t[:0]))
    assert nb.ids.shape == (0, K) and base.calls == []


# ----------------------------------------------------------------------------- 2. stacked over adaptive
def stacked(data, *, skip, vectorised=True, min_pointers=1, record=False):
    lower = Recording(FaissRetriever(data.index, data.ds, k=K))
    adaptive = AdaptiveRetriever(lower, data.pred, skip=skip)
    upper = Recording(adaptive) if record else adaptive
    reto = RetoMatonRetriever(upper, min_pointers=min_pointers, vectorised=vectorised)
    knn = KNNLM(reto, lmbda=LMBDA, temperature=T)
    scored = knn.score(data.q, data.t, data.lp_lm, context=Context(lengths=data.lengths, lm_features=data.feats))
    return types.SimpleNamespace(knn=knn, reto=reto, adaptive=adaptive, upper=upper, lower=lower, scored=scored)


@pytest.mark.parametrize("min_pointers", [1, 2])
def test_stacked_chains_equal_the_reference(data, min_pointers):
    """RetoMaton over adaptive retrieval: chains vs the reference, bit for bit, counters too."""
    a = stacked(data, skip=0.5, vectorised=True, min_pointers=min_pointers)
    b = stacked(data, skip=0.5, vectorised=False, min_pointers=min_pointers)
    assert_same_scored(a.scored, b.scored)
    assert a.reto.summary() == b.reto.summary() and a.adaptive.summary() == b.adaptive.summary()
    assert a.knn.describe() == b.knn.describe() and a.knn.summary() == b.knn.summary()
    nb = a.scored.neighbors
    assert nb.retrieved is not None and 5 < int((~nb.retrieved).sum())  # some tokens skipped
    assert int((nb.retrieved & ~nb.searched).sum()) > 20  # some followed pointers


def test_stacked_with_skip_zero_is_retomaton_over_the_base(data):
    """Adaptive retrieval skipping nothing under RetoMaton: RetoMaton over the plain base, bit for bit."""
    got = stacked(data, skip=0.0)
    plain_reto, plain, _ = reto_score(data, make_base(data, "faiss"), True)
    assert_same_scored(got.scored, plain)
    assert got.reto.summary() == plain_reto.summary()
    assert got.adaptive.summary()["searched"] == got.adaptive.summary()["tokens"] == plain_reto.summary()["searched"]


@pytest.mark.parametrize("vectorised", [True, False])
def test_stacked_with_everything_skipped_is_the_lm_alone(data, vectorised):
    """Adaptive retrieval declining every token under RetoMaton: no search, no pointer, p_LM exactly."""
    lower = Recording(FaissRetriever(data.index, data.ds, k=K))
    reto = RetoMatonRetriever(AdaptiveRetriever(lower, data.pred, threshold=1.0), vectorised=vectorised)
    got = KNNLM(reto, lmbda=LMBDA).score(data.q, data.t, data.lp_lm,
                                          context=Context(lengths=data.lengths, lm_features=data.feats))
    assert lower.calls == [] and torch.equal(got.final, data.lp_lm)
    nb = got.neighbors
    assert not bool(nb.retrieved.any()) and not bool(nb.searched.any()) and not bool(nb.valid.any())
    assert reto.summary() == {"tokens": 165, "searched": 0, "searches_saved": 1.0}
    assert reto.base.summary()["tokens"] == 165  # every token was asked for: no pointer survived


@pytest.mark.parametrize("vectorised", [True, False])
def test_stacked_skipped_tokens_get_p_lm_and_break_the_chains(data, vectorised):
    """Tokens RetoMaton asked for and adaptive retrieval declined: p_LM exactly, not searched; the
    next token of the stream is asked for again (no pointer survives a skipped token)."""
    s = stacked(data, skip=0.5, vectorised=vectorised, record=True)
    nb, final = s.scored.neighbors.dense(), s.scored.final
    asked, searched = s.upper.tokens(data.q), s.lower.tokens(data.q)
    assert len(set(asked)) == len(asked) and set(searched) <= set(asked)
    skipped = sorted(set(asked) - set(searched))
    followed = sorted(set(range(len(data.q))) - set(asked))
    assert len(skipped) > 5 and len(followed) > 20 and len(searched) > 5
    sk = torch.tensor(skipped)
    assert torch.equal(final[sk], data.lp_lm[sk]) and bool(torch.isneginf(s.scored.lp_knn[sk]).all())
    assert not bool(nb.searched[sk].any()) and not bool(nb.retrieved[sk].any()) and not bool(nb.valid[sk].any())
    want_searched = torch.zeros(len(data.q), dtype=torch.bool)
    want_searched[torch.tensor(searched)] = True
    assert torch.equal(nb.searched, want_searched)
    fo = torch.tensor(followed)
    assert bool(nb.retrieved[fo].all()) and bool((nb.valid[fo].sum(1) >= 1).all())
    assert not torch.equal(final[fo], data.lp_lm[fo])
    stream = stream_of(data.lengths)
    after = [i + 1 for i in skipped if i + 1 < len(data.q) and stream[i + 1] == stream[i]]
    assert after and set(after) <= set(asked)
    # the counters: RetoMaton counts only real searches; adaptive retrieval the tokens it was asked
    assert s.reto.summary()["searched"] == len(searched) and s.adaptive.summary()["tokens"] == len(asked)


def test_stacked_summary_line(data):
    """KNNLM.describe() stacked: adaptive retrieval's line, then RetoMaton's 'in all'."""
    s = stacked(data, skip=0.5)
    line = s.knn.describe()
    ad, reto = s.adaptive.summary(), s.reto.summary()
    assert f"adaptive skip 0.5: {100 * ad['searches_saved']:.1f}% of {ad['tokens']} searches saved; " in line
    assert re.search(r"retomaton min-pointers 1: [0-9.]+% of 165 searches saved in all$", line), line
    assert f"{100 * reto['searches_saved']:.1f}% of 165 searches saved in all" in line
    assert ad["tokens"] < 165 and reto["searched"] == ad["searched"]


def test_factory_stacks_retomaton_over_adaptive(data, tmp_path):
    """knnlm.build with both options: RetoMaton over adaptive retrieval over FAISS, scoring as the
    stack built by hand; --adaptive-lambda with --retomaton refused by name."""
    build_index(data.prefix, str(tmp_path / "knn.index"), "Flat")
    data.pred.save(str(tmp_path / "pred.json"))
    opts = dict(knnlm=True, dstore_filename=data.prefix, indexfile=str(tmp_path / "knn.index"), k=K, lmbda=LMBDA,
                knn_temp=T, retomaton=True, adaptive_retrieval=str(tmp_path / "pred.json"))
    knn = knnlm.build(RetrievalOptions(**opts, adaptive_skip=0.5))
    r = knn.retriever
    assert type(r) is RetoMatonRetriever and type(r.base) is AdaptiveRetriever
    assert type(r.base.base) is FaissRetriever and r.base.setting == "skip 0.5"
    got = knn.score(data.q, data.t, data.lp_lm, context=Context(lengths=data.lengths, lm_features=data.feats))
    assert_same_scored(got, stacked(data, skip=0.5).scored)
    with pytest.raises(ConfigError, match="--adaptive-lambda"):
        knnlm.build(RetrievalOptions(**opts, adaptive_skip=0.5, adaptive_lambda=True))


# ----------------------------------------------------------------------------- 3. compact neighbors
def adaptive_over(data, **how):
    base = Recording(FaissRetriever(data.index, data.ds, k=K))
    return base, AdaptiveRetriever(base, data.pred, **how)


def test_adaptive_returns_compact_neighbors_whose_dense_rows_are_the_base_s(data):
    """Only the kept rows come back; dense() puts them at their tokens, the plain base's bits there,
    empty rows elsewhere; indexing and as_tuple give dense rows."""
    base, ad = adaptive_over(data, skip=0.5)
    nb = ad.retrieve(data.q, Context(lm_features=data.feats))
    kept = ad.last_kept
    n, m = len(data.q), int(kept.sum())
    assert 0.3 * n < m < 0.7 * n
    assert nb.compact and len(nb) == n and torch.equal(nb.rows, kept.nonzero().squeeze(1))
    assert torch.equal(nb.retrieved, kept) and nb.searched is None
    for f in ("distances", "values", "valid", "ids"):
        assert getattr(nb, f).shape == (m, K), f
    assert len(base.calls) == 1 and torch.equal(base.calls[0], data.q[kept])
    plain = FaissRetriever(data.index, data.ds, k=K).retrieve(data.q)
    dense = nb.dense()
    assert not dense.compact and len(dense) == n and dense.dense() is dense
    for f in ("distances", "values", "valid", "ids"):
        assert getattr(dense, f).shape == (n, K)
        assert torch.equal(getattr(dense, f)[kept], getattr(plain, f)[kept]), f
    assert not bool(dense.valid[~kept].any()) and bool((dense.ids[~kept] == -1).all())
    assert bool((dense.distances[~kept] == 0).all()) and bool((dense.values[~kept] == 0).all())
    assert torch.equal(nb.searched_mask(), kept)
    # __getitem__ (a mask, an index) and as_tuple: dense rows
    idx = torch.tensor([0, 3, 7, 50, n - 1])
    for rows in (idx, kept, ~kept):
        sub = nb[rows]
        assert not sub.compact and torch.equal(sub.retrieved, kept[rows])
        for f in ("distances", "values", "valid", "ids"):
            assert torch.equal(getattr(sub, f), getattr(dense, f)[rows]), f
    for got, want in zip(nb.as_tuple(return_ids=True), (dense.distances, dense.values, dense.valid, dense.ids)):
        assert torch.equal(got, want)
    assert len(nb.as_tuple()) == 3


@pytest.mark.parametrize("skip", [0.25, 0.6])
def test_adaptive_scores_equal_the_hand_reference(data, skip):
    """KNNLM.score with compact neighbors: the plain kNN-LM's final and lp_kNN where kept, p_LM
    (and -inf) where skipped, token by token."""
    base, ad = adaptive_over(data, skip=skip)
    knn = KNNLM(ad, lmbda=LMBDA, temperature=T)
    got = knn.score(data.q, data.t, data.lp_lm, context=Context(lm_features=data.feats))
    plain = KNNLM(FaissRetriever(data.index, data.ds, k=K), lmbda=LMBDA, temperature=T).score(
        data.q, data.t, data.lp_lm)
    kept = ad.last_kept
    assert got.neighbors.compact and 0 < int(kept.sum()) < len(kept)
    assert len(base.calls) == 1 and torch.equal(base.calls[0], data.q[kept])
    want = torch.where(kept, plain.final, data.lp_lm)
    assert torch.equal(got.final, want)
    assert torch.equal(got.lp_knn, plain.lp_knn.masked_fill(~kept, float("-inf")))
    assert not torch.equal(plain.final[kept], data.lp_lm[kept])  # the kept tokens really mixed p_kNN in
    assert knn.tally.searched == int(kept.sum())


def test_adaptive_everything_skipped_never_calls_the_base(data):
    """A threshold above every score: no base call, empty compact neighbors, p_LM everywhere."""
    base, ad = adaptive_over(data, threshold=1.0)
    knn = KNNLM(ad, lmbda=LMBDA, temperature=T)
    got = knn.score(data.q, data.t, data.lp_lm, context=Context(lm_features=data.feats))
    assert base.calls == [] and torch.equal(got.final, data.lp_lm)
    nb = got.neighbors
    assert nb.compact and len(nb.rows) == 0 and nb.distances.shape == (0, K) and len(nb) == len(data.q)
    assert not bool(nb.dense().valid.any()) and bool(torch.isneginf(got.lp_knn).all()) and knn.tally.searched == 0


def test_adaptive_next_token_distribution_equals_the_dense_computation(data):
    """Generation with adaptive retrieval: kept rows are the plain kNN-LM's distribution, skipped
    rows the LM's log-probs, bit for bit."""
    base, ad = adaptive_over(data, skip=0.5)
    got = KNNLM(ad, lmbda=LMBDA, temperature=T).next_token_log_probs(data.q, data.full)
    kept = ad.last_kept
    assert 0 < int(kept.sum()) < len(kept) and len(base.calls) == 1 and not base.orders[0]
    plain = KNNLM(FaissRetriever(data.index, data.ds, k=K), lmbda=LMBDA, temperature=T).next_token_log_probs(
        data.q, data.full)
    assert torch.equal(got[kept], plain[kept]) and torch.equal(got[~kept], data.full[~kept])
    assert not torch.equal(plain[kept], data.full[kept])


# ----------------------------------------------------------------------------- 4. features at scored positions
@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 256])
def test_lm_features_of_some_rows_equal_the_full_features_rows(chunk_rows):
    """lm_features(rows=idx) == lm_features(all)[idx], chunks smaller than idx included, any leading
    shape, fp16 input, repeated and empty idx."""
    g = torch.Generator().manual_seed(chunk_rows)
    lp = torch.log_softmax(3 * torch.randn(4, 9, 37, generator=g), -1)
    lp[1, 2, :30] = float("-inf")  # probability-0 tokens
    lp[1, 2] = torch.log_softmax(lp[1, 2], -1)
    full = lm_features(lp, top_k=5).reshape(-1, 6)
    for idx in (torch.randperm(36, generator=g)[:20], torch.arange(36), torch.tensor([5, 5, 0, 35]),
                torch.tensor([], dtype=torch.int64)):
        got = lm_features(lp, top_k=5, chunk_rows=chunk_rows, rows=idx)
        assert got.shape == (len(idx), 6) and torch.equal(got, full[idx])
    half = lp.half()
    idx = torch.tensor([1, 17, 30])
    assert torch.equal(lm_features(half, 2, chunk_rows, rows=idx), lm_features(half, 2).reshape(-1, 3)[idx])
    # top_k above the vocabulary: -inf columns, as without rows
    small = torch.log_softmax(torch.randn(6, 3, generator=g), -1)
    some = torch.tensor([4, 1])
    assert torch.equal(lm_features(small, 4, chunk_rows, rows=some), lm_features(small, 4)[some])
    assert bool(torch.isneginf(lm_features(small, 4, chunk_rows, rows=some)[:, 4]).all())


class FakeLM:
    """A 'model' whose decoder output is the log-probs themselves: get_normalized_probs hands back
    exactly the given tensors (views of them), as fairseq's SequenceScorer slices them."""

    def __init__(self, lp):
        self.lp, self.seen = lp, []

    def eval(self):
        return self

    def __call__(self, **net_input):
        return (self.lp, None)

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        self.seen.append(tuple(net_output[0].shape))
        return net_output[0] if log_probs else net_output[0].exp()


def fairseq_sample(target, start):
    return {"net_input": {"src_tokens": target.clone()}, "target": target.clone(),
            "start_indices": torch.tensor(start)}


@pytest.mark.parametrize("softmax_batch", [None, 7, 1000])
def test_feature_tap_gives_the_scored_positions_features(softmax_batch):
    """fairseq's own SequenceScorer (whole batch or --softmax-batch chunks) through FeatureTap:
    the features of the kept positions (context prefix and trailing pad left out), bit for bit."""
    pytest.importorskip("fairseq")
    from fairseq.sequence_scorer import SequenceScorer
    from fairseq_plugins.sequence_scorer import FeatureTap, KNNSequenceScorer

    pad = 1
    g = torch.Generator().manual_seed(3)
    b, t = 3, 10
    lp = torch.log_softmax(2 * torch.randn(b, t, V, generator=g), -1)
    target = torch.randint(2, V, (b, t), generator=g)
    target[1, 7:] = pad  # trailing padding
    target[2, 9:] = pad
    start = [0, 4, 6]  # a context window's prefix is not scored
    keep = torch.zeros(b, t, dtype=torch.bool)
    keep[0, :], keep[1, 4:7], keep[2, 6:9] = True, True, True
    sample = fairseq_sample(target, start)
    scorer_mask = KNNSequenceScorer._scored_mask(KNNSequenceScorer._spans(types.SimpleNamespace(pad=pad), sample),
                                                 sample["target"])
    assert torch.equal(scorer_mask, keep)  # the mask the scorer builds: the same positions
    tgt_dict = types.SimpleNamespace(pad=lambda: pad, eos=lambda: 2)
    model = FakeLM(lp)
    with FeatureTap(model, 4, keep) as tap:
        hypos = SequenceScorer(tgt_dict, softmax_batch=softmax_batch).generate([model], sample)
    assert "get_normalized_probs" not in vars(model)  # the tap is gone
    calls = 1 if softmax_batch in (None, 1000) else -(-b * t // softmax_batch)
    assert len(model.seen) == calls and (calls == 1 or model.seen[0] == (1, softmax_batch, V))
    want = lm_features(lp, 4).reshape(-1, 5)[keep.reshape(-1)]
    got = tap.result()
    assert got.shape == (int(keep.sum()), 5) and torch.equal(got, want)
    assert [len(h[0]["positional_scores"]) for h in hypos] == [10, 3, 3]
    # chunks that do not cover the mask: refused
    with FeatureTap(FakeLM(lp), 4, keep[:, :-1]) as short, pytest.raises(RuntimeError, match="positions"):
        SequenceScorer(tgt_dict, softmax_batch=softmax_batch).generate([short.model], fairseq_sample(target, start))
    longer = torch.cat([keep, keep[:1]])
    with FeatureTap(FakeLM(lp), 4, longer) as tap2:
        SequenceScorer(tgt_dict, softmax_batch=softmax_batch).generate([tap2.model], fairseq_sample(target, start))
    with pytest.raises(RuntimeError, match=f"LM features for {b * t} positions, expected {(b + 1) * t}"):
        tap2.result()


# ----------------------------------------------------------------------------- 5. exact distances
@pytest.mark.parametrize("sim", ["l2", "dot"])
def test_pair_distances_equal_exact_distances(data, sim):
    """(query, row) pairs flattened from an (n, m) ids matrix: FaissRetriever's fused kernel and the
    base Retriever's torch version each equal exact_distances element for element."""
    rng = np.random.default_rng(7)
    n, m = 40, 9
    qi_rows = rng.integers(0, len(data.q), n)
    ids = rng.integers(0, data.ds.size, (n, m))
    ids[3] = ids[2]  # repeated rows and pairs
    qi, flat = np.repeat(qi_rows, m), ids.reshape(-1)
    index = data.index if sim == "l2" else faiss.IndexFlatIP(D)
    if sim == "dot":
        index.add(data.keys)
    fr = FaissRetriever(index, data.ds, k=K, sim_func=sim)
    want = fr.exact_distances(data.q[qi_rows], ids)
    got = fr.pair_distances(data.q, qi, flat)
    assert got.dtype == torch.float32 and torch.equal(got.view(n, m), want)
    ex = ExactRetriever(data.ds, k=K, sim_func=sim)
    want_t = Retriever.exact_distances(ex, data.q[qi_rows], ids)
    for chunk in (65536, 7):
        got_t = Retriever.pair_distances(ex, data.q, qi, flat, chunk=chunk)
        assert torch.equal(got_t.view(n, m), want_t)
    assert torch.equal(ex.pair_distances(data.q.numpy(), qi, flat).view(n, m), ex.exact_distances(data.q[qi_rows], ids))
    torch.testing.assert_close(want, want_t)  # two kernels (their sums' order differs): close, not equal
    assert float(want.abs().min()) > 0 and len(set(want.reshape(-1).tolist())) > n


@pytest.mark.parametrize("n_rows", [5, 60])
def test_fused_distances_unsorted_small_blocks_equal_the_sorted_path(data, monkeypatch, n_rows):
    """A block below SORT_MIN_ROWS is recomputed in its own order: the same bits as sorting its pairs."""
    rng = np.random.default_rng(n_rows)
    ids = rng.integers(0, data.ds.size, (n_rows, K))
    ids[-1] = ids[0]
    q = np.ascontiguousarray(data.q.numpy()[rng.integers(0, len(data.q), n_rows)])
    out = {}
    for name, limit in (("sorted", 0), ("unsorted", 10 ** 9)):
        monkeypatch.setattr(faiss_search, "SORT_MIN_ROWS", limit)
        fr = FaissRetriever(data.index, data.ds, k=K)
        seen = []
        inner = fr._pairwise_sorted

        def record(q_, qi, rows, dist, sources, inner=inner, seen=seen):
            seen.append(bool(np.all(rows[1:] >= rows[:-1])))
            return inner(q_, qi, rows, dist, sources)

        fr._pairwise_sorted = record
        out[name] = fr._fused_distances(q, ids)
        assert seen == [name == "sorted"]  # the path asked for was the one taken
    assert out["sorted"].shape == (n_rows, K) and np.array_equal(out["sorted"], out["unsorted"])
    pairs = FaissRetriever(data.index, data.ds, k=K).pair_distances(q, np.repeat(np.arange(n_rows), K), ids.reshape(-1))
    assert np.array_equal(out["unsorted"], pairs.numpy().reshape(n_rows, K))


# ----------------------------------------------------------------------------- 6. stage timings
def test_stage_timings(data):
    """After scoring: search, recompute and scoring timed; RetoMaton adds pointers, adaptive
    retrieval the predictor; the line's fixed wording."""
    STAGES.reset()
    assert STAGES.as_dict() == {} and STAGES.line() == ""
    KNNLM(FaissRetriever(data.index, data.ds, k=K), lmbda=LMBDA).score(data.q, data.t, data.lp_lm)
    d = STAGES.as_dict()
    assert d["search"] > 0 and d["scoring"] > 0 and d["recompute"] > 0 and "pointers" not in d
    STAGES.reset()
    stacked(data, skip=0.5)
    d = STAGES.as_dict()
    assert d["pointers"] > 0 and d["predictor"] > 0 and d["search"] > 0 and d["scoring"] > 0
    line = STAGES.line()
    assert line.startswith("kNN-LM time: ") and re.fullmatch(r"kNN-LM time: (\w+ [0-9.]+ s, )*\w+ [0-9.]+ s", line)
    assert list(d) == [s for s in ("predictor", "search", "recompute", "pointers", "scoring") if s in d]
    STAGES.reset()


def test_entropy_in_place_equals_the_where_formula_bit_for_bit():
    """lm_features' entropy is -nansum(exp(lp) * lp) computed in place (2.8x faster); it equals the
    previous -sum(where(p > 0, p * lp, 0)) bit for bit, zero probabilities (log p = -inf) included."""
    from knnlm.retrieval.adaptive.features import lm_features

    torch.manual_seed(0)
    for v in (5, 16, 100, 6944):
        for n in (1, 3, 300):
            lp = torch.log_softmax(torch.randn(n, v) * 4, -1)
            lp[:, :2] = float("-inf")
            p = lp.exp()
            old = -torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1)
            assert torch.equal(lm_features(lp, 3)[:, 0], old)
