"""Does the query vector help adaptive retrieval's predictor on held-out text? (issue #26, item 2)

He et al. (2021) also feed the context vector to the predictor. Our exports do not store
queries, so this measures first whether it would pay: it dumps the queries of the demo's test
and valid splits (`fairseq-eval-lm --save-knnlm-dstore`, the same windows as the demo's exports,
so row i of a dump is row i of the export: checked against the targets), trains the predictor
(`knnlm.retrieval.adaptive.train.fit`, the library's own, with the LM and n-gram features) on
the test split's export with and without the query's first PCA components (fitted on test),
calibrates each skip threshold on test as `--adaptive-skip` does, and reports on valid, over
seeds: the share skipped and the perplexity change against the full kNN-LM, with the constant
and with the predicted lambda.

    .venv/bin/python -m benchmarks.adaptive_query            # after make demo
    .venv/bin/python -m benchmarks.adaptive_query --dims 8 32 --seeds 0 1 2 3
"""

import argparse
import statistics
from pathlib import Path

import numpy as np

from benchmarks import common
from benchmarks.adaptive_predictor import cell, scorer
from benchmarks import run as bench
from benchmarks.common import REPO, log


def dump_queries(setup, split, prefix):
    """The keys (= the queries) of every scored token of `split`, as the demo's export windows them."""
    if not Path(f"{prefix}_meta.json").exists():
        common.run_tool(["fairseq-eval-lm", setup.data, "--path", setup.ckpt, "--gen-subset", split,
                         "--tokens-per-sample", setup.tokens_per_sample, "--context-window", setup.context_window,
                         "--max-tokens", setup.max_tokens, "--cpu", "--num-workers", 0, "--no-progress-bar",
                         "--user-dir", REPO / "fairseq_plugins", "--task", "knnlm", "--knn-keytype", setup.keytype,
                         "--save-knnlm-dstore", "--dstore-mmap", prefix], f"{prefix}_dump.log")
    return np.load(f"{prefix}_keys.npy", mmap_mode="r"), np.load(f"{prefix}_vals.npy", mmap_mode="r")


def load(export_dir, queries, lmbda, temp, stats=None):
    from knnlm.offline.export import load_export
    from knnlm.retrieval.adaptive.train import ngram_stats, training_data

    ex = load_export(str(export_dir))
    feats, lp_lm, lp_knn, _, _ = training_data(ex, lmbda, temp)
    keys, vals = queries
    if len(keys) != len(lp_lm) or not np.array_equal(np.asarray(vals).ravel(), np.asarray(ex.targets).ravel()):
        raise SystemExit(f"the queries dumped for {export_dir} do not line up with its tokens")
    stats = stats or ngram_stats(ex)
    feats = np.concatenate([feats, stats.features(ex.context)], axis=1)
    return feats, lp_lm, lp_knn, np.asarray(keys, dtype=np.float32), stats


def evaluate(train, held, lmbda, skips, seed):
    """Train on `train`, thresholds from its scores, (skipped, +% constant, +% predicted) on `held` per skip."""
    from knnlm.retrieval.adaptive.train import ENSEMBLE, EPOCHS

    (xt, at, bt), (xv, av, bv) = train, held
    # the library's default predictor (knnlm-adaptive train's --ensemble and --epochs)
    score = scorer(xt, at, bt, lmbda, {"members": ENSEMBLE, "epochs": EPOCHS, "seed": seed})
    cal, s_v = score(xt), score(xv)
    return [cell(cal, s_v, av, bv, lmbda, f) for f in skips]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo-dir", default=str(REPO / "demo_runs" / "austen"))
    p.add_argument("--workdir", default=str(REPO / "bench_runs" / "adaptive_query"))
    p.add_argument("--dims", type=int, nargs="+", default=[8, 32], help="PCA components of the query added")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--skips", type=float, nargs="+", default=[0.5, 0.6, 0.65])
    p.add_argument("--train-share", type=float, default=0.8, help="of the test export (knnlm-adaptive train's default)")
    a = p.parse_args()
    setup = bench.demo_setup(a.demo_dir)
    exports = {s: Path(a.demo_dir) / f"export_{s}" for s in ("test", "valid")}
    if setup is None or not all((e / "meta.json").exists() for e in exports.values()):
        raise SystemExit(f"no complete demo outputs with export_test/ and export_valid/ in {a.demo_dir}: run make demo")
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    log(f"queries of test and valid (fairseq-eval-lm --save-knnlm-dstore) in {work}")
    qt, qv = (dump_queries(setup, s, work / s) for s in ("test", "valid"))
    xt, at, bt, kt, stats = load(exports["test"], qt, setup.lmbda, setup.temp)
    xv, av, bv, kv, _ = load(exports["valid"], qv, setup.lmbda, setup.temp, stats)
    n = int(round(a.train_share * len(at)))
    mu = kt[:n].mean(0)
    _, _, vt = np.linalg.svd(kt[:n:4] - mu, full_matrices=False)  # a quarter of the rows is plenty for a PCA
    variants = [("LM + n-gram features", xt, xv)]
    for d in a.dims:
        proj = vt[:d].T
        variants.append((f"+ query, PCA {d}", np.concatenate([xt, (kt - mu) @ proj], 1),
                         np.concatenate([xv, (kv - mu) @ proj], 1)))
    log(f"trained on the first {n:,} tokens of the test export; thresholds calibrated there; scored on all "
        f"{len(av):,} valid tokens (lambda {setup.lmbda:g}, T {setup.temp:g}); medians over seeds {a.seeds}")
    head = ["predictor inputs"] + [f"skip {f:g}: skipped, +% constant / predicted lambda" for f in a.skips]
    rows = []
    for name, x_t, x_v in variants:
        runs = [evaluate((x_t[:n], at[:n], bt[:n]), (x_v, av, bv), setup.lmbda, a.skips, s) for s in a.seeds]
        cells = []
        for j in range(len(a.skips)):
            sk, c, lam = (statistics.median(r[j][i] for r in runs) for i in range(3))
            spread = max(r[j][2] for r in runs) - min(r[j][2] for r in runs)
            cells.append(f"{100 * sk:.1f}%, {c:+.2f}% / {lam:+.2f}% (seeds span {spread:.2f})")
        rows.append([name] + cells)
    log("| " + " | ".join(head) + " |")
    log("|" + "---|" * len(head))
    for r in rows:
        log("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
