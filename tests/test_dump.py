"""Datastore dumps through fairseq's own eval_lm (`--task knnlm --save-knnlm-dstore`).

Runs go through `fairseq_cli.eval_lm.cli_main` -- what the `fairseq-eval-lm` console script
calls -- in one forked process each (tests/helpers.EvalLM); one test runs the console script
itself and checks it writes the very same datastore. What a dump must hold is derived without
the plugin: the targets from the binarized split and fairseq's blocking rules (in the order
eval_lm reports scoring them with --output-word-probs), the keys by rerunning the decoder and
applying the final layer's submodules by hand.
"""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from knnlm import Datastore
from knnlm.errors import IncompleteError

from .conftest import eval_lm as cli_eval_lm
from .helpers import (
    REPO,
    EvalLM,
    evaluated_tokens,
    knn_argv,
    load_model,
    load_split,
    loss_line,
    reference_dump,
    scored_blocks,
    word_probs,
)

TPS = 64
# name -> (model, keytype, break mode, context window, extra flags)
DUMPS = {
    "none": ("ckpt", "last_ffn_input", "none", 0, ()),
    "none+cw": ("ckpt", "last_ffn_input", "none", 32, ()),
    "complete": ("ckpt", "last_ffn_input", "complete", 0, ()),
    "complete+cw": ("ckpt", "last_ffn_input", "complete", 32, ()),
    "decoder_output": ("ckpt", "decoder_output", "none", 0, ()),
    "last_ffn_input_before_ln": ("ckpt", "last_ffn_input_before_ln", "none", 0, ()),
    "fp16": ("ckpt", "last_ffn_input", "none", 0, ("--dstore-fp16",)),
    # --add-bos-token: the <s> position is not a target (blocks of 63 + <s> fit the 64 positions)
    "bos": ("ckpt", "last_ffn_input", "none", 0, ("--add-bos-token", "--tokens-per-sample", 63)),
    **{f"adaptive:{k}": ("adaptive", k, "none", 0, ()) for k in (
        "last_ffn_input", "last_ffn_input_before_ln", "last_attn_input", "last_attn_input_before_ln",
        "decoder_output", "decoder_output_ln")},
    "adaptive:softmax-batch": ("adaptive", "last_ffn_input", "none", 0, ("--softmax-batch", "50")),
}
KEYS_CHECKED = [n for n in DUMPS if n not in ("fp16", "bos")]


def dump_argv(tiny, prefix, model="ckpt", keytype="last_ffn_input", mode="none", cw=0, extra=()):
    args = ["--tokens-per-sample", TPS, "--sample-break-mode", mode, "--save-knnlm-dstore",
            "--dstore-mmap", prefix, "--knn-keytype", keytype, *extra]
    if cw:
        args += ["--context-window", cw]
    return knn_argv(tiny["data"], tiny[model], *args)


def digest(prefix):
    return {p: hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in (f"{prefix}_keys.npy", f"{prefix}_vals.npy", f"{prefix}_meta.json")}


# Fault injection: wrap fairseq's SequenceScorer.generate (KNNSequenceScorer calls it through
# super()), and at the second batch kill the process or raise.
AT_SECOND_BATCH = """
import os, signal
import fairseq.sequence_scorer as fs
_orig, _n = fs.SequenceScorer.generate, [0]
def _generate(self, *a, **k):
    _n[0] += 1
    if _n[0] == 2:
        {action}
    return _orig(self, *a, **k)
fs.SequenceScorer.generate = _generate
"""
SIGKILL_AT_SECOND_BATCH = AT_SECOND_BATCH.format(action="os.kill(os.getpid(), signal.SIGKILL)")
RAISE_AT_SECOND_BATCH = AT_SECOND_BATCH.format(action="raise RuntimeError('injected failure at batch 2')")


@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    e = EvalLM(tmp_path_factory.mktemp("evallm"))
    yield e
    e.close()


@pytest.fixture(scope="module")
def split(tiny):
    return load_split(tiny["data"], "test")


@pytest.fixture(scope="module")
def n_tokens(split):
    return sum(len(x) for x in split[0])


@pytest.fixture(scope="module")
def dumps(tiny, ev, tmp_path_factory, n_tokens):
    out = tmp_path_factory.mktemp("dumps")
    runs = []
    for name, (model, keytype, mode, cw, extra) in DUMPS.items():
        extra = (*extra, "--output-word-probs")
        if name == "fp16":
            extra += ("--dstore-size", n_tokens)  # the right size is accepted
        runs.append({"argv": dump_argv(tiny, out / name.replace(":", "_"), model, keytype, mode, cw, extra)})
    results = ev.run_many(runs)
    for r in results:
        assert r.returncode == 0, str(r)
    return {name: {"prefix": str(out / name.replace(":", "_")), "result": r, "spec": DUMPS[name]}
            for name, r in zip(DUMPS, results)}


@pytest.fixture(scope="module")
def models(tiny):
    return {"ckpt": load_model(tiny["ckpt"])[0], "adaptive": load_model(tiny["adaptive"])[0]}


def order_of(result):
    """Sample ids in the order eval_lm scored them (its own --output-word-probs lines)."""
    return [sid for sid, _ in word_probs(result.output)]


# ----------------------------------------------------------------------------- count, values, keys
@pytest.mark.parametrize("name", ["none", "none+cw", "complete", "complete+cw"])
def test_entry_count_is_what_eval_lm_evaluated(dumps, name, n_tokens):
    d = dumps[name]
    ds = Datastore.open(d["prefix"])
    evaluated = evaluated_tokens(d["result"].output)
    assert ds.size == len(ds.keys) == len(ds.vals) == evaluated
    assert evaluated == n_tokens  # every token of the split, the first one included, is scored once
    assert ds.meta["context_window"] == d["spec"][3]
    assert ds.meta["sample_break_mode"] == d["spec"][2]


@pytest.mark.parametrize("name", ["none", "none+cw", "complete", "complete+cw", "adaptive:last_ffn_input", "bos"])
def test_values_are_the_scored_targets_in_order(dumps, split, name):
    lines, dictionary = split
    d = dumps[name]
    _, _, mode, cw, extra = d["spec"]
    ds = Datastore.open(d["prefix"])
    order = order_of(d["result"])
    spans = scored_blocks(lines, (63 if "--add-bos-token" in extra else TPS) - cw, mode)
    assert sorted(order) == list(range(len(spans))), "eval_lm scored other blocks than fairseq's rules give"
    stream = np.concatenate([x.numpy() for x in lines])
    expected = np.concatenate([stream[s:e] for s, e in (spans[i] for i in order)])
    np.testing.assert_array_equal(np.asarray(ds.vals), expected)
    # and the words eval_lm itself printed for each scored position
    printed = [dictionary.index(w) for _, row in word_probs(d["result"].output) for w, _ in row]
    np.testing.assert_array_equal(np.asarray(ds.vals), printed)


@pytest.mark.parametrize("name", KEYS_CHECKED)
def test_keys_equal_the_recomputed_states(dumps, split, models, name):
    lines, dictionary = split
    d = dumps[name]
    model, keytype, mode, cw, _ = d["spec"]
    ds = Datastore.open(d["prefix"])
    assert ds.meta["keytype"] == keytype
    keys, vals = reference_dump(models[model], lines, dictionary, [keytype], order_of(d["result"]),
                                TPS - cw, mode, cw)
    np.testing.assert_array_equal(np.asarray(ds.vals), vals)
    assert ds.keys.dtype == np.float32
    np.testing.assert_allclose(np.asarray(ds.keys), keys[keytype], atol=1e-5, rtol=0)


def test_key_types_give_different_keys(dumps):
    """Each key type dumped its own state (the adaptive model is pre-norm with a final LayerNorm)."""
    names = [n for n in DUMPS if n.startswith("adaptive:") and n != "adaptive:softmax-batch"]
    keys = {n: np.asarray(Datastore.open(dumps[n]["prefix"]).keys) for n in names}
    for a in names:
        for b in names:
            if a < b:
                assert not np.allclose(keys[a], keys[b], atol=1e-3), (a, b)


# ----------------------------------------------------------------------------- file format
def test_fp16_keys_are_the_fp32_keys_rounded(dumps):
    fp32 = Datastore.open(dumps["none"]["prefix"])
    fp16 = Datastore.open(dumps["fp16"]["prefix"])
    assert fp16.keys.dtype == np.float16 and fp16.meta["keys_dtype"] == "float16"
    assert fp32.keys.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(fp16.vals), np.asarray(fp32.vals))
    np.testing.assert_array_equal(np.asarray(fp16.keys), np.asarray(fp32.keys).astype(np.float16))
    assert fp16.vals.dtype == np.int32  # never int16, whatever the key precision


@pytest.mark.parametrize("name", list(DUMPS))
def test_files_are_npy_with_int32_values(dumps, name):
    prefix = dumps[name]["prefix"]
    keys = np.load(f"{prefix}_keys.npy", mmap_mode="r")
    vals = np.load(f"{prefix}_vals.npy", mmap_mode="r")
    assert isinstance(keys, np.memmap) and isinstance(vals, np.memmap)
    assert vals.dtype == np.int32 and vals.ndim == 1
    assert keys.ndim == 2 and keys.shape == (len(vals), 32)
    assert keys.dtype == (np.float16 if name == "fp16" else np.float32)
    ds = Datastore.open(prefix)
    assert ds.meta["vals_dtype"] == "int32" and ds.meta["complete"] is True
    assert np.asarray(vals).min() >= 0 and np.asarray(vals).max() < ds.meta["dict_size"]


def test_adaptive_softmax_batch_dumps_the_same(dumps):
    a = Datastore.open(dumps["adaptive:last_ffn_input"]["prefix"])
    b = Datastore.open(dumps["adaptive:softmax-batch"]["prefix"])
    assert a.size == b.size
    np.testing.assert_array_equal(np.asarray(a.vals), np.asarray(b.vals))
    np.testing.assert_array_equal(np.asarray(a.keys), np.asarray(b.keys))
    assert loss_line(dumps["adaptive:last_ffn_input"]["result"].output) == loss_line(
        dumps["adaptive:softmax-batch"]["result"].output)


def test_console_script_writes_the_same_datastore(tiny, dumps, tmp_path):
    """The real `fairseq-eval-lm` executable, in a subprocess, agrees with the forked runs."""
    prefix = tmp_path / "cli"
    p = cli_eval_lm(tiny["data"], tiny["ckpt"], "--tokens-per-sample", TPS, "--save-knnlm-dstore",
                    "--dstore-mmap", prefix)
    ref = Datastore.open(dumps["none"]["prefix"])
    ds = Datastore.open(str(prefix))
    assert ds.size == evaluated_tokens(p.stdout + p.stderr) == ref.size
    np.testing.assert_array_equal(np.asarray(ds.vals), np.asarray(ref.vals))
    np.testing.assert_array_equal(np.asarray(ds.keys), np.asarray(ref.keys))


@pytest.mark.parametrize("how", ["-m", "script"])
def test_eval_lm_as_main_dumps_or_refuses(tiny, tmp_path, how):
    """`python -m fairseq_cli.eval_lm` and `python .../fairseq_cli/eval_lm.py` (the original kNN-LM
    usage, `python eval_lm.py ...`) run eval_lm as __main__: the datastore must be written, or the
    run must fail -- never exit 0 without it."""
    import fairseq_cli.eval_lm

    prefix = tmp_path / "m"
    entry = ["-m", "fairseq_cli.eval_lm"] if how == "-m" else [fairseq_cli.eval_lm.__file__]
    cmd = [sys.executable, *entry, tiny["data"], "--path", tiny["ckpt"], "--user-dir",
           str(REPO / "fairseq_plugins"), "--task", "knnlm", "--cpu", "--num-workers", "0", "--no-progress-bar",
           "--tokens-per-sample", str(TPS), "--save-knnlm-dstore", "--dstore-mmap", str(prefix)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if p.returncode == 0:
        assert os.path.exists(f"{prefix}_meta.json"), (
            f"python {' '.join(entry)}: exit 0 but no datastore -- the knnlm task did not replace "
            f"eval_lm's SequenceScorer, and nothing noticed")
        assert Datastore.open(str(prefix)).size == evaluated_tokens(p.stdout + p.stderr)


# ----------------------------------------------------------------------------- interrupted and refused dumps
def test_killed_dump_is_incomplete_and_a_rerun_starts_over(tiny, ev, tmp_path, dumps):
    prefix = tmp_path / "killed"
    argv = dump_argv(tiny, prefix, extra=("--max-tokens", 128))  # two blocks a batch
    r = ev.run(argv, pre=SIGKILL_AT_SECOND_BATCH, check=False)
    assert r.returncode == -9, str(r)
    assert os.path.exists(f"{prefix}_meta.json")
    assert os.path.getsize(f"{prefix}_keys.npy") > 128  # the first batch's keys were written ...
    with pytest.raises(IncompleteError, match="incomplete"):
        Datastore.open(str(prefix))  # ... but nobody may use them
    assert np.load(f"{prefix}_keys.npy", mmap_mode="r").shape[0] == 0  # not even through numpy
    # the same command again (no --overwrite needed for an incomplete dump) starts over and finishes
    ev.run(argv)
    ds, ref = Datastore.open(str(prefix)), Datastore.open(dumps["none"]["prefix"])
    assert ds.size == ref.size
    np.testing.assert_array_equal(np.asarray(ds.vals), np.asarray(ref.vals))


def test_dump_failing_midway_is_incomplete(tiny, ev, tmp_path):
    prefix = tmp_path / "failed"
    r = ev.run(dump_argv(tiny, prefix, extra=("--max-tokens", 128)), pre=RAISE_AT_SECOND_BATCH, check=False)
    assert r.returncode != 0 and "injected failure at batch 2" in r.output, str(r)
    with pytest.raises(IncompleteError):
        Datastore.open(str(prefix))


def test_complete_datastore_is_overwritten_only_with_overwrite(tiny, ev, tmp_path, dumps):
    prefix = str(tmp_path / "kept")
    src = dumps["none"]["prefix"]
    for suffix in ("_keys.npy", "_vals.npy", "_meta.json"):
        shutil.copyfile(src + suffix, prefix + suffix)
    before = digest(prefix)
    old = Datastore.open(prefix).meta
    r = ev.run(dump_argv(tiny, prefix, keytype="decoder_output"), check=False)
    assert r.returncode != 0, str(r)
    assert "--overwrite" in r.stderr and "already exists" in r.stderr, str(r)
    assert digest(prefix) == before  # untouched
    ev.run(dump_argv(tiny, prefix, keytype="decoder_output", extra=("--overwrite",)))
    new = Datastore.open(prefix)
    assert new.meta["keytype"] == "decoder_output" and new.meta["uuid"] != old["uuid"]
    ref = Datastore.open(dumps["decoder_output"]["prefix"])
    np.testing.assert_array_equal(np.asarray(new.vals), np.asarray(ref.vals))
    np.testing.assert_array_equal(np.asarray(new.keys), np.asarray(ref.keys))
    assert new.size == ref.size


@pytest.mark.parametrize("delta", [+1, -1])
def test_wrong_dstore_size_is_an_error_and_leaves_it_incomplete(tiny, ev, tmp_path, n_tokens, delta):
    prefix = tmp_path / "sized"
    r = ev.run(dump_argv(tiny, prefix, extra=("--dstore-size", n_tokens + delta)), check=False)
    assert r.returncode != 0, str(r)
    assert "--dstore-size" in r.stderr and f"{n_tokens + delta:,}" in r.stderr, str(r)
    with pytest.raises(IncompleteError):
        Datastore.open(str(prefix))
