"""The options that make the WikiText-103 runs faithful to the paper and the original code.

- the continuous cache over the context window (--cache-include-context, --cache-keytype,
  --cache-size) against a brute-force reference written here as a plain loop;
- the cache grid (--cache-grid-json) against runs at fixed lambda and theta;
- --legacy-datastore drops exactly one block, the first, and nothing else;
- sampler=legacy draws the original build_dstore.py's sample (np.random.seed; np.random.choice);
- python -m fairseq_plugins.keytypes on the WikiText-103 LM's shape (pre-norm, no final norm).
"""

import json
import math
import sys

import numpy as np
import pytest

from .conftest import REPO, eval_lm, knn_summary, run

WINDOW = dict(tps=32, cw=32)  # eval_lm's --tokens-per-sample 64 --context-window 32


def _rows(ckpt, data, split="valid", break_mode="complete"):
    """(model, task, batches) exactly as fairseq-eval-lm --tokens-per-sample 64 --context-window 32 makes them."""
    from fairseq import checkpoint_utils

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [ckpt], arg_overrides={"data": data, "tokens_per_sample": WINDOW["tps"], "sample_break_mode": break_mode})
    model = models[0].eval()
    task.load_dataset(split)
    itr = task.eval_lm_dataloader(task.dataset(split), max_tokens=2048, num_workers=0, context_window=WINDOW["cw"])
    return model, task, list(itr)


def _brute_force_cache(h, tokens, target, start, n, theta, size):
    """log p_cache of each scored target of one row: a loop over the memory, context included.

    h (T, D) the row's states; tokens (T,) its input; target (T,) fairseq's (pad in the context);
    positions start .. start+n-1 are scored. The token that followed position j is tokens[j + 1]
    in the context (j < start) and target[j] in the block."""
    out = []
    for t in range(start, start + n):
        num, den = 0.0, 0.0
        for j in range(max(0, t - size), t):
            follow = int(tokens[j + 1]) if j < start else int(target[j])
            w = math.exp(theta * float(np.dot(h[t], h[j])))
            den += w
            if follow == int(target[t]):
                num += w
        out.append(math.log(num / den) if num > 0 else -math.inf)
    return out


@pytest.mark.parametrize("size", [None, 20])
def test_cache_over_the_context_window_matches_a_brute_force_loop(tiny, size):
    from fairseq_plugins.sequence_scorer import KNNSequenceScorer
    from knnlm.cache import ContinuousCache
    from knnlm.evaluation import Evaluation
    from knnlm.options import CacheOptions

    model, task, batches = _rows(tiny["ckpt"], tiny["data"])
    states = []  # the final layer's output (decoder_output), by a hook written here
    hook = model.decoder.layers[-1].register_forward_hook(
        lambda mod, args, out: states.append((out[0] if isinstance(out, tuple) else out).transpose(0, 1)))
    theta = 0.05
    cache = ContinuousCache(CacheOptions(continuous_cache=True, cache_lmbda=1.0, cache_theta=theta, cache_size=size,
                                         cache_keytype="decoder_output", cache_include_context=True), "last_ffn_input")
    scorer = KNNSequenceScorer(task.target_dictionary, None, keytype="last_ffn_input",
                               evaluation=Evaluation(keytype="last_ffn_input", cache=cache))
    checked = with_context = 0
    for sample in batches[:3]:
        hypos = scorer.generate([model], sample)
        feats = states.pop().float().numpy()
        states.clear()
        for i, hypo in enumerate(hypos):
            start = sample["start_indices"][i]
            got = hypo[0]["positional_scores"].tolist()
            want = _brute_force_cache(feats[i], sample["net_input"]["src_tokens"][i], sample["target"][i],
                                      start, len(got), theta, size if size is not None else 10 ** 9)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert (g == w == -math.inf) or g == pytest.approx(w, abs=1e-4)
            checked += len(got)
            with_context += start > 0
    scorer.close()
    hook.remove()
    assert checked > 100 and with_context > 0
    # The first scored token of a row with context has a cache: the context is in memory.


def test_cache_without_context_is_the_old_cache(tiny):
    """Without --cache-include-context the first scored token of each row has an empty cache."""
    from fairseq_plugins.sequence_scorer import KNNSequenceScorer
    from knnlm.cache import ContinuousCache
    from knnlm.evaluation import Evaluation
    from knnlm.options import CacheOptions

    model, task, batches = _rows(tiny["ckpt"], tiny["data"])
    cache = ContinuousCache(CacheOptions(continuous_cache=True, cache_lmbda=1.0, cache_theta=0.05), "last_ffn_input")
    old = KNNSequenceScorer(task.target_dictionary, None, evaluation=Evaluation(keytype="last_ffn_input", cache=cache))
    for sample in batches[:2]:
        for hypo in old.generate([model], sample):
            assert hypo[0]["positional_scores"][0].item() == -math.inf
    old.close()


def test_cache_grid_matches_runs_at_fixed_settings(tiny, tmp_path):
    common = ("--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32",
              "--continuous-cache", "--cache-keytype", "decoder_output", "--cache-include-context",
              "--cache-size", "40")
    grid = tmp_path / "grid.json"
    eval_lm(tiny["data"], tiny["ckpt"], *common, "--cache-lmbda", "0", "--cache-grid-json", grid,
            "--cache-grid-lambdas", "0,0.1,0.3", "--cache-grid-thetas", "0.01,0.1")
    g = json.loads(grid.read_text())
    assert g["complete"] and g["lambdas"] == [0.0, 0.1, 0.3] and g["thetas"] == [0.01, 0.1] and "knn" not in g
    best = g["lm"]
    out = eval_lm(tiny["data"], tiny["ckpt"], *common, "--cache-lmbda", str(best["best_lambda"]),
                  "--cache-theta", str(best["best_theta"]))
    base, ppl = knn_summary(out.stdout + out.stderr)
    assert ppl == pytest.approx(best["best_ppl"], rel=1e-4)
    assert best["without_cache_ppl"] == pytest.approx(base, rel=1e-4)
    assert best["best_ppl"] == min(x for row in best["ppl"] for x in row)


def test_cache_options_need_the_cache(tiny):
    p = eval_lm(tiny["data"], tiny["ckpt"], "--gen-subset", "valid", "--cache-include-context", check=False)
    assert p.returncode != 0 and "add --continuous-cache" in p.stderr
    p = eval_lm(tiny["data"], tiny["ckpt"], "--gen-subset", "valid", "--continuous-cache",
                "--cache-keytype", "nonsense", check=False)
    assert p.returncode != 0 and "--cache-keytype must be one of" in p.stderr


def _dump(tiny, prefix, *extra):
    eval_lm(tiny["data"], tiny["ckpt"], "--gen-subset", "train", "--tokens-per-sample", "64",
            "--context-window", "32", "--sample-break-mode", "none", "--save-knnlm-dstore",
            "--dstore-mmap", prefix, *extra)
    return (np.load(f"{prefix}_keys.npy"), np.load(f"{prefix}_vals.npy"),
            json.loads(open(f"{prefix}_meta.json").read()))


@pytest.fixture(scope="module")
def two_dumps(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("legacy")
    return d, _dump(tiny, d / "ours"), _dump(tiny, d / "legacy", "--legacy-datastore")


def test_legacy_datastore_drops_exactly_the_first_block(two_dumps):
    _, (k, v, m), (lk, lv, lm) = two_dumps
    block = WINDOW["tps"]  # tokens_per_sample - context_window = 64 - 32: one block of new tokens
    assert m["size"] - lm["size"] == block
    # The same rows, in the same order, minus the first block (whose tokens had no prior context).
    np.testing.assert_array_equal(lv, v[block:])
    np.testing.assert_array_equal(lk, k[block:])
    assert lm["legacy_datastore"] is True and m["legacy_datastore"] is False


def test_legacy_datastore_needs_a_dump_and_a_context_window(tiny, tmp_path):
    p = eval_lm(tiny["data"], tiny["ckpt"], "--gen-subset", "valid", "--legacy-datastore", check=False)
    assert p.returncode != 0 and "--legacy-datastore shapes a dump" in p.stderr
    p = eval_lm(tiny["data"], tiny["ckpt"], "--gen-subset", "train", "--save-knnlm-dstore",
                "--dstore-mmap", tmp_path / "x", "--legacy-datastore", check=False)
    assert p.returncode != 0 and "pass --context-window" in p.stderr


def test_legacy_sampler_draws_the_original_sample(two_dumps):
    from knnlm.index.plan import make_plan
    from knnlm.index.steps import sample_training_keys, training_rows

    d, (k, _, _), _ = two_dumps
    n = len(k)
    np.random.seed(1)
    original = np.random.choice(np.arange(n), size=[min(1000, n)], replace=False)  # build_dstore.py's
    np.testing.assert_array_equal(training_rows(n, min(1000, n), 1, "legacy"), original)
    ours = training_rows(n, min(1000, n), 1)
    assert (np.diff(ours) > 0).all() and not np.array_equal(np.sort(original), ours)
    plan = make_plan({"dstore_mmap": str(d / "ours"), "faiss_index": str(d / "i.index"),
                      "num_keys_to_train": 1000, "code_size": 8, "sampler": "legacy"})
    np.testing.assert_array_equal(sample_training_keys(plan), k[original].astype(np.float32))
    assert plan.identity()["sampler"] == "legacy"


def test_build_index_records_the_sampler_and_refuses_others(two_dumps):
    d, _, _ = two_dumps
    run(["knnlm-build-index", "--dstore_mmap", d / "ours", "--faiss_index", d / "legacy.index",
         "--factory", "IVF{ncentroids},PQ{code_size}", "--ncentroids", "4", "--code_size", "8",
         "--sampler", "legacy"])
    assert json.loads(open(d / "legacy.index.meta.json").read())["sampler"] == "legacy"
    p = run(["knnlm-build-index", "--dstore_mmap", d / "ours", "--faiss_index", d / "x.index",
             "--sampler", "random"], check=False)
    assert p.returncode == 2 and "sampler must be one of default, legacy" in p.stderr


def test_keytypes_of_the_wikitext103_shape(tmp_path, tiny):
    """Pre-norm layers without a final LayerNorm (transformer_lm_wiki103): no decoder_output_ln."""
    ckpt = tmp_path / "wiki103_shape.pt"
    run([sys.executable, REPO / "tests" / "untrained_lm.py", tiny["data"], ckpt, "--arch", "transformer_lm",
         "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
         "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--decoder-normalize-before",
         "--no-decoder-final-norm"])
    p = run([sys.executable, "-m", "fairseq_plugins.keytypes", ckpt, "--data", tiny["data"]], cwd=REPO)
    assert p.stdout.split() == ["last_ffn_input", "last_ffn_input_before_ln", "last_attn_input",
                                "last_attn_input_before_ln", "decoder_output"]
    assert "decoder_output_ln left out" in p.stderr and "no final LayerNorm" in p.stderr
    out = run([sys.executable, "-m", "fairseq_plugins.keytypes", ckpt, "--data", tiny["data"], "--output-state"], cwd=REPO)
    assert out.stdout.strip() == "decoder_output"
    # A post-norm model: every key type; its output state is the last layer's (normalized) output.
    post = run([sys.executable, "-m", "fairseq_plugins.keytypes", tiny["ckpt"], "--data", tiny["data"],
                "decoder_output_ln", "last_ffn_input"], cwd=REPO)
    assert post.stdout.split() == ["decoder_output_ln", "last_ffn_input"]
    bad = run([sys.executable, "-m", "fairseq_plugins.keytypes", ckpt, "--data", tiny["data"], "decoder_output_ln"],
              cwd=REPO, check=False)
    assert bad.returncode == 2 and "supports none" in bad.stderr
