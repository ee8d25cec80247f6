"""Reliability, round three (issue 29): memorisation caught by content, the Python API's boundary
checks, byte order, names too long, stale locks, SIGTERM, and the messages. The writers' faults
(full disk, kills, foreign files) are tests/test_faults.py.
"""

import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from knnlm import KNNLM, FaissRetriever
from knnlm.artefacts import AtomicOutput, check_names
from knnlm.checks import Report, check_artefacts
from knnlm.errors import (ConfigError, CorruptError, InputError, KNNLMError, MemorisationError, MismatchError,
                          OutputExistsError)
from knnlm.index.builder import build_index as knnlm_build_index
from knnlm.index.plan import load_config
from knnlm.memorisation import K, NGRAM, TokenSketch, check_memorisation, estimate, ngram_hashes
from knnlm.store import open_datastore
from knnlm.store import Datastore, DatastoreWriter
from knnlm.validation import check_distribution, check_score_inputs

from .forkrun import ForkRunner
from .helpers import knn_argv

N, D, V = 300, 8, 20
TPS = ("--tokens-per-sample", "64")


def make_store(prefix, vals=None, n=N, seed=0, **kw):
    rng = np.random.default_rng(seed)
    vals = rng.integers(0, V, size=n) if vals is None else np.asarray(vals)
    keys = rng.normal(size=(len(vals), D)).astype(np.float32)
    w = DatastoreWriter(str(prefix), D, keytype="last_ffn_input", dict_size=V, dict_fingerprint="d0",
                        model_fingerprint="m0", **kw)
    for s in range(0, len(vals), 37):  # several batches: the sketch streams across them
        w.add(keys[s:s + 37], vals[s:s + 37])
    w.finalize()
    return keys, vals


def flat(prefix, index):
    return knnlm_build_index({"dstore_mmap": str(prefix), "faiss_index": str(index), "factory": "Flat", "threads": 1})


# ============================================================================ memorisation by content
def exact_overlap(a, b, n=NGRAM):
    """The reference: (Jaccard, containment of b in a) of the two n-gram sets, by Python sets of tuples."""
    sa = {tuple(a[i:i + n]) for i in range(len(a) - n + 1)}
    sb = {tuple(b[i:i + n]) for i in range(len(b) - n + 1)}
    return len(sa & sb) / len(sa | sb), len(sa & sb) / len(sb)


def test_streaming_sketch_equals_the_sketch_of_the_whole_stream():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 50, size=20_000)
    whole = TokenSketch.of(t)
    parts = TokenSketch()
    for s in range(0, len(t), 333):  # windows that straddle pieces are counted once, as in the whole
        parts.add(t[s:s + 333])
    np.testing.assert_array_equal(parts.hashes, whole.hashes)
    assert len(whole.hashes) == K and parts.tokens == len(t)
    assert len(set(ngram_hashes(t).tolist())) == len({tuple(t[i:i + NGRAM]) for i in range(len(t) - NGRAM + 1)})


@pytest.mark.parametrize("shared", [0.0, 0.3, 0.7, 1.0])
def test_resemblance_estimate_agrees_with_the_exact_jaccard(shared):
    rng = np.random.default_rng(1)
    n = 30_000
    a = rng.integers(0, 1000, size=n)
    cut = int(shared * n)
    b = np.concatenate([a[:cut], rng.integers(0, 1000, size=n - cut)])
    est = estimate(TokenSketch.of(a).hashes, K, b)
    jaccard, containment = exact_overlap(a, b)
    # bottom-k standard error is sqrt(J (1 - J) / K) < 0.011: 4 of them; containment from ~K samples
    assert abs(est["resemblance"] - jaccard) < 0.045, (est, jaccard)
    assert abs(est["containment"] - containment) < 0.05, (est, containment)


def test_the_dumped_text_is_refused_other_text_passes_and_old_datastores_say_so(tmp_path, caplog):
    rng = np.random.default_rng(2)
    text = rng.integers(0, V, size=N)
    make_store(tmp_path / "ds", vals=text)
    ds = Datastore.open(str(tmp_path / "ds"))
    assert ds.meta["token_sketch"]["tokens"] == N
    with pytest.raises(MemorisationError, match="was dumped from.*--knn-allow-same-split"):
        check_memorisation(ds, text)
    with pytest.raises(MismatchError):  # a MemorisationError is a MismatchError: old handlers still catch it
        check_memorisation(ds, np.concatenate([[3], text]))  # the scored stream has one token more (a BOS)
    assert check_memorisation(ds, text, allow=True)["resemblance"] == 1.0
    assert check_memorisation(ds, rng.integers(0, V, size=N))["resemblance"] < 0.1
    # a datastore dumped before sketches: works, and the check says it could not be done
    meta = dict(ds.meta)
    del meta["token_sketch"]
    ds.meta = meta
    with caplog.at_level(logging.WARNING):
        assert check_memorisation(ds, text) is None
    assert "could not be checked" in caplog.text


@pytest.fixture(scope="module")
def runner():
    r = ForkRunner()
    yield r
    r.close()


def test_a_byte_identical_copy_of_the_data_directory_is_caught(tiny, runner, tmp_path):
    """The same-split refusal compared paths: a copy of the data got through (issue 29)."""
    prefix, index = tmp_path / "valid_ds", tmp_path / "valid.index"
    r = runner.run("fairseq-eval-lm", knn_argv(tiny["data"], tiny["ckpt"], *TPS, "--gen-subset", "valid",
                                               "--save-knnlm-dstore", "--dstore-mmap", prefix))
    assert r.returncode == 0, str(r)
    flat(prefix, index)
    copy = tmp_path / "copy_of_bin"
    shutil.copytree(tiny["data"], copy)
    knn = ("--gen-subset", "valid", "--knnlm", "--dstore-filename", prefix, "--indexfile", index, "--k", "8")
    r = runner.run("fairseq-eval-lm", knn_argv(str(copy), tiny["ckpt"], *TPS, *knn))
    assert r.returncode == 1 and "MemorisationError: split 'valid'" in r.stderr, str(r)
    assert "--knn-allow-same-split" in r.stderr and "Traceback" not in r.stderr
    r = runner.run("fairseq-eval-lm", knn_argv(str(copy), tiny["ckpt"], *TPS, *knn, "--knn-allow-same-split"))
    assert r.returncode == 0 and "kNN-LM perplexity" in r.output, str(r)
    # another split of the same data scores as before
    r = runner.run("fairseq-eval-lm", knn_argv(str(copy), tiny["ckpt"], *TPS, *knn[2:], "--gen-subset", "test"))
    assert r.returncode == 0 and "kNN-LM perplexity" in r.output, str(r)


# ============================================================================ the API's boundary
@pytest.fixture
def knn(tmp_path):
    make_store(tmp_path / "ds")
    flat(tmp_path / "ds", tmp_path / "ds.index")
    return KNNLM(FaissRetriever(str(tmp_path / "ds.index"), open_datastore(str(tmp_path / "ds")), k=8, nprobe=1),
                 lmbda=0.5, temperature=2.0)


def batch(n=40, seed=5):
    rng = np.random.default_rng(seed)
    lp = torch.log_softmax(torch.from_numpy(rng.normal(size=(n, V)).astype(np.float32)), -1)
    t = torch.from_numpy(rng.integers(0, V, size=n))
    return torch.from_numpy(rng.normal(size=(n, D)).astype(np.float32)), t, lp


def test_ordinary_input_gives_bit_identical_results(knn):
    q, t, lp = batch()
    lp_t = lp.gather(1, t[:, None])[:, 0]
    scored = knn.score(q, t, lp_t)
    n = knn.retrieve(q)  # the same computation without the boundary checks
    by_hand = knn.mix(lp_t.float(), knn.knn_log_prob(n, t))
    assert torch.equal(scored.final, by_hand)
    full = knn.next_token_log_probs(q, lp)
    from knnlm.scoring import knn_full_log_probs

    assert torch.equal(full, knn_full_log_probs(lp, knn.neighbor_scores(n), n.values, knn.lmbda, n.valid))


BAD_SCORE = {
    "positive lp_lm (an NLL)": (lambda q, t, lp: (q, t, -lp), "lp_lm\\[0\\] = .* is not a log-probability.*positive"),
    "NaN lp_lm": (lambda q, t, lp: (q, t, torch.where(torch.arange(len(lp)) == 3, torch.nan, lp)), "lp_lm\\[3\\] = nan"),
    "target outside the vocabulary": (lambda q, t, lp: (q, t + V, lp), "targets must lie in \\[0, 20\\)"),
    "negative target": (lambda q, t, lp: (q, t - 100, lp), "targets must lie in \\[0, 20\\)"),
    "float targets": (lambda q, t, lp: (q, t.float(), lp), "targets must be integer token ids"),
    "lengths": (lambda q, t, lp: (q, t[:-1], lp), "lengths do not match"),
    "queries not 2-D": (lambda q, t, lp: (q[0], t, lp), "queries must be \\(N, D\\)"),
    "numpy lp_lm": (lambda q, t, lp: (q, t, lp.numpy()), "lp_lm must be a torch tensor"),
}


@pytest.mark.parametrize("case", list(BAD_SCORE))
def test_score_refuses_what_cannot_be_log_probabilities(knn, case):
    q, t, lp = batch()
    lp_t = lp.gather(1, t[:, None])[:, 0]
    make, message = BAD_SCORE[case]
    with pytest.raises(InputError, match=message):
        knn.score(*make(q, t, lp_t))
    assert knn.summary() is None  # nothing was counted


def test_next_token_log_probs_refuses_logits_and_a_float_k_is_refused(knn, tmp_path):
    q, _, lp = batch()
    with pytest.raises(InputError, match="is not a log-probability.*a positive value.*logits"):
        knn.next_token_log_probs(q, lp + 3.0)  # raw logits: some positive
    shifted = lp - torch.linspace(2.0, 4.0, len(lp))[:, None]  # all <= 0 but rows sum to e^-2..e^-4
    with pytest.raises(InputError, match="row 0 is not a normalised distribution: its logsumexp is -2.*log_softmax"):
        knn.next_token_log_probs(q, shifted)
    with pytest.raises(InputError, match="fewer than the datastore's vocabulary"):
        knn.next_token_log_probs(q, lp[:, :V - 1])
    retriever = knn.retriever
    retriever.k = 8.0
    with pytest.raises(ConfigError, match="k must be an integer of at least 1, got 8.0"):
        KNNLM(retriever, lmbda=0.5)
    retriever.k = 0
    with pytest.raises(ConfigError, match="got 0"):
        KNNLM(retriever, lmbda=0.5)


def test_the_boundary_checks_cost_little_per_batch():
    """A batch of 1,024 queries of dimension 1,024 (fairseq's eval batch) and a generation step
    over a 267K vocabulary; the checks are a small fraction of what scoring them costs. Measured
    side by side with the work they guard (interleaved, paired median): a shared host's load
    slows both alike, so the ratio is what is asserted, not milliseconds."""
    import statistics

    from knnlm.scoring import knn_full_log_probs, knn_log_prob

    q, t = torch.randn(1024, 1024), torch.randint(0, 267_744, (1024,))
    lp = torch.log_softmax(torch.randn(1024, 50), -1)[:, 0]
    full = torch.log_softmax(torch.randn(4, 267_744), -1)
    scores, values = torch.randn(1024, 1024), torch.randint(0, 267_744, (1024, 1024))
    valid = torch.ones(1024, 1024, dtype=torch.bool)
    cases = (
        (lambda: check_score_inputs(q, t, lp, 267_744), lambda: knn_log_prob(scores, values, t, valid)),
        (lambda: check_distribution(q[:4], full, 267_744),
         lambda: knn_full_log_probs(full, scores[:4], values[:4], 0.25, valid[:4])),
    )
    # One thread: the other test worker shares the cores, and thread contention would swing one
    # side of the pair more than the other. Measured (1 thread, idle host): 0.015x and 0.33x; a
    # check that loops in Python per row or per token costs many times the work, which is what
    # this guards against.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for check, work in cases:
            check(), work()
            ratios = []
            for _ in range(15):
                t0 = time.perf_counter()
                check()
                t1 = time.perf_counter()
                work()
                ratios.append((t1 - t0) / (time.perf_counter() - t1))
            ratio = statistics.median(ratios)
            assert ratio < 1.0, f"the check costs {ratio:.2f}x the scoring it guards"
    finally:
        torch.set_num_threads(threads)


# ============================================================================ tracebacks that were
def test_big_endian_keys_are_refused_by_name_with_the_conversion(tmp_path):
    make_store(tmp_path / "ds")
    path = str(tmp_path / "ds_keys.npy")
    keys = np.load(path)
    np.save(path, keys.astype(">f4"))
    with pytest.raises(CorruptError, match="big-endian byte order.*Convert it once"):
        Datastore.open(str(tmp_path / "ds"))
    # the conversion the message gives works
    a = np.load(path)
    np.save(path, a.astype(a.dtype.newbyteorder("=")))
    np.testing.assert_array_equal(Datastore.open(str(tmp_path / "ds")).keys, keys)


def test_knnlm_check_reports_the_byte_order_and_the_text_fingerprint(tmp_path):
    make_store(tmp_path / "ds")
    out = io.StringIO()
    check_artefacts(Report(out), str(tmp_path / "ds"))
    text = out.getvalue()
    assert re.search(f"PASS  byte order +{sys.byteorder}-endian keys and values", text), text
    assert "PASS  text fingerprint" in text and f"bottom-{K} MinHash of its {NGRAM}-token n-grams" in text


def test_a_long_legal_index_name_is_refused_before_training(tmp_path):
    make_store(tmp_path / "ds")
    name = tmp_path / ("i" * 240)  # legal (255), but INDEX.tmpPID.progress.json is not
    with pytest.raises(ConfigError, match="is too long.*bytes shorter"):
        flat(tmp_path / "ds", name)
    assert sorted(os.listdir(tmp_path)) == ["ds_keys.npy", "ds_meta.json", "ds_vals.npy"]
    with pytest.raises(ConfigError, match="too long"):
        check_names([str(tmp_path / ("d" * 250))], "datastore")


@pytest.mark.parametrize("probe", ["0", "-1"])
def test_prune_probe_is_validated(tmp_path, probe, capsys):
    from knnlm.offline.prune import main

    make_store(tmp_path / "ds")
    flat(tmp_path / "ds", tmp_path / "ds.index")
    capsys.readouterr()
    assert main([str(tmp_path / "ds"), str(tmp_path / "ds.index"), str(tmp_path / "p"), "--probe", probe]) == 2
    err = capsys.readouterr().err
    assert err.startswith("knnlm-prune: error: --probe must be an integer of at least 1") and "Traceback" not in err


def test_a_space_in_a_key_value_path_names_the_setting_and_the_quoting():
    with pytest.raises(ConfigError, match="cannot read the setting 'dstore_mmap=/tmp/my runs \\(2\\)/ds'.*"
                                          "must be quoted: \"dstore_mmap='/tmp/my runs \\(2\\)/ds'\""):
        load_config(["dstore_mmap=/tmp/my runs (2)/ds"])


# ============================================================================ nothing left behind
def test_a_stale_lock_is_reclaimed_with_a_message(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "ds.lock").write_text(str(dead.pid))
    with caplog.at_level(logging.WARNING):
        make_store(tmp_path / "ds")
    assert f"reclaiming the lock {tmp_path / 'ds.lock'} left by process {dead.pid}" in caplog.text
    assert not (tmp_path / "ds.lock").exists()


def test_temporaries_of_a_dead_run_are_removed_by_the_next_a_live_ones_are_not(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "c.npy"
    (tmp_path / f"c.tmp{dead.pid}.npy").write_bytes(b"x")
    (tmp_path / f"c.tmp{os.getppid()}.npy").write_bytes(b"y")  # a process that is alive: not ours to remove
    with AtomicOutput([str(out)], what="c") as o:
        np.save(o.path(str(out)), np.arange(3))
        o.commit()
    assert sorted(os.listdir(tmp_path)) == ["c.npy", f"c.tmp{os.getppid()}.npy"]
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite"):
        AtomicOutput([str(out)], what="c").begin()


def test_sigterm_ends_a_writer_with_one_line_and_a_clean_state(tmp_path, runner):
    make_store(tmp_path / "ds")
    before = sorted(os.listdir(tmp_path))
    r = runner.run("knnlm-retomaton-cluster", [tmp_path / "ds", tmp_path / "c.npy", "--clusters", "4"],
                   fault={"signal": int(signal.SIGTERM)})
    assert r.returncode == 130 and r.stderr.strip().endswith("Run the command again to start over"), str(r)
    assert "interrupted (SIGTERM)" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path)) == before


# ============================================================================ messages
def test_reduce_refusal_names_out_prefix_and_hf_mismatch_names_the_model(tmp_path):
    from knnlm.store.reduce import reduce_keys

    make_store(tmp_path / "ds")
    (tmp_path / "r_keys.npy").write_bytes(b"someone else's")
    with pytest.raises(KNNLMError, match="choose another OUT_PREFIX") as e:
        reduce_keys(str(tmp_path / "ds"), str(tmp_path / "r"), 4)
    assert "--dstore-mmap" not in str(e.value)
    ds = Datastore.open(str(tmp_path / "ds"))
    ds.meta = {**ds.meta, "model": "gpt2-tiny", "checkpoint": None}
    with pytest.raises(MismatchError, match="fingerprint m0, model gpt2-tiny\\)") as e:
        ds.check_compatible(dim=D, keytype="last_ffn_input", dict_size=V, dict_fingerprint="d0", model_fingerprint="x")
    assert "checkpoint None" not in str(e.value)
