"""A tiny fairseq datastore, its flat index and test-split exports, for the explorer's tests
(tests/test_explain.py, tests/test_explain_browser.py): built once per module."""

import numpy as np

from .conftest import eval_lm, run
from .helpers import build_index

TPS = ("--tokens-per-sample", "64")
K = 16


def build_explain_setup(tiny, root, without_ids=True):
    """Datastore of the train split, a flat index, and two exports of the test split (whose
    text is in train): with neighbor ids, and without."""
    data, ckpt = tiny["data"], tiny["ckpt"]
    ds = root / "ds"
    eval_lm(data, ckpt, *TPS, "--gen-subset", "train", "--save-knnlm-dstore", "--dstore-mmap", ds)
    build_index(str(ds), f"{ds}.flat")
    knn = ("--gen-subset", "test", "--knnlm", "--dstore-filename", ds, "--indexfile", f"{ds}.flat",
           "--k", K, "--lmbda", "0.25", "--knn-temp", "2")
    eval_lm(data, ckpt, *TPS, *knn, "--knnlm-dump-probs", root / "export", "--knnlm-dump-ids")
    if without_ids:
        eval_lm(data, ckpt, *TPS, *knn, "--knnlm-dump-probs", root / "export_noids")
    return {"ds": str(ds), "index": f"{ds}.flat", "export": str(root / "export"),
            "export_noids": str(root / "export_noids"), "dict": f"{data}/dict.txt", "root": root}


def explain(*args, check=True):
    return run(["knnlm-explain", *args], check=check)


def reference_gains(export_path):
    """log p_kNN-LM - log p_LM per token, by numpy alone (not the code under test)."""
    from knnlm.offline.export import load_export

    ex = load_export(export_path)
    lam = ex.meta["lmbda"]
    lp_lm, lp_knn = np.asarray(ex.lp_lm, np.float64), np.asarray(ex.lp_knn, np.float64)
    final = np.log(lam * np.exp(lp_knn) + (1 - lam) * np.exp(lp_lm))
    return final - lp_lm


def partial_export(export_path, out, every=3, kind="lm_only"):
    """A copy of an export as a run that searched only some tokens would write it (every
    `every`-th token not searched: p_kNN -inf, as KNNLM gives it); returns the searched mask."""
    from knnlm.offline.export import ExportWriter, load_export

    e = load_export(export_path)
    searched = np.arange(e.count) % every != 0
    lp_knn = np.where(searched, e.lp_knn, -np.inf) if kind == "lm_only" else np.asarray(e.lp_knn)
    keep = {k: e.meta[k] for k in ("datastore", "datastore_fingerprint", "split")}
    w = ExportWriter(str(out), e.k_kept, sim_func=e.meta["sim_func"], temperature=e.meta["temperature"],
                     lmbda=e.meta["lmbda"], with_ids=True, meta=keep, unsearched=kind)
    w.add(e.lp_lm, lp_knn, e.targets, dists=e.dists, ids=e.ids, vals=e.vals, searched=searched)
    w.finalize()
    return searched
