"""One method surface: a strategy defined outside the package reaches every front-end with no
front-end edit; every method reaches knnlm-hf; the options, factory and context behave."""

import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm import Context, RetrievalOptions, build
from knnlm.errors import ConfigError
from tests.conftest import knn_summary
from tests.helpers import EvalLM, build_index, knn_argv

REPO = Path(__file__).resolve().parent.parent

# A researcher's strategy, in one file of its own: exact neighbors by brute force in numpy.
TOY = '''
import numpy as np
import torch

from knnlm import Neighbors, Retriever, register_strategy


@register_strategy("numpy_brute")
class NumpyBrute(Retriever):
    def __init__(self, datastore, k, sim_func):
        self.datastore, self.k, self.sim_func = datastore, k, sim_func
        self.keys = np.asarray(datastore.keys, dtype=np.float64)

    @classmethod
    def validate_options(cls, opts):
        pass

    @classmethod
    def from_options(cls, opts, datastore):
        return cls(datastore, opts.k, opts.knn_sim_func)

    def retrieve(self, queries, context=None, *, nearest_first=True):
        q = queries.detach().double().cpu().numpy()
        d = (q ** 2).sum(1)[:, None] - 2 * q @ self.keys.T + (self.keys ** 2).sum(1)[None, :]
        ids = np.argsort(d, axis=1, kind="stable")[:, :self.k]
        dist = ((self.keys[ids] - q[:, None, :]) ** 2).sum(-1).astype(np.float32)
        vals = np.asarray(self.datastore.gather_vals(ids)).astype(np.int64)
        return Neighbors(distances=torch.from_numpy(dist).to(queries.device),
                         values=torch.from_numpy(vals).to(queries.device),
                         valid=torch.ones(ids.shape, dtype=torch.bool, device=queries.device),
                         ids=torch.from_numpy(ids).to(queries.device))
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "toy_strategy.py"
    path.write_text(TOY)
    return str(path)


# ----------------------------------------------------------------------------- fairseq
@pytest.fixture(scope="module")
def fairseq_store(tiny, tmp_path_factory):
    ev = EvalLM(tmp_path_factory.mktemp("surface_eval"))
    prefix = tmp_path_factory.mktemp("surface") / "train"
    r = ev.run(knn_argv(tiny["data"], tiny["ckpt"], "--tokens-per-sample", "64", "--gen-subset", "train",
                        "--save-knnlm-dstore", "--dstore-mmap", prefix))
    assert r.returncode == 0, str(r)
    build_index(str(prefix), f"{prefix}.flat", "Flat")
    yield ev, str(prefix)
    ev.close()


def test_a_user_strategy_reaches_fairseq_eval_lm(tiny, fairseq_store, toy):
    ev, prefix = fairseq_store
    base = knn_argv(tiny["data"], tiny["ckpt"], "--tokens-per-sample", "64", "--knnlm", "--dstore-filename", prefix,
                    "--k", "8", "--lmbda", "0.3", "--knn-temp", "2.0")
    runs = [base + ["--knn-search", "exact"], base + ["--knn-user-module", toy, "--knn-search", "numpy_brute"],
            base + ["--knn-search", "numpy_brute"]]
    exact, mine, unknown = ev.run_many([{"argv": a} for a in runs])
    assert exact.returncode == 0 and mine.returncode == 0, str(mine)
    assert knn_summary(mine.output) == pytest.approx(knn_summary(exact.output), rel=1e-5)
    assert unknown.returncode != 0 and "invalid choice: 'numpy_brute'" in unknown.output


# ----------------------------------------------------------------------------- Hugging Face
@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    from tests.test_hf import make_tokenizer, text, tiny as tiny_model, WORDS

    root = tmp_path_factory.mktemp("surface_hf")
    tok = make_tokenizer(WORDS)
    model = tiny_model("gpt2", len(tok), seed=0)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "train.txt").write_text(text(40, 1))
    (root / "valid.txt").write_text(text(12, 2))
    prefix = root / "ds"
    assert hf_main("dump", "--model", root / "model", "--text", root / "train.txt", "--max-length", 24, "--stride", 12,
                   "--dstore-mmap", prefix) == 0
    build_index(str(prefix), f"{prefix}.flat", "Flat")
    import types

    return types.SimpleNamespace(root=root, model=model, tok=tok, mdir=str(root / "model"), prefix=str(prefix),
                                 flat=f"{prefix}.flat")


def hf_main(*argv):
    from knnlm.hf.cli import main

    return main([str(a) for a in argv])


def hf_eval(capsys, hf, *extra, knn=True):
    argv = ["eval", "--model", hf.mdir, "--text", hf.root / "valid.txt", "--max-length", 16, "--stride", 8]
    if knn:
        argv += ["--knnlm", "--dstore-filename", hf.prefix, "--k", 8, "--lmbda", 0.3, "--knn-temp", 2.0]
    rc = hf_main(*argv, *extra)
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    return out.out, out.err


def test_a_user_strategy_reaches_knnlm_hf_eval(capsys, hf, toy):
    exact, _ = hf_eval(capsys, hf, "--knn-search", "exact")
    mine, _ = hf_eval(capsys, hf, "--knn-user-module", toy, "--knn-search", "numpy_brute")
    assert knn_summary(mine) == pytest.approx(knn_summary(exact), rel=1e-5)


def test_hf_exact_search_equals_a_flat_index(capsys, hf):
    exact, _ = hf_eval(capsys, hf, "--knn-search", "exact")
    flat, err = hf_eval(capsys, hf, "--indexfile", hf.flat)
    assert knn_summary(exact) == knn_summary(flat)
    assert "(k=8, lambda=0.3, T=2.0, l2, exact)" in exact
    assert "LM alone" in err and "kNN-LM" in err  # the closing table, on stderr


def test_hf_retomaton(capsys, hf):
    plain, _ = hf_eval(capsys, hf, "--indexfile", hf.flat)
    never, _ = hf_eval(capsys, hf, "--indexfile", hf.flat, "--retomaton", "--retomaton-min-pointers", 9)
    assert knn_summary(never) == knn_summary(plain)  # a threshold above k: every token searched
    assert "0.0% of" in never
    saved, _ = hf_eval(capsys, hf, "--indexfile", hf.flat, "--retomaton", "--retomaton-min-pointers", 1)
    share = float(re.search(r"retomaton min-pointers 1: ([0-9.]+)% of", saved).group(1))
    assert share > 0


def test_hf_continuous_cache_equals_a_brute_force_loop(capsys, hf):
    """The cache over each window's earlier scored positions, at lambda 0.5, by hand."""
    from knnlm.hf.hooks import break_into
    from knnlm.hf.windows import windows

    lam, theta = 0.5, 0.3
    out, _ = hf_eval(capsys, hf, "--continuous-cache", "--cache-lmbda", lam, "--cache-theta", theta, knn=False)
    got = knn_summary(out)[1]
    ids = hf.tok(open(hf.root / "valid.txt").read(), return_tensors="pt").input_ids[0]
    total, count = 0.0, 0
    with break_into(hf.model, "last_ffn_input") as capture, torch.no_grad():
        for w in windows(len(ids), 16, 8):
            x = ids[w.begin:w.end]
            lp = hf.model(x[None]).logits[0].double().log_softmax(-1)
            keys = capture.pop()[0].double()
            first = w.first - w.begin - 1
            for t in range(first, len(x) - 1):
                target = int(x[t + 1])
                mem = list(range(first, t))
                p_cache = 0.0
                if mem:
                    s = torch.tensor([theta * float(keys[t] @ keys[j]) for j in mem], dtype=torch.float64)
                    p = s.softmax(0)
                    p_cache = float(sum(p[i] for i, j in enumerate(mem) if int(x[j + 1]) == target))
                total += math.log(lam * p_cache + (1 - lam) * math.exp(float(lp[t, target])))
                count += 1
    assert got == pytest.approx(math.exp(-total / count), rel=1e-4)


def test_hf_pca_and_pruned_datastores(capsys, hf, tmp_path):
    from tests.conftest import run

    run(["knnlm-reduce", hf.prefix, str(tmp_path / "pca"), "--dim", "16"])
    reduced, _ = hf_eval(capsys, hf, "--dstore-filename", str(tmp_path / "pca"), "--knn-search", "exact")
    run(["knnlm-prune", hf.prefix, hf.flat, str(tmp_path / "pruned"), "--k", "4"])
    pruned, _ = hf_eval(capsys, hf, "--dstore-filename", str(tmp_path / "pruned"), "--knn-search", "exact")
    # each through the Python API gives the same perplexity as through the command line
    for prefix, out in ((str(tmp_path / "pca"), reduced), (str(tmp_path / "pruned"), pruned)):
        base, ppl = knn_summary(out)
        assert ppl != base and math.isfinite(ppl)


def test_attach_generates_with_exact_search(hf):
    import knnlm.hf

    prompt = hf.tok("the a of to", return_tensors="pt").input_ids
    dists = {}
    for name, kw in (("flat", {"index": hf.flat}), ("exact", {"knn_search": "exact"})):
        with knnlm.hf.attach(hf.model, hf.prefix, k=8, lmbda=0.4, tokenizer=hf.tok, **kw) as att:
            with torch.no_grad():
                dists[name] = hf.model(prompt).logits[:, -1]
                out = hf.model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
            assert out.shape[1] == prompt.shape[1] + 5
            assert att.knn.retriever.search_name == (None if name == "flat" else "exact")
    torch.testing.assert_close(dists["exact"], dists["flat"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the Python surface
def test_build_and_context(hf):
    opts = RetrievalOptions(knnlm=True, dstore_filename=hf.prefix, indexfile=hf.flat, k=8, retomaton=True)
    knn = build(opts)
    ds = knn.retriever.datastore
    q = torch.from_numpy(np.asarray(ds.keys[:20], dtype=np.float32))
    t = torch.from_numpy(np.asarray(ds.vals[:20]).astype(np.int64))
    lp = torch.full((20,), -2.0)
    with pytest.raises(ConfigError, match=r"reads streams.*lengths="):
        knn.score(q, t, lp)  # RetoMaton without its per-call context: refused, never silently searched
    scored = knn.score(q, t, lp, context=Context(lengths=[20]))
    assert knn.summary()["searched"] == knn.retriever.summary()["searched"] < 20
    assert f"{100 * (1 - knn.summary()['searched'] / 20):.1f}% of 20 searches saved" in knn.describe()
    with pytest.raises(ConfigError, match="generation does not know"):
        knn.next_token_log_probs(q, torch.full((20, 30), -math.log(30)))
    assert scored.final.shape == (20,)
    with pytest.raises(ConfigError, match="not a registered strategy"):
        build(dataclasses.replace(opts, knn_search="annoy"))
    with pytest.raises(ConfigError, match="--retomaton-max-pointers must be a whole number of at least 1"):
        build(dataclasses.replace(opts, retomaton_max_pointers=0))
    with pytest.raises(ConfigError, match="--k must be a whole number"):
        build(dataclasses.replace(opts, k=2.5))


def test_no_front_end_names_a_strategy_class():
    """Front-ends and the rest of the core reach strategies through the registry only."""
    names = re.compile(r"\b(FaissRetriever|ExactRetriever|RetoMatonRetriever|AdaptiveRetriever|Streams)\b")
    offenders = []
    for path in list((REPO / "fairseq_plugins").rglob("*.py")) + list((REPO / "knnlm").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("knnlm/retrieval/") or rel == "knnlm/__init__.py":
            continue
        if names.search(path.read_text()):
            offenders.append(rel)
    assert offenders == []


def test_flags_are_generated_from_one_definition():
    """Every RetrievalOptions field is a flag of knnlm-hf eval and of the fairseq task, with the same help."""
    import argparse

    from fairseq_plugins.task import KNNLanguageModelingTask
    from knnlm.hf.cli import build_parser
    from knnlm.options import fields, flag_name

    fairseq = argparse.ArgumentParser()
    KNNLanguageModelingTask.add_args(fairseq)
    hf = build_parser()
    hf_eval = hf._subparsers._group_actions[0].choices["eval"]
    for cls_fields, frontend, parser in ((fields(RetrievalOptions, "fairseq"), "fairseq", fairseq),
                                         (fields(RetrievalOptions, "hf"), "hf", hf_eval)):
        flags = {o: a for a in parser._actions for o in a.option_strings}
        for f in cls_fields:
            assert flag_name(f.name) in flags, (frontend, f.name)
            assert flags[flag_name(f.name)].help == f.metadata["help"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "--stride", "0"], "--stride must be at least 1, got 0"),
    (["eval", "--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["generate", "--prompt", "x", "--num-beams", "0"], "--num-beams must be at least 1, got 0"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be at least 1, got -1"),
    (["generate", "--prompt", "x", "--top-p", "2"], "--top-p must be in (0, 1], got 2.0"),
    (["generate", "--prompt", "x", "--temperature", "0"], "--temperature must be a finite number above 0"),
    (["eval", "--retomaton-max-pointers", "0", "--knnlm", "--retomaton", "--dstore-filename", "d", "--indexfile", "i"],
     "--retomaton-max-pointers must be a whole number of at least 1"),
    (["eval", "--k", "8"], "--k is an option of kNN-LM scoring, ignored without --knnlm: add --knnlm"),
])
def test_hf_numbers_are_refused_by_name(capsys, argv, message, tmp_path):
    """Before any model is loaded (the model path does not even exist)."""
    (tmp_path / "t.txt").write_text("a b c")
    extra = ["--text", str(tmp_path / "t.txt")] if argv[0] == "eval" else []
    rc = hf_main(argv[0], "--model", tmp_path / "none", *extra, *argv[1:])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("knnlm-hf: error: ") and message in err, err
