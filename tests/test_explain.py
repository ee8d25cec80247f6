"""The neighbor explorer (knnlm-explain): the summaries' math against values worked out by hand,
the datastore text behind neighbors (plain, sharded, pruned), the vocabularies, named errors,
and the page's embedded data against the export and datastore read independently. The page in
a real browser: tests/test_explain_browser.py."""

import base64
import json
import math
import re

import numpy as np
import pytest

from knnlm.errors import ConfigError, KNNLMError, MismatchError
from knnlm.explain import summaries as S
from knnlm.explain.source import DatastoreText, Segment
from knnlm.explain.vocab import read_dict
from knnlm.store import Datastore, DatastoreWriter

from .explain_fixtures import build_explain_setup, explain, partial_export, reference_gains
from .helpers import build_index


@pytest.fixture(scope="module")
def ex(tiny, tmp_path_factory):
    return build_explain_setup(tiny, tmp_path_factory.mktemp("explain"))


# ----------------------------------------------------------------------------- summaries by hand
def test_gains_interpolate_and_unsearched_tokens_keep_p_lm():
    lp_lm, lp_knn = np.log([0.2, 0.5, 0.1]), np.log([0.6, 0.1, 0.0 + 1e-30])
    final = S.final_log_probs(lp_lm, lp_knn, 0.5)
    # 0.5 * 0.6 + 0.5 * 0.2 = 0.4; 0.5 * 0.1 + 0.5 * 0.5 = 0.3; ~0.05
    assert np.allclose(np.exp(final), [0.4, 0.3, 0.05], rtol=1e-5)
    g = S.gains(lp_lm, final)
    assert np.allclose(g, [math.log(2), math.log(0.6), math.log(0.5)], atol=1e-6)
    g2 = S.gains(lp_lm, S.final_log_probs(lp_lm, lp_knn, 0.5, searched=np.array([True, False, True])))
    assert g2[1] == 0.0 and np.isclose(g2[0], math.log(2), atol=1e-6)
    assert np.array_equal(S.final_log_probs(lp_lm, lp_knn, 0.0), lp_lm.astype(np.float32).astype(np.float64))


def test_frequency_buckets_by_hand():
    idx, labels = S.frequency_buckets([0, 1, 9, 10, 99, 100, 1234, 5])
    assert idx.tolist() == [0, 1, 1, 2, 2, 3, 4, 1]
    assert labels == ["0", "1-9", "10-99", "100-999", "1,000-9,999"]
    assert S.frequency_buckets([0, 0])[1] == ["0", "1-9"]


def test_longest_matches_by_hand():
    # Datastore text 5 6 7 8 5 6 9: entry i's context n-gram is text[i-n:i], so the n-grams
    # found are the windows of 5 6 7 8 5 6 (the last token ends no context).
    text = np.array([5, 6, 7, 8, 5, 6, 9])
    stream = np.array([5, 6, 7, 8, 5, 6, 3, 5, 9, 9])
    ctx = S.text_contexts(stream, 8)
    assert ctx[2].tolist() == [-1] * 6 + [5, 6]
    got = S.longest_matches(text, ctx, 8)
    # token: 0 no context; 1: "5"; 2: "5 6"; 3: "5 6 7"; 4: "5 6 7 8"; 5: "5 6 7 8 5";
    # 6: "5 6 7 8 5 6" (the whole text before 9); 7: "... 3" (3 never occurs): 0; 8: "3 5" no,
    # "5" yes: 1; 9: "9" only ends the text, it precedes no entry: 0
    assert got.tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 0]
    capped = S.longest_matches(text, S.text_contexts(stream, 4), 4)
    assert capped.tolist() == [0, 1, 2, 3, 4, 4, 4, 0, 1, 0]
    idx, labels = S.match_buckets(capped, 4)
    assert labels == ["0", "1", "2", "3", "4+"] and idx.tolist() == capped.tolist()


def test_helps_hurts_shares_by_hand():
    rows = {r["group"]: r for r in S.helps_hurts([1.0, -0.5, 0.0, 2.0, -1.5])}
    assert rows["helps"] == {"group": "helps", "tokens": 2, "token_share": 0.4, "total_gain": 3.0, "abs_share": 0.6}
    assert rows["hurts"] == {"group": "hurts", "tokens": 2, "token_share": 0.4, "total_gain": -2.0, "abs_share": 0.4}
    assert rows["no change"]["tokens"] == 1 and rows["no change"]["abs_share"] == 0.0


def test_group_table_by_hand():
    gain = np.array([1.0, -0.5, 0.5, 2.0])
    lp_lm = np.log([0.1, 0.5, 0.2, 0.05])
    lp_final = lp_lm + gain
    rows = S.group_table(gain, lp_lm, lp_final, np.array([0, 1, 1, 0]), ["a", "b", "c"])
    a, b, c = rows
    assert a["tokens"] == 2 and a["token_share"] == 0.5 and a["total_gain"] == 3.0 and a["mean_gain"] == 1.5
    assert a["gain_share"] == pytest.approx(3.0 / 3.0) and b["gain_share"] == pytest.approx(0.0)
    assert a["ppl_lm"] == pytest.approx(1 / math.sqrt(0.1 * 0.05))
    assert a["ppl_knnlm"] == pytest.approx(math.exp(-(math.log(0.1) + 1 + math.log(0.05) + 2) / 2))
    assert c["tokens"] == 0 and math.isnan(c["mean_gain"])


def test_knn_and_lm_ranks_by_hand():
    # p(neighbor) ~ exp(-d): value 7: e^-1 = .368; value 8: e^-2 + e^-3 = .185; value 9: e^-4 = .018
    d = np.array([[1.0, 2.0, 3.0, 4.0]] * 4)
    v = np.array([[7, 8, 8, 9]] * 4)
    assert S.knn_ranks(d, v, np.array([8, 7, 9, 5]), "l2", 1.0).tolist() == [2, 1, 3, 0]
    # weights: value 9 stands for 100 entries: 1.83 beats both
    w = np.array([[1, 1, 1, 100]] * 4)
    assert S.knn_ranks(d, v, np.array([8, 7, 9, 5]), "l2", 1.0, w).tolist() == [3, 2, 1, 0]
    # a missing neighbor (NaN distance) counts for nothing; dot: larger is nearer
    d2 = np.array([[1.0, np.nan, 3.0, 4.0]])
    assert S.knn_ranks(d2, np.array([[7, 8, 9, 9]]), np.array([8]), "l2", 1.0).tolist() == [0]
    assert S.knn_ranks(np.array([[1.0, 5.0]]), np.array([[7, 8]]), np.array([8]), "dot", 1.0).tolist() == [1]
    names = ["entropy", "top1_log_prob", "top2_log_prob", "top3_log_prob"]
    feats = np.array([[2.0, -1.0, -2.0, -3.0]] * 3)
    assert S.lm_ranks(feats, names, np.array([-2.0, -5.0, -1.0])).tolist() == [2, -1, 1]
    assert S.lm_ranks(None, None, np.array([-2.0])).tolist() == [0]


def test_top_tokens():
    best, worst = S.top_tokens(np.array([0.5, -1.0, 2.0, 0.0, -3.0, 1.0]), 2)
    assert best == [2, 5] and worst == [4, 1]


# ----------------------------------------------------------------------------- datastore text
def test_snippets_compact_overlapping_windows():
    t = DatastoreText.__new__(DatastoreText)
    t.offsets = np.array([0, 100, 150])
    t.segments = [Segment(np.arange(100) + 1000), Segment(np.arange(50) + 5000)]
    seg = np.array([0, 0, 0, 0, 1, 1])
    pos = np.array([10, 12, 50, 3, 0, 12])
    toks, q, clen = t.snippets(seg, pos, 5)
    for s, p, qi, c in zip(seg, pos, q, clen):
        vals = t.segments[s].vals
        assert toks[qi] == vals[p]
        assert c == min(5, p) and toks[qi - c:qi].tolist() == vals[p - c:p].tolist()
    # [5, 11) and [7, 13) merge into 8 tokens; [45, 51): 6; [0, 4): 4; shard 2: [0, 1) and [7, 13)
    assert len(toks) == 8 + 6 + 4 + 1 + 6


def _store(path, vals, dim=4, seed=0):
    w = DatastoreWriter(str(path), dim, keytype="last_ffn_input", dict_size=50, dict_fingerprint="f" * 16)
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((len(vals), dim)).astype(np.float32)
    keys[1::2] = keys[0::2][: len(keys[1::2])] + 1e-3  # near-duplicate pairs with the same... value or not
    w.add(keys, np.asarray(vals))
    w.finalize()
    return Datastore.open(str(path), load_keys=False)


def test_sharded_and_pruned_datastores_read_their_text(tmp_path):
    from knnlm.offline.prune import prune
    from knnlm.store.sharded import open_datastore, write_manifest

    vals = np.repeat(np.arange(20) % 7, 2)  # pairs: entry 2i and 2i+1 share key (almost) and value
    a = _store(tmp_path / "a", vals)
    b = _store(tmp_path / "b", np.arange(30) % 5 + 10, seed=1)
    write_manifest(str(tmp_path / "ab_shards.json"), [a.prefix, b.prefix])
    ab = open_datastore(str(tmp_path / "ab_shards.json"), load_keys=False)
    text = DatastoreText(ab)
    seg, pos = text.locate(np.array([0, 39, 40, 69]))
    assert seg.tolist() == [0, 0, 1, 1] and pos.tolist() == [0, 39, 0, 29]
    assert text.window(1, 0, 5).tolist() == []  # a shard's text never reaches into the previous one

    build_index(a.prefix, str(tmp_path / "a.flat"))
    prune(a.prefix, str(tmp_path / "a.flat"), str(tmp_path / "p"), k=1)
    p = Datastore.open(str(tmp_path / "p"), load_keys=False)
    assert p.size < a.size and p.meta["source_rows_file"] == "p_source_rows.npy"
    rows = np.load(tmp_path / "p_source_rows.npy")
    assert np.array_equal(np.asarray(a.vals)[rows], np.asarray(p.vals))
    text = DatastoreText(p)
    seg, pos = text.locate(np.arange(p.size))
    assert np.array_equal(pos, rows)  # the source's rows, so the text before is the source's
    assert np.array_equal(np.asarray(text.segments[0].vals), np.asarray(a.vals))
    # reduced (PCA) keys keep the rows: the text is the datastore's own values
    from knnlm.store.reduce import reduce_keys

    reduce_keys(a.prefix, str(tmp_path / "pca"), 2)
    text = DatastoreText(Datastore.open(str(tmp_path / "pca"), load_keys=False))
    assert np.array_equal(text.locate(np.arange(a.size))[1], np.arange(a.size))
    assert np.array_equal(text.values(), np.asarray(a.vals))
    # a pruned datastore from before source rows were recorded: a named error, not wrong text
    meta = json.loads((tmp_path / "p_meta.json").read_text())
    del meta["source_rows_file"]
    (tmp_path / "p_meta.json").write_text(json.dumps(meta))
    with pytest.raises(KNNLMError, match="prune it again"):
        DatastoreText(Datastore.open(str(tmp_path / "p"), load_keys=False))


# ----------------------------------------------------------------------------- vocabularies
def test_dict_reads_as_fairseq_does(ex):
    from fairseq.data import Dictionary

    v = read_dict(ex["dict"])
    assert v.pieces == Dictionary.load(ex["dict"]).symbols
    assert v.fingerprint == Datastore.open(ex["ds"], load_keys=False).meta["dict_fingerprint"]
    assert v.text([v.pieces.index("cat"), 2, v.pieces.index("the")]) == "cat \n the"


def test_tokenizer_vocab_matches_an_hf_datastore(tmp_path):
    pytest.importorskip("transformers")
    from knnlm.hf.cli import main as hf_main
    from knnlm.hf.vocab import read_tokenizer

    from .test_hf import WORDS, make_tokenizer, text, tiny

    tok = make_tokenizer(WORDS)
    tiny("gpt2", len(tok), seed=0).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    make_tokenizer(WORDS + WORDS[-6:] * 3).save_pretrained(tmp_path / "other_tok")
    (tmp_path / "train.txt").write_text(text(30, 1))
    (tmp_path / "valid.txt").write_text(text(6, 2))
    assert hf_main(["dump", "--model", str(tmp_path / "model"), "--text", str(tmp_path / "train.txt"),
                    "--max-length", "24", "--stride", "12", "--dstore-mmap", str(tmp_path / "ds")]) == 0
    build_index(str(tmp_path / "ds"), str(tmp_path / "ds.flat"))
    assert hf_main(["eval", "--model", str(tmp_path / "model"), "--text", str(tmp_path / "valid.txt"),
                    "--max-length", "24", "--stride", "12", "--knnlm", "--dstore-filename", str(tmp_path / "ds"),
                    "--indexfile", str(tmp_path / "ds.flat"), "--k", "8", "--lmbda", "0.3",
                    "--knnlm-dump-probs", str(tmp_path / "export"), "--knnlm-dump-ids"]) == 0
    v = read_tokenizer(str(tmp_path / "model"))
    assert v.pieces[tok.convert_tokens_to_ids("the")] == "the"
    p = explain(tmp_path / "export", "--datastore", tmp_path / "ds", "--tokenizer", tmp_path / "model",
                "-o", tmp_path / "hf.html")
    assert "wrote" in p.stdout and (tmp_path / "hf.html").stat().st_size > 0
    data = page_data(tmp_path / "hf.html")
    from knnlm.offline.export import load_export

    e = load_export(str(tmp_path / "export"))
    assert np.array_equal(data["tok"], e.targets) and data["meta"]["tokens"] == e.count
    p = explain(tmp_path / "export", "--datastore", tmp_path / "ds", "--tokenizer", tmp_path / "other_tok",
                "-o", tmp_path / "bad.html", check=False)
    assert p.returncode == 2 and "MismatchError" not in p.stderr and "is not the vocabulary of datastore" in p.stderr
    assert not (tmp_path / "bad.html").exists()


# ----------------------------------------------------------------------------- the page's data
def page_data(path):
    """The page's embedded JSON with its base64 arrays decoded (as the page's script does)."""
    html = path.read_text() if hasattr(path, "read_text") else open(path).read()
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', html, re.S)
    data = json.loads(m.group(1).replace("<\\/", "</"))
    out = {"meta": data["meta"], "vocab": data["vocab"]}
    for k, a in data["arrays"].items():
        out[k] = np.frombuffer(base64.b64decode(a["b64"]), dtype=np.dtype(a["dtype"]).newbyteorder("<"))
    return out


def test_page_data_equal_the_export_and_datastore(ex, tmp_path):
    from knnlm.offline.export import load_export

    out = tmp_path / "page.html"
    p = explain(ex["export"], "--datastore", ex["ds"], "--dict", ex["dict"], "-o", out, "--neighbors", "5",
                "--context", "7")
    assert re.search(r"wrote .*page\.html: \d[\d,]* tokens, perplexity [\d.]+ -> [\d.]+", p.stdout)
    html = out.read_text()
    assert "http://" not in html and "https://" not in html  # nothing to fetch
    e = load_export(ex["export"])
    ds = Datastore.open(ex["ds"], load_keys=False)
    d = page_data(out)
    n, S_ = e.count, 5
    assert d["meta"]["tokens"] == n and d["meta"]["neighbors_shown"] == S_
    assert np.array_equal(d["tok"], e.targets)
    assert np.allclose(d["lp_final"] - d["lp_lm"], reference_gains(ex["export"]), atol=1e-5)
    ids = np.asarray(e.ids[:, :S_]).reshape(-1)
    assert np.array_equal(d["nb_id"], ids)
    vals = np.asarray(ds.vals)
    for j in np.flatnonzero(ids >= 0)[::7]:
        q, c = d["nb_q"][j], d["nb_clen"][j]
        assert d["snip"][q] == vals[ids[j]]
        assert d["snip"][q - c:q].tolist() == vals[max(0, ids[j] - 7):ids[j]].tolist()
    # the target's count in the datastore, by bincount of the values
    assert np.array_equal(d["freq"], np.bincount(vals, minlength=len(d["vocab"]))[e.targets])
    # test text = train lines 100-160: most contexts are found whole (8+), the first token's is empty
    assert d["match"][0] == 0 and (d["match"] == 8).mean() > 0.5


def test_named_errors(ex, tmp_path):
    out = tmp_path / "x.html"
    p = explain(ex["export_noids"], "--datastore", ex["ds"], "--dict", ex["dict"], "-o", out, check=False)
    assert p.returncode == 2 and "no neighbor ids" in p.stderr and "--knnlm-dump-ids" in p.stderr
    # another datastore: the same values, dumped again (a new fingerprint)
    src = Datastore.open(ex["ds"])
    w = DatastoreWriter(str(tmp_path / "other"), src.dim, keytype=src.meta["keytype"], dict_size=src.meta["dict_size"],
                        dict_fingerprint=src.meta["dict_fingerprint"], model_fingerprint=src.meta["model_fingerprint"])
    w.add(np.asarray(src.keys), np.asarray(src.vals))
    w.finalize()
    p = explain(ex["export"], "--datastore", tmp_path / "other", "--dict", ex["dict"], "-o", out, check=False)
    assert p.returncode == 2 and "was scored against datastore" in p.stderr and ex["ds"] in p.stderr
    # a dictionary that is not the datastore's: two words swapped
    lines = open(ex["dict"]).read().splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    (tmp_path / "dict.txt").write_text("\n".join(lines) + "\n")
    p = explain(ex["export"], "--datastore", ex["ds"], "--dict", tmp_path / "dict.txt", "-o", out, check=False)
    assert p.returncode == 2 and "is not the vocabulary of datastore" in p.stderr and "fingerprint" in p.stderr
    (tmp_path / "bad.txt").write_text("just-one-field\n")
    p = explain(ex["export"], "--datastore", ex["ds"], "--dict", tmp_path / "bad.txt", "-o", out, check=False)
    assert p.returncode == 2 and "expected 'WORD COUNT'" in p.stderr
    p = explain(ex["export"], "--datastore", ex["ds"], "--dict", ex["dict"], "-o", out, "--neighbors", "0",
                check=False)
    assert p.returncode == 2 and "--neighbors must be at least 1" in p.stderr
    assert not out.exists()
    with pytest.raises(ConfigError):
        read_dict(str(tmp_path / "missing.txt"))
    assert issubclass(MismatchError, KNNLMError)


def test_tokens_not_searched_are_marked_and_keep_p_lm(ex, tmp_path):
    """An adaptive-retrieval run's export (searched.npy, unsearched "lm_only"): re-scoring
    refuses it, the explorer shows it with p_LM alone on the tokens not searched."""
    from knnlm.offline.export import load_export

    searched = partial_export(ex["export"], tmp_path / "partial")
    with pytest.raises(ConfigError, match="searched only some tokens"):
        load_export(str(tmp_path / "partial"))
    assert np.array_equal(load_export(str(tmp_path / "partial"), partial_search=True).searched, searched)
    out = tmp_path / "partial.html"
    explain(tmp_path / "partial", "--datastore", ex["ds"], "--dict", ex["dict"], "-o", out)
    d = page_data(out)
    assert np.array_equal(d["searched"].astype(bool), searched)
    assert np.array_equal(d["lp_final"][~searched], d["lp_lm"][~searched])
    assert np.allclose((d["lp_final"] - d["lp_lm"])[searched], reference_gains(ex["export"])[searched], atol=1e-5)
    assert f"{(~searched).sum():,} tokens were not searched (p_LM alone" in out.read_text()
    # RetoMaton: the tokens that followed pointers keep their p_kNN
    partial_export(ex["export"], tmp_path / "reto", kind="pointers")
    explain(tmp_path / "reto", "--datastore", ex["ds"], "--dict", ex["dict"], "-o", tmp_path / "reto.html")
    d = page_data(tmp_path / "reto.html")
    assert np.allclose(d["lp_final"] - d["lp_lm"], reference_gains(ex["export"]), atol=1e-5)
    assert "RetoMaton's pointers" in (tmp_path / "reto.html").read_text()


def test_searched_masks_of_retomaton_and_adaptive_runs_round_trip(tmp_path):
    """What a front-end hands the export for RetoMaton and adaptive runs: the retriever's own
    record of the tokens it searched (Retriever.unsearched, Neighbors.searched_mask())."""
    import faiss
    import torch

    from knnlm import KNNLM, Context, FaissRetriever
    from knnlm.offline.export import ExportWriter, load_export
    from knnlm.retrieval.adaptive import AdaptiveRetriever
    from knnlm.retrieval.retomaton import RetoMatonRetriever

    from .test_adaptive import make_predictor

    rng = np.random.default_rng(0)
    text = rng.integers(0, 20, size=201)
    keys = rng.normal(size=(200, 8)).astype(np.float32)
    w = DatastoreWriter(str(tmp_path / "ds"), 8, keytype="x", dict_size=20, dict_fingerprint="f",
                        extra={"sample_break_mode": "none"})
    w.add(keys, text[1:])
    w.finalize()
    ds = Datastore.open(str(tmp_path / "ds"))
    index = faiss.IndexFlatL2(8)
    index.add(keys)
    q = torch.from_numpy(keys[50:90] + 0.01 * rng.normal(size=(40, 8)).astype(np.float32))
    t = torch.from_numpy(text[51:91])
    lp_lm = torch.full((40,), -2.0)
    feats = torch.from_numpy(rng.normal(size=(40, 4)).astype(np.float32))
    runs = {
        "pointers": (RetoMatonRetriever(FaissRetriever(index, ds, k=4), min_pointers=2), Context(lengths=[40])),
        "lm_only": (AdaptiveRetriever(FaissRetriever(index, ds, k=4), make_predictor(feats, ds), skip=0.5),
                    Context(lm_features=feats)),
    }
    for kind, (retriever, state) in runs.items():
        assert retriever.unsearched == kind
        scored = KNNLM(retriever, lmbda=0.3).score(q, t, lp_lm, context=state, nearest_first=True)
        mask = scored.neighbors.searched_mask()
        assert int(mask.sum()) == retriever.searched and 0 < retriever.searched < 40
        n = scored.neighbors.dense()  # adaptive retrieval's are compact (the searched rows only)
        wr = ExportWriter(str(tmp_path / kind), 4, sim_func="l2", temperature=1.0, lmbda=0.3, with_ids=True,
                          unsearched=kind)
        wr.add(lp_lm, scored.lp_knn, t, dists=n.distances, ids=n.ids, vals=n.values, valid=n.valid, searched=mask)
        wr.finalize()
        e = load_export(str(tmp_path / kind), partial_search=True)
        assert np.array_equal(e.searched, mask.numpy()) and e.meta["unsearched"] == kind
    assert FaissRetriever(index, ds, k=4).unsearched is None
