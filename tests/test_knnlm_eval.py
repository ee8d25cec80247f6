"""kNN-LM evaluation through fairseq's own eval_lm (`--task knnlm --knnlm ...`).

Runs go through `fairseq_cli.eval_lm.cli_main` (what the `fairseq-eval-lm` console script
calls), one forked process each (tests/helpers.EvalLM), all planned up front and run two at a
time by the `results` fixture; the stock baselines are the same entry point with
`--task language_modeling` and no `--user-dir`. References: stock eval_lm's own
per-token log-probabilities (--output-word-probs) and perplexity, and a kNN-LM perplexity
recomputed in numpy by brute force from queries rebuilt by hand (no plugin code).
"""

import math
import re

import faiss
import numpy as np
import pytest
import torch

from knnlm import Datastore, DatastoreWriter
from knnlm.errors import ConfigError

from .conftest import knn_summary, run
from .helpers import (
    EvalLM,
    build_index,
    evaluated_tokens,
    knn_argv,
    load_model,
    load_split,
    loss_line,
    reference_dump,
    stock_argv,
    word_probs,
)

TPS = ("--tokens-per-sample", "64")


@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    e = EvalLM(tmp_path_factory.mktemp("evallm"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def stores(tiny, ev, tmp_path_factory):
    """Datastores (dumped by eval_lm) and indexes (FAISS, and one by knnlm-build-index)."""
    root = tmp_path_factory.mktemp("stores")
    dumps = {  # name -> (model, split, break mode, extra flags)
        "train": ("ckpt", "train", "none"),
        "train_eos": ("ckpt", "train", "eos"),
        "train_fp16": ("ckpt", "train", "none", "--dstore-fp16"),
        "valid": ("ckpt", "valid", "none"),
        "adaptive_valid": ("adaptive", "valid", "none"),
    }
    runs = [{"argv": knn_argv(tiny["data"], tiny[m], *TPS, "--gen-subset", split, "--sample-break-mode", mode,
                              *extra, "--save-knnlm-dstore", "--dstore-mmap", root / name)}
            for name, (m, split, mode, *extra) in dumps.items()]
    for r in ev.run_many(runs):
        assert r.returncode == 0, str(r)
    s = {name: str(root / name) for name in dumps}
    for name in ("train", "train_eos", "train_fp16", "valid", "adaptive_valid"):
        build_index(s[name], f"{s[name]}.flat")
    # the IVFPQ index by the project's builder: 8 lists, PQ with 8 sub-quantizers
    run(["knnlm-build-index", f"dstore_mmap={s['valid']}", f"faiss_index={s['valid']}.ivfpq", "ncentroids=8",
         "code_size=8", "probe=8"])
    assert faiss.extract_index_ivf(faiss.read_index(f"{s['valid']}.ivfpq")).nlist == 8

    # an incomplete datastore (a dump that never finished)
    ref = Datastore.open(s["train"])
    w = DatastoreWriter(str(root / "incomplete"), ref.dim, keytype="last_ffn_input", dict_size=ref.meta["dict_size"],
                        dict_fingerprint=ref.meta["dict_fingerprint"], model_fingerprint=ref.meta["model_fingerprint"])
    w.add(np.asarray(ref.keys[:100]), np.asarray(ref.vals[:100]))
    w.abandon()
    s["incomplete"] = str(root / "incomplete")
    # a complete datastore of another key width (another model) with its own index
    w = DatastoreWriter(str(root / "dim16"), 16, keytype="last_ffn_input", dict_size=ref.meta["dict_size"],
                        dict_fingerprint=ref.meta["dict_fingerprint"])
    w.add(np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32), np.asarray(ref.vals[:300]))
    w.finalize()
    s["dim16"] = str(root / "dim16")
    build_index(s["dim16"], f"{s['dim16']}.flat")
    return s


def knn(stores, name, index=None, *args):
    return ("--knnlm", "--dstore-filename", stores[name], "--indexfile", index or f"{stores[name]}.flat", *args)


def ok(results, name):
    r = results[name]
    assert r.returncode == 0, str(r)
    return r


# ----------------------------------------------------------------------------- the runs
LAMBDA0 = {  # name -> (model, datastore, extra flags)
    "default": ("ckpt", "train", ()),
    "context-window": ("ckpt", "train", ("--context-window", "32")),
    "softmax-batch": ("ckpt", "train", ("--softmax-batch", "50")),
    "adaptive+softmax-batch": ("adaptive", "adaptive_valid", ("--softmax-batch", "50")),
}
BRUTE_FORCE = {  # name -> (extra flags, similarity, datastore)
    "default": ((), "l2", "train"),
    "context-window": (("--context-window", "32"), "l2", "train"),
    "dot": (("--knn-sim-func", "dot"), "dot", "train"),
    "in-memory": (("--move-dstore-to-mem",), "l2", "train"),
    "fp16 datastore": ((), "l2", "train_fp16"),  # distances recomputed from float16 keys
    "k-factor": (("--knn-k-factor", "3"), "l2", "train"),  # 24 candidates, the 8 nearest kept
}
BF_K, BF_LAMBDA, BF_TEMP = 8, 0.3, 2.0  # lambda != 0.5: swapping p_kNN and p_LM must show


def stock_name(model, extra):
    return f"stock {model} {' '.join(extra)}".strip()


def _refusals(stores, n_train):
    t = stores["train"]
    return {  # name -> (extra flags, the class and words the message must hold)
        "keytype": (knn(stores, "train", None, "--knn-keytype", "decoder_output"),
                    ("MismatchError", "'last_ffn_input' keys but 'decoder_output'")),
        "other model weights": (knn(stores, "adaptive_valid", None, "--k", "8"),
                                ("MismatchError", "different model weights", "--knn-allow-model-mismatch")),
        "other model dimension": (knn(stores, "dim16", None, "--k", "8"), ("MismatchError", "dimension 16", "dimension 32")),
        "index of another datastore": (knn(stores, "train", stores["valid"] + ".flat"),
                                       ("MismatchError", "was built from datastore", t)),
        "knnlm and save": (knn(stores, "train") + ("--save-knnlm-dstore", "--dstore-mmap", t + "_x"),
                           ("ConfigError", "--knnlm", "--save-knnlm-dstore")),
        "no indexfile": (("--knnlm", "--dstore-filename", t), ("ConfigError", "--indexfile")),
        "no dstore-filename": (("--knnlm", "--indexfile", t + ".flat"), ("ConfigError", "--dstore-filename")),
        "lmbda 1.5": (knn(stores, "train", None, "--lmbda", "1.5"), ("ConfigError", "--lmbda", "1.5")),
        "lmbda -0.1": (knn(stores, "train", None, "--lmbda", "-0.1"), ("ConfigError", "--lmbda")),
        "knn-temp 0": (knn(stores, "train", None, "--knn-temp", "0"), ("ConfigError", "--knn-temp")),
        "k 0": (knn(stores, "train", None, "--k", "0"), ("ConfigError", "--k must be at least 1")),
        "k > size": (knn(stores, "train", None, "--k", str(n_train + 1)), ("ConfigError", "--k", f"{n_train:,}")),
        "probe 0": (knn(stores, "train", None, "--probe", "0"), ("ConfigError", "--probe")),
        "k-factor 0.5": (knn(stores, "train", None, "--knn-k-factor", "0.5"), ("ConfigError", "--knn-k-factor")),
        "k-factor without recompute": (knn(stores, "train", None, "--knn-k-factor", "2", "--knn-sim-func",
                                           "do_not_recomp_l2"), ("ConfigError", "--knn-k-factor", "do_not_recomp_l2")),
        # A ChoiceEnum flag: argparse itself refuses the value, before anything is loaded.
        "sim-func": (knn(stores, "train", None, "--knn-sim-func", "cosine"),
                     ("fairseq-eval-lm: error", "--knn-sim-func", "invalid choice: 'cosine'")),
        "missing index": (knn(stores, "train", t + ".nope"), ("CorruptError", t + ".nope", "missing")),
        "missing datastore": (("--knnlm", "--dstore-filename", t + "_nope", "--indexfile", t + ".flat"),
                              ("CorruptError", t + "_nope")),
        "incomplete datastore": (("--knnlm", "--dstore-filename", stores["incomplete"], "--indexfile", t + ".flat"),
                                 ("IncompleteError", stores["incomplete"], "incomplete")),
    }


REFUSALS = list(_refusals({k: k for k in ("train", "valid", "adaptive_valid", "dim16", "incomplete")}, 0))


def plan(tiny, stores):
    """Every eval_lm run of this file: name -> {argv, pre}."""
    data = tiny["data"]
    wp = "--output-word-probs"

    def ours(model, *args, pre=None):
        return {"argv": knn_argv(data, tiny[model], *TPS, *args), "pre": pre}

    def stock(model, *args):
        return {"argv": stock_argv(data, tiny[model], *TPS, *args, wp)}

    runs = {}
    for model, extra in {("ckpt", ()), ("ckpt", ("--context-window", "32")), ("ckpt", ("--softmax-batch", "50")),
                         ("adaptive", ("--softmax-batch", "50"))}:
        runs[stock_name(model, extra)] = stock(model, *extra)
    for name, (model, dstore, extra) in LAMBDA0.items():
        runs[f"lambda0 {name}"] = ours(model, *extra, wp, *knn(stores, dstore, None, "--lmbda", "0", "--k", "8"))
    runs["plain"] = ours("ckpt", wp)
    runs["options without --knnlm"] = ours("ckpt", wp, "--dstore-filename", stores["train"], "--indexfile",
                                           stores["train"] + ".flat", "--k", "8", "--lmbda", "0.9")
    first = knn_argv(data, tiny["ckpt"], *TPS, *knn(stores, "train", None, "--k", "8", "--lmbda", "0.5"))
    runs["stock after knn"] = {
        "argv": stock_argv(data, tiny["ckpt"], *TPS, wp),
        "pre": (f"import sys, fairseq_cli.eval_lm as E\n_argv, sys.argv = sys.argv, ['fairseq-eval-lm'] + {first!r}\n"
                f"E.cli_main()\nsys.argv = _argv\nprint('=== second run ===', file=sys.stderr)\n"),
    }
    n_valid = str(Datastore.open(stores["valid"]).size)
    ivf = stores["valid"] + ".ivfpq"
    all_valid = ("--k", n_valid, "--lmbda", "0.5")
    runs["flat all"] = ours("ckpt", *knn(stores, "valid", None, *all_valid))
    runs["ivfpq all"] = ours("ckpt", *knn(stores, "valid", ivf, *all_valid, "--probe", "8"))
    runs["ivfpq probe 1"] = ours("ckpt", *knn(stores, "valid", ivf, *all_valid, "--probe", "1"))
    runs["ivfpq pq distances"] = ours("ckpt", *knn(stores, "valid", ivf, *all_valid, "--probe", "8",
                                                   "--knn-sim-func", "do_not_recomp_l2"))
    runs["memorised"] = ours("ckpt", "--sample-break-mode", "eos", *knn(stores, "train_eos", None, "--k", "8", "--lmbda", "0.5"))
    for name, (extra, _, dstore) in BRUTE_FORCE.items():
        runs[f"brute force {name}"] = ours("ckpt", *extra, *knn(stores, dstore, None, "--k", str(BF_K), "--lmbda",
                                                                str(BF_LAMBDA), "--knn-temp", str(BF_TEMP)))
    runs["lambda 1 k 1"] = ours("ckpt", *knn(stores, "train", None, "--k", "1", "--lmbda", "1"))
    for name, (flags, _) in _refusals(stores, Datastore.open(stores["train"]).size).items():
        runs[f"refuse {name}"] = ours("ckpt", *flags)
    runs["mismatch override"] = ours("ckpt", *knn(stores, "adaptive_valid", None, "--k", "8", "--knn-allow-model-mismatch"))
    runs["ensemble path"] = {"argv": knn_argv(data, f"{tiny['ckpt']}:{tiny['ckpt']}", *TPS, *knn(stores, "train"))}
    return runs


@pytest.fixture(scope="module")
def results(tiny, ev, stores):
    runs = plan(tiny, stores)
    return dict(zip(runs, ev.run_many(list(runs.values()))))


# ----------------------------------------------------------------------------- lambda = 0 and no flags = stock
@pytest.mark.parametrize("name", list(LAMBDA0))
def test_lambda_zero_reproduces_stock_eval_lm(results, name):
    model, _, extra = LAMBDA0[name]
    stock, ours = ok(results, stock_name(model, extra)), ok(results, f"lambda0 {name}")
    assert "fairseq_plugins" not in stock.output  # the baseline really is stock fairseq
    assert word_probs(ours.output) == word_probs(stock.output)  # every token's log-probability
    assert loss_line(ours.output) == loss_line(stock.output)
    assert evaluated_tokens(ours.output) == evaluated_tokens(stock.output)
    stock_loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", loss_line(stock.output))[1])
    base, final = knn_summary(ours.output)
    assert base == final
    assert math.isclose(base, 2 ** stock_loss, rel_tol=1e-4)


def test_knn_flags_without_knnlm_are_refused_by_name(results):
    """Issue #29: kNN flags given without --knnlm used to be ignored silently (the run printed the
    base perplexity); they are refused by name, with the flag that is missing."""
    r = results["options without --knnlm"]
    assert r.returncode != 0 and "Traceback" not in r.output
    assert ("ConfigError: --dstore-filename, --indexfile, --k, --lmbda are options of kNN-LM scoring, ignored "
            "without --knnlm: add --knnlm") in r.output


@pytest.mark.parametrize("name", ["plain"])
def test_without_knnlm_the_task_is_stock(results, name):
    stock, r = ok(results, stock_name("ckpt", ())), ok(results, name)
    assert word_probs(r.output) == word_probs(stock.output)
    assert loss_line(r.output) == loss_line(stock.output)
    assert evaluated_tokens(r.output) == evaluated_tokens(stock.output)
    assert "kNN-LM" not in r.output and "datastore" not in r.output.split("Evaluated")[-1]


def test_stock_run_after_a_knn_run_in_the_same_process_is_stock(results):
    """Driving eval_lm from Python (a notebook, a sweep): a plain `--task language_modeling` run after
    a --knnlm run in the same process must score with the plain LM again."""
    stock = ok(results, stock_name("ckpt", ()))
    first_run, second_run = ok(results, "stock after knn").output.split("=== second run ===")
    assert knn_summary(first_run)[1] != knn_summary(first_run)[0]  # the first run did use the kNN-LM
    assert loss_line(second_run) == loss_line(stock.output), (
        "the second, plain run still scored with the first run's kNN-LM: eval_lm.SequenceScorer stays patched")
    assert word_probs(second_run) == word_probs(stock.output)


# ----------------------------------------------------------------------------- indexes, memorisation, the math
def test_exact_and_ivfpq_indexes_agree_when_every_list_is_probed(results):
    """k = every entry of the (valid) datastore: with nprobe = nlist the IVFPQ index returns the same
    neighbor set as the exact one, and recomputed L2 makes the distances exact too."""
    base, ppl = knn_summary(ok(results, "flat all").output)
    assert knn_summary(ok(results, "ivfpq all").output) == pytest.approx((base, ppl), rel=1e-4)
    assert loss_line(results["ivfpq all"].output) == loss_line(results["flat all"].output)
    # the comparison can fail: fewer lists, or quantized distances, change the perplexity
    assert knn_summary(ok(results, "ivfpq probe 1").output)[1] != pytest.approx(ppl, rel=1e-4)
    assert knn_summary(ok(results, "ivfpq pq distances").output)[1] != pytest.approx(ppl, rel=1e-4)


def test_knnlm_nails_memorised_text(results):
    """Test lines are copies of train lines; one line per block (break mode eos) gives their tokens
    the very contexts, hence keys, they had in the train datastore."""
    base, ppl = knn_summary(ok(results, "memorised").output)
    assert ppl < 0.7 * base, (base, ppl)


@pytest.fixture(scope="module")
def queries(tiny, results):
    """The test split's queries and targets, in eval_lm's order, computed without the plugin:
    flags -> (keys (N, D), targets (N,), stock log p_LM (N,))."""
    model, _ = load_model(tiny["ckpt"])
    lines, d = load_split(tiny["data"], "test")
    out = {}
    for extra in ((), ("--context-window", "32")):
        stock = ok(results, stock_name("ckpt", extra))
        rows = word_probs(stock.output)
        cw = int(extra[1]) if extra else 0
        keys, vals = reference_dump(model, lines, d, ["last_ffn_input"], [sid for sid, _ in rows], 64 - cw, "none", cw)
        words = [d.index(w) for _, row in rows for w, _ in row]
        np.testing.assert_array_equal(vals, words)  # the reference scores what stock eval_lm scored
        out[extra] = (keys["last_ffn_input"].astype(np.float64), vals, np.array([p for _, row in rows for _, p in row]))
    return out


def brute_force_knn(q, stores, dstore):
    """Squared L2 from every query to every datastore key, in float64."""
    ds = Datastore.open(stores[dstore])
    k = np.asarray(ds.keys, dtype=np.float64)
    d = (q ** 2).sum(1)[:, None] - 2 * q @ k.T + (k ** 2).sum(1)[None]
    return d, np.asarray(ds.vals), k


@pytest.mark.parametrize("name", list(BRUTE_FORCE))
def test_knnlm_perplexity_equals_brute_force_numpy(results, stores, queries, name):
    """p = lambda p_kNN + (1 - lambda) p_LM, p_kNN a softmax over -(squared L2) / T (or q.k / T) of the
    k nearest train keys: recomputed in numpy from queries rebuilt by hand (tests/helpers) and
    stock eval_lm's per-token log-probabilities."""
    extra, sim, dstore = BRUTE_FORCE[name]
    r = ok(results, f"brute force {name}")
    q, targets, lp_lm = queries[extra if "--context-window" in extra else ()]
    d, vals, keys = brute_force_knn(q, stores, dstore)
    nn = np.argsort(d, axis=1, kind="stable")[:, :BF_K]  # the (exact L2) index's neighbors
    if sim == "dot":
        s = np.einsum("nd,nkd->nk", q, keys[nn]) / BF_TEMP
    else:
        s = -np.take_along_axis(d, nn, 1) / BF_TEMP
    w = np.exp(s - s.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    p_knn = (w * (vals[nn] == targets[:, None])).sum(1)
    p = BF_LAMBDA * p_knn + (1 - BF_LAMBDA) * np.exp(lp_lm)
    base, ppl = knn_summary(r.output)
    assert base == pytest.approx(math.exp(-lp_lm.mean()), rel=1e-4)
    assert ppl == pytest.approx(math.exp(-np.log(p).mean()), rel=1e-4)
    assert evaluated_tokens(r.output) == len(targets)


def test_lambda_one_with_missing_targets_reports_inf(results, stores, queries):
    """k = 1, lambda = 1: every token whose nearest train key carries another word gets p = 0."""
    r = ok(results, "lambda 1 k 1")
    q, targets, _ = queries[()]
    d, vals, _ = brute_force_knn(q, stores, "train")
    missing = int((vals[d.argmin(1)] != targets).sum())
    assert 0 < missing < len(targets)
    assert knn_summary(r.output)[1] == math.inf
    m = re.search(r"kNN-LM: ([0-9,]+) tokens, .*; ([0-9,]+) tokens have probability 0", r.output)
    assert m, r.output[-2000:]
    assert int(m[1].replace(",", "")) == len(targets) == evaluated_tokens(r.output)
    assert int(m[2].replace(",", "")) == missing
    loss_line(r.output)  # eval_lm still prints its own (inf-skipping) line


# ----------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def refusals(results, stores):
    """name -> (result, the error class and the words its message must hold)."""
    cases = _refusals(stores, Datastore.open(stores["train"]).size)
    return {name: (results[f"refuse {name}"], words) for name, (_, words) in cases.items()}


@pytest.mark.parametrize("name", REFUSALS)
def test_mismatch_or_bad_option_is_refused_by_name(refusals, name):
    r, words = refusals[name]
    assert r.returncode != 0, str(r)
    for w in words:
        assert w in r.stderr, f"{w!r} not in the error output of {name!r}:\n{r}"
    assert "Loss (base 2)" not in r.output  # nothing was scored


def test_refusals_are_one_line_messages_not_tracebacks(refusals):
    """The task installs an excepthook so that a KNNLMError reads as `Class: message`, not a
    traceback (fairseq_plugins/task.py, _excepthook)."""
    tracebacks = [name for name, (r, words) in refusals.items()
                  if "Traceback" in r.stderr or not re.search(rf"^{words[0]}: ", r.stderr, re.M)]
    assert not tracebacks, (f"these refusals print a traceback instead of a one-line message: {tracebacks}\n"
                            f"e.g.:\n{refusals[tracebacks[0]][0].stderr[-2000:]}")


def test_model_mismatch_can_be_overridden(results):
    base, ppl = knn_summary(ok(results, "mismatch override").output)
    assert math.isfinite(ppl) and ppl != base


# ----------------------------------------------------------------------------- ensembles
def test_ensemble_path_is_not_split_by_this_eval_lm(results):
    """fairseq 0.12's eval_lm passes --path as one file name (no ':' split), so an ensemble never
    reaches the kNN scorer from the command line: a:b is a missing file."""
    r = results["ensemble path"]
    assert r.returncode != 0 and "Model file not found" in r.stderr, str(r)


def test_ensemble_is_refused_by_the_scorer(tiny):
    """From Python (several models handed to the scorer) an ensemble is refused with a ConfigError."""
    from fairseq_plugins.sequence_scorer import KNNSequenceScorer

    model, task = load_model(tiny["ckpt"])
    lines, _ = load_split(tiny["data"])
    tokens = torch.cat(lines)[:16].unsqueeze(0)
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([16])}, "target": tokens}
    from knnlm import DumpSession

    scorer = KNNSequenceScorer(task.target_dictionary, dump=DumpSession("never-written", keytype="last_ffn_input"))
    with pytest.raises(ConfigError, match="ensemble"):
        scorer.generate([model, model], sample)
