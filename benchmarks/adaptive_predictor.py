"""Which adaptive-retrieval predictor transfers to another book? (issue #26)

The predictor is trained on the test split's export (Persuasion) and used on valid (Northanger
Abbey). This compares trainer settings two ways: chosen without valid, by 5-fold
cross-validation on the test export (contiguous folds; each fold scored by a predictor trained
on the other four, its skip threshold calibrated on their scores as `--adaptive-skip` does),
and then, for the record, on all of valid (trained on the first 80% of test, as `knnlm-adaptive
train` does, thresholds calibrated on the whole test export). Each cell: the share of tokens
not searched and the perplexity change against the full kNN-LM, with the constant lambda and
with the predicted one (`--adaptive-lambda`). The library's predictor, features and math
(`knnlm.retrieval.adaptive.train.fit`, the LM and n-gram features): nothing re-implemented.

    .venv/bin/python -m benchmarks.adaptive_predictor               # after make demo (~6 min)
    .venv/bin/python -m benchmarks.adaptive_predictor --setup pca   # the frontier's PCA datastore
                                                                    # (after make frontier)

`--setup pca` scores valid over the frontier's PCA datastore and fast-scan index (k-factor 2,
exact distances), exporting it once into --workdir with the frontier's own export command.
"""

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import run as bench
from benchmarks.common import REPO, log, run_tool

# (name, fit keyword arguments, whether the LM features alone)
VARIANTS = [
    ("1 network, 20 epochs (the old default)", {"members": 1, "epochs": 20}, False),
    ("1 network, 10 epochs", {"members": 1, "epochs": 10}, False),
    ("5 networks, 10 epochs", {"members": 5, "epochs": 10}, False),
    ("10 networks, 10 epochs (the default)", {"members": 10, "epochs": 10}, False),
    ("10 networks, 20 epochs", {"members": 10, "epochs": 20}, False),
    ("10 networks, 10 epochs, LM features only", {"members": 10, "epochs": 10}, True),
]
FOLDS = 5


def pca_valid_export(setup, workdir):
    """The valid split's export over the frontier's PCA datastore, as the frontier exports test."""
    pca = REPO / "bench_runs" / "frontier" / "pca128"
    out = Path(workdir) / "pca_valid_export"
    if not (out / "meta.json").exists():
        if not (pca / "dstore_fastscan.index").exists():
            raise SystemExit(f"no PCA datastore with a fast-scan index in {pca}: run make frontier first")
        v = copy.copy(setup)
        v.split = "valid"
        run_tool(v.eval_cmd(*v.knn_args(dstore=pca / "dstore", index=pca / "dstore_fastscan.index"),
                            "--knn-k-factor", 2, "--knnlm-dump-probs", out, "--knnlm-dump-neighbors", 16),
                 Path(workdir) / "pca_valid_export.log")
    return out


def load(export_dir, lmbda, temp, stats=None):
    """(features with the n-gram ones appended, lp_lm, lp_knn, n-gram statistics) of an export."""
    from knnlm.offline.export_reader import load_export
    from knnlm.retrieval.adaptive.train import ngram_stats, training_data

    ex = load_export(str(export_dir))
    feats, lp_lm, lp_knn, _, _ = training_data(ex, lmbda, temp)
    stats = stats or ngram_stats(ex)
    return np.concatenate([feats, stats.features(ex.context)], axis=1), lp_lm, lp_knn, stats


def scorer(x, a, b, lmbda, kw):
    from knnlm.retrieval.adaptive.retriever import FEATURE_FLOOR
    from knnlm.retrieval.adaptive.train import fit

    net, mean, std = fit(x, a, b, progress=False, lmbda=lmbda, **kw)

    def score(z):
        with torch.no_grad():
            return net((torch.from_numpy(np.maximum(z, FEATURE_FLOOR)) - mean) / std).squeeze(-1)
    return score


def cell(cal, s, a, b, lmbda, skip):
    """(share skipped, +% constant lambda, +% predicted lambda) against the full kNN-LM."""
    from knnlm.retrieval.adaptive.train import mixture_nll
    from knnlm.scoring import interpolate

    a, b = torch.from_numpy(a), torch.from_numpy(b)
    full, own = interpolate(a, b, lmbda), -mixture_nll(s, a, b)
    ppl = lambda lp: math.exp(-float(lp.double().mean()))  # noqa: E731
    keep = s >= float(np.quantile(cal.numpy(), skip))
    return (1 - float(keep.float().mean()), 100 * (ppl(torch.where(keep, full, a)) / ppl(full) - 1),
            100 * (ppl(torch.where(keep, own, a)) / ppl(full) - 1))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--setup", choices=("demo", "pca"), default="demo",
                   help="demo: the demo's exports (its datastore and index); pca: the frontier's PCA datastore")
    p.add_argument("--demo-dir", default=str(REPO / "demo_runs" / "austen"))
    p.add_argument("--workdir", default=str(REPO / "bench_runs" / "adaptive_predictor"))
    p.add_argument("--skips", type=float, nargs="+", default=[0.6, 0.62, 0.65])
    p.add_argument("--seed", type=int, default=0, help="of the first network of each predictor")
    a = p.parse_args()
    setup = bench.demo_setup(a.demo_dir)
    if setup is None:
        raise SystemExit(f"no complete demo outputs in {a.demo_dir}: run make demo")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    if a.setup == "demo":
        train_dir, valid_dir = Path(a.demo_dir) / "export_test", Path(a.demo_dir) / "export_valid"
    else:
        train_dir = REPO / "bench_runs" / "frontier" / "adaptive" / "pca" / "test_export"
        valid_dir = pca_valid_export(setup, a.workdir)
    xt, at, bt, stats = load(train_dir, setup.lmbda, setup.temp)
    xv, av, bv, _ = load(valid_dir, setup.lmbda, setup.temp, stats)
    lm_cols = len(xt[0]) - len(stats.feature_names)
    n, cut = len(at), int(round(0.8 * len(at)))
    log(f"trained on {train_dir} ({n:,} tokens), scored on {valid_dir} ({len(av):,} tokens); lambda {setup.lmbda:g}, "
        f"T {setup.temp:g}; test: {FOLDS}-fold cross-validation at skip {a.skips[0]:g}")
    head = ["predictor", f"test, {FOLDS}-fold CV, skip {a.skips[0]:g}: skipped, +% constant / predicted"]
    head += [f"valid, skip {f:g}: skipped, +% constant / predicted" for f in a.skips] + ["s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, kw, lm_only in VARIANTS:
        t0 = time.time()
        kw = dict(kw, seed=a.seed)
        X, V = (xt[:, :lm_cols], xv[:, :lm_cols]) if lm_only else (xt, xv)
        cv = []
        for fold in np.array_split(np.arange(n), FOLDS):
            rest = np.setdiff1d(np.arange(n), fold)
            score = scorer(X[rest], at[rest], bt[rest], setup.lmbda, kw)
            cv.append(cell(score(X[rest]), score(X[fold]), at[fold], bt[fold], setup.lmbda, a.skips[0]))
        score = scorer(X[:cut], at[:cut], bt[:cut], setup.lmbda, kw)
        cal = score(X)
        cells = [cell(cal, score(V), av, bv, setup.lmbda, f) for f in a.skips]
        # folds are equally long: their mean is the whole test export's share and (to first order) change
        sk, c, lam = (float(np.mean([r[i] for r in cv])) for i in range(3))
        row = [name, f"{100 * sk:.1f}%, {c:+.2f}% / {lam:+.2f}%"]
        row += [f"{100 * s:.1f}%, {c:+.2f}% / {lam:+.2f}%" for s, c, lam in cells] + [f"{time.time() - t0:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
        log(lines[-1])
    log("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
