"""Generation with a kNN-LM, and knnlm-check on matching and mismatched artefacts."""

import faiss
import numpy as np
import pytest
import torch

from knnlm import KNNLM, Datastore, FaissRetriever
from knnlm.artefacts import write_json_atomic

from .conftest import PLUGIN, eval_lm, run


def flat_index(prefix, path):
    ds = Datastore.open(prefix)
    index = faiss.IndexFlatL2(ds.dim)
    index.add(np.asarray(ds.keys, dtype=np.float32))
    faiss.write_index(index, path)
    write_json_atomic(path + ".meta.json", {"complete": True, "datastore_fingerprint": ds.fingerprint})
    return path


@pytest.fixture(scope="module")
def dumped(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    prefix = str(root / "train")
    eval_lm(tiny["data"], tiny["ckpt"], "--gen-subset", "train", "--tokens-per-sample", "64",
            "--save-knnlm-dstore", "--dstore-mmap", prefix)
    return {**tiny, "prefix": prefix, "index": flat_index(prefix, str(root / "flat.index"))}


def test_generation_distribution_sums_to_one(dumped):
    from fairseq import checkpoint_utils

    from fairseq_plugins.generation import KNNLMForGeneration

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([dumped["ckpt"]])
    lm = models[0].eval()
    ds = Datastore.open(dumped["prefix"])
    knn = KNNLMForGeneration(lm, KNNLM(FaissRetriever(dumped["index"], ds, k=8, nprobe=1), lmbda=0.5, temperature=1.0))
    tokens = torch.tensor([[task.dictionary.eos()] + [task.dictionary.index(w) for w in "the cat sat on".split()]])
    lp = knn.next_token_log_probs(tokens)
    assert lp.shape == (1, len(task.dictionary))
    assert lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # Differs from the plain LM (the kNN part does something) yet keeps its support.
    with torch.no_grad():
        plain = lm.get_normalized_probs(lm(tokens), log_probs=True)[0, -1]
    assert not torch.allclose(lp[0], plain, atol=1e-3)


def test_fairseq_interactive_samples_text(dumped):
    p = run(["fairseq-interactive", dumped["data"], "--path", dumped["ckpt"], "--user-dir", PLUGIN,
             "--task", "knnlm", "--knnlm", "--dstore-filename", dumped["prefix"], "--indexfile", dumped["index"],
             "--k", "8", "--lmbda", "0.5", "--cpu", "--sampling", "--beam", "1", "--max-len-b", "8",
             "--seed", "1"], input="the cat sat\n")
    hyp = [line for line in p.stdout.splitlines() if line.startswith("H-")]
    assert hyp and len(hyp[0].split("\t")[-1].split()) >= 3, p.stdout[-2000:]


def test_check_passes_on_matching_and_fails_on_other_model(dumped):
    ok = run(["knnlm-check", "--path", dumped["ckpt"], "--dstore-filename", dumped["prefix"],
              "--indexfile", dumped["index"]])
    assert "all checks passed" in ok.stdout
    assert "PASS  keys recomputed" in ok.stdout and "PASS  values = targets" in ok.stdout
    bad = run(["knnlm-check", "--path", dumped["adaptive"], "--dstore-filename", dumped["prefix"],
               "--indexfile", dumped["index"]], check=False)
    assert bad.returncode == 1
    assert "FAIL  model weights" in bad.stdout and "FAIL  keys recomputed" in bad.stdout


def test_check_reports_tampered_values(dumped, tmp_path):
    import shutil

    copy = str(tmp_path / "copy")
    for suffix in ("_keys.npy", "_vals.npy", "_meta.json"):
        shutil.copy(dumped["prefix"] + suffix, copy + suffix)
    vals = np.load(copy + "_vals.npy", mmap_mode="r+")
    vals[5] = 10**6  # outside any dictionary
    vals.flush()
    del vals
    p = run(["knnlm-check", "--path", dumped["ckpt"], "--dstore-filename", copy], check=False)
    assert p.returncode == 1
    assert "FAIL  values in dictionary" in p.stdout and "row 5" in p.stdout


def test_check_on_a_subset_datastore(dumped, tmp_path):
    sub = str(tmp_path / "sub")
    run(["python", "-m", "knnlm.subset", dumped["prefix"], "0.3", sub])
    p = run(["knnlm-check", "--path", dumped["ckpt"], "--dstore-filename", sub])
    assert "PASS  keys recomputed" in p.stdout and "all checks passed" in p.stdout


def test_tuned_lambda_and_temperature_reproduce_in_eval_lm(dumped, tmp_path):
    """knnlm-tune's best (lambda, T), passed back to fairseq-eval-lm, gives the perplexity it reported."""
    import json

    from .conftest import knn_summary

    common = ["--gen-subset", "valid", "--tokens-per-sample", "64", "--knnlm", "--dstore-filename",
              dumped["prefix"], "--indexfile", dumped["index"], "--k", "8"]
    export = tmp_path / "export"
    eval_lm(dumped["data"], dumped["ckpt"], *common, "--knnlm-dump-probs", export)
    best = tmp_path / "best.json"
    run(["knnlm-tune", export, "--temperatures", "0.5,1,4,16", "--json", best])
    b = json.loads(best.read_text())
    assert 0 < b["best_lambda"] < 1  # an interior optimum, so the check below means something
    p = eval_lm(dumped["data"], dumped["ckpt"], *common, "--lmbda", b["best_lambda"], "--knn-temp", b["best_temperature"])
    base, ppl = knn_summary(p.stdout + p.stderr)
    assert ppl == pytest.approx(b["best_ppl"], rel=1e-4)
    assert base == pytest.approx(b["base_ppl"], rel=1e-4)


def test_export_with_k_factor_is_nearest_first(dumped, tmp_path):
    """With --knn-k-factor the k kept are re-ranked by exact distance; an export stores them
    nearest first (its k sweeps take each row's first k), though scoring alone needs no order."""
    from knnlm.offline.export import load_export

    export = tmp_path / "export"
    eval_lm(dumped["data"], dumped["ckpt"], "--gen-subset", "valid", "--tokens-per-sample", "64", "--knnlm",
            "--dstore-filename", dumped["prefix"], "--indexfile", dumped["index"], "--k", "64",
            "--knn-k-factor", "3", "--knnlm-dump-probs", export)
    d = np.asarray(load_export(str(export)).dists)
    assert d.shape[1] == 64 and not np.isnan(d).any()
    assert (np.diff(d, axis=1) >= 0).all()
