"""Every script in scripts/wikitext103/ run end to end on a small stand-in for WikiText-103.

The stand-in: the session's tiny corpus saved as wiki.{train,valid,test}.tokens; an LM of the
WikiText-103 model's shape (transformer_lm_wiki103: adaptive input and adaptive softmax with
tied weights, pre-norm layers and no final LayerNorm; untrained, tiny) placed where
fetch_checkpoint.sh puts the original checkpoint; a second small "domain" corpus; and
environment variables that shrink contexts, k and the index, nothing else: every default key
type, --softmax-batch (small enough to split each batch), an IVF+PQ index and fp16 keys, as on
WikiText-103. The download URLs point at a closed local port: a script that tried to download
would fail. The scripts share one work directory (module fixture), so later ones reuse the
datastore, index and exports of earlier ones, as they would on WikiText-103. The commands the
scripts ran are checked against the original code's README commands (ORIGINAL, below).
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import shlex

import pytest
import yaml

from .conftest import BIN, REPO, WORDS, eval_lm, knn_summary, perplexity, run

SCRIPTS = REPO / "scripts" / "wikitext103"
CONFIG = REPO / "configs" / "wikitext103.yaml"
DEFAULTS = yaml.safe_load(CONFIG.read_text())
UNREACHABLE = "http://127.0.0.1:9/unreachable"  # discard port: connection refused at once

# Small settings for the stand-in, through the same variables a WikiText-103 user would set.
SMALL = {
    "WT103_URL": UNREACHABLE, "CKPT_URL": UNREACHABLE, "WORKERS": "1",
    "DEVICE_ARGS": "--cpu", "ALLOW_CPU": "1", "EVAL_EXTRA_ARGS": "--num-workers 0", "MAX_TOKENS": "2048",
    "SOFTMAX_BATCH": "16",  # below a batch's token count: the adaptive softmax runs in pieces
    "DUMP_TOKENS_PER_SAMPLE": "64", "DUMP_CONTEXT_WINDOW": "32",
    "EVAL_TOKENS_PER_SAMPLE": "64", "EVAL_CONTEXT_WINDOW": "32",
    # The paper's IVF+PQ index, small: all lists probed, 8 sub-quantizers of 4 dimensions.
    "NCENTROIDS": "8", "PROBE": "8", "CODE_SIZE": "8",
    "NUM_KEYS_TO_TRAIN": "100000", "K": "8", "KS": "2 4 8",
    "FRACTIONS": "0.25 1", "DOMAIN_NAME": "books", "CACHE_SIZE": "40",
    "SPLITS": "test",  # Table 1 on one split: each split costs three evaluations
    # One torch/OpenMP thread: the stand-in LM's matrices are tiny, so a second thread only adds
    # synchronisation, which on a shared host dominates (a dump: 13-18 s of eval with 2 threads,
    # 1.8 s with 1; Table 5 runs nine such fairseq-eval-lm processes).
    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    # BASE_PPL_TARGET: the stand-in LM's own valid perplexity (standin fixture)
}
# The WikiText-103 LM's shape (fairseq's transformer_lm_wiki103), tiny.
WIKI103_SHAPE = ("--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "32",
                 "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2", "--tokens-per-sample", "64",
                 "--decoder-normalize-before", "--no-decoder-final-norm",
                 "--adaptive-input", "--adaptive-input-cutoff", "10,20", "--adaptive-input-factor", "4",
                 "--adaptive-softmax-cutoff", "10,20", "--adaptive-softmax-factor", "4",
                 "--adaptive-softmax-dropout", "0.2", "--tie-adaptive-weights", "--tie-adaptive-proj",
                 "--decoder-input-dim", "32", "--decoder-output-dim", "32")


def domain_corpus(folder, seed=7):
    """Lines cut from one fixed cycle through the vocabulary: each word has one successor."""
    rng = random.Random(seed)
    cycle = list(dict.fromkeys(WORDS))
    rng.shuffle(cycle)

    def line():
        s = rng.randrange(len(cycle))
        return " ".join(cycle[(s + i) % len(cycle)] for i in range(rng.randint(6, 12)))

    folder.mkdir(parents=True)
    for name, n in (("train", 300), ("valid", 40), ("test", 40)):
        (folder / f"{name}.txt").write_text("\n".join(line() for _ in range(n)) + "\n")


@pytest.fixture(scope="module")
def standin(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("wt103")
    wt = work / "wikitext-103"
    wt.mkdir()
    for split in ("train", "valid", "test"):
        shutil.copy(tiny["root"] / f"{split}.txt", wt / f"wiki.{split}.tokens")
    # CKPT_SOURCE=original: the checkpoint file where the original README's URL puts it, no
    # dictionary beside it (prepare_data.sh builds it from the training text, as the tiny LM's was).
    ckpt_dir = work / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    ckpt = ckpt_dir / "wt103_checkpoint_best.pt"
    run([sys.executable, REPO / "tests" / "untrained_lm.py", tiny["data"], ckpt, *WIKI103_SHAPE])
    domain_corpus(work / "books")
    # The gate's target: this LM's valid perplexity at the evaluation settings (what 17.96 is
    # for the WikiText-103 LM).
    out = eval_lm(tiny["data"], ckpt, "--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32",
                  "--sample-break-mode", "complete", "--max-tokens", "2048", "--softmax-batch", "16")
    target = f"{perplexity(out.stdout + out.stderr)[1]:.2f}"
    # The environment a user would have, minus any of the scripts' variables set outside.
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    env.update(SMALL, BASE_PPL_TARGET=target, WORK=str(work), PYTHON=sys.executable, PYTHONWARNINGS="ignore",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return {"work": work, "env": env, "tiny": tiny, "ckpt": ckpt, "target": target}


def script(standin, name, check=True, **overrides):
    env = dict(standin["env"], **{k: str(v) for k, v in overrides.items()})
    p = subprocess.run(["bash", str(SCRIPTS / name)], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"{name} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def markdown_rows(text):
    """{first cell: other cells} of every table row but the header and the rule."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|")]
    return {r[0]: r[1:] for r in rows[2:]}


def train_tokens(standin):
    text = (standin["work"] / "wikitext-103" / "wiki.train.tokens").read_text().splitlines()
    return sum(len(line.split()) + 1 for line in text)  # + end of line


def meta(prefix):
    return json.loads(open(f"{prefix}_meta.json").read())


@pytest.fixture(scope="module")
def prepared(standin):
    """Data binarized and the datastore dumped and indexed: what the table scripts start from."""
    first = script(standin, "prepare_data.sh")
    script(standin, "fetch_checkpoint.sh")
    script(standin, "dump_datastore.sh")
    script(standin, "build_index.sh")
    return first


def test_prepare_data_uses_existing_files_and_builds_the_dictionary_like_the_original(standin, prepared):
    work = standin["work"]
    assert "not downloading" in prepared.stderr
    assert "building the dictionary from the training text, as the original" in prepared.stderr
    data = work / "data-bin" / "wikitext-103"
    for split in ("train", "valid", "test"):
        assert (data / f"{split}.bin").exists() and (data / f"{split}.idx").exists()
    # Built from the training text as the LM's was: the same ids as the model's.
    assert (data / "dict.txt").read_text() == open(os.path.join(standin["tiny"]["data"], "dict.txt")).read()
    again = script(standin, "prepare_data.sh")
    assert "not binarizing again" in again.stderr


def test_fetch_checkpoint_skips_an_existing_checkpoint(standin, prepared):
    p = script(standin, "fetch_checkpoint.sh")
    assert "exists: not downloading" in p.stderr
    # Without the file it does download (here: from a closed port, so it fails, loudly).
    missing = script(standin, "fetch_checkpoint.sh", check=False, CKPT=standin["work"] / "none" / "model.pt")
    assert missing.returncode != 0 and "curl" in missing.stderr


def test_downloads_when_files_are_missing(standin, prepared, tmp_path):
    """The download branches, from file:// URLs laid out like the real archives."""
    import tarfile
    import zipfile

    work = standin["work"]
    archive = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for split in ("train", "valid", "test"):
            z.write(work / "wikitext-103" / f"wiki.{split}.tokens", f"wikitext-103/wiki.{split}.tokens")
    ckpt = tmp_path / "adaptive_lm_wiki103.v2"  # fairseq's archive: model.pt and dict.txt
    ckpt.mkdir()
    shutil.copy(standin["ckpt"], ckpt / "model.pt")
    shutil.copy(os.path.join(standin["tiny"]["data"], "dict.txt"), ckpt / "dict.txt")
    tar = tmp_path / "adaptive_lm_wiki103.v2.tar.bz2"
    with tarfile.open(tar, "w:bz2") as t:
        t.add(ckpt, "adaptive_lm_wiki103.v2")
    # The original checkpoint is a plain file at its URL.
    orig = script(standin, "fetch_checkpoint.sh", CKPT_DIR=tmp_path / "orig", CKPT_URL=f"file://{standin['ckpt']}")
    assert (tmp_path / "orig" / "wt103_checkpoint_best.pt").read_bytes() == standin["ckpt"].read_bytes()
    assert "(original)" in orig.stdout
    fetched = script(standin, "fetch_checkpoint.sh", CKPT_SOURCE="fairseq", CKPT_DIR=tmp_path / "ck", CKPT_URL=f"file://{tar}")
    assert "curl" in fetched.stderr and (tmp_path / "ck" / "adaptive_lm_wiki103.v2" / "model.pt").exists()
    script(standin, "prepare_data.sh", CKPT_SOURCE="fairseq", WT103_DIR=tmp_path / "wt", WT103_URL=f"file://{archive}",
           DATA_BIN=tmp_path / "bin", CKPT_DIR=tmp_path / "ck")
    assert (tmp_path / "wt" / "wiki.valid.tokens").read_text() == (work / "wikitext-103" / "wiki.valid.tokens").read_text()
    assert (tmp_path / "bin" / "dict.txt").read_text() == (ckpt / "dict.txt").read_text()
    assert (tmp_path / "bin" / "test.idx").exists()


def test_dump_datastore_counts_every_training_token(standin, prepared):
    prefix = standin["work"] / "dstore" / "wt103_last_ffn_input"
    m = meta(prefix)
    n = train_tokens(standin)
    assert m["complete"] and m["size"] == n and m["keytype"] == "last_ffn_input"
    assert m["keys_dtype"] == "float16" and m["context_window"] == 32 and m["split"] == "train"
    ok = script(standin, "dump_datastore.sh", EXPECTED_DSTORE_SIZE=n)
    assert "up to date" in ok.stderr and f"{n} entries" in ok.stdout and "matches" in ok.stdout
    bad = script(standin, "dump_datastore.sh", check=False, EXPECTED_DSTORE_SIZE=n + 1)
    assert bad.returncode != 0 and f"EXPECTED_DSTORE_SIZE is {n + 1}" in bad.stderr
    # Checked before the dump: the key type against the model, the base LM against its target.
    assert "base LM perplexity on valid" in ok.stderr
    # LEGACY_DATASTORE=1: the original's datastore, one block (64 - 32 tokens) fewer.
    legacy = work_prefix = standin["work"] / "dstore" / "legacy_last_ffn_input"
    script(standin, "dump_datastore.sh", LEGACY_DATASTORE=1, DSTORE=legacy, EXPECTED_DSTORE_SIZE=n - 32)
    assert meta(work_prefix)["size"] == n - 32 and meta(work_prefix)["legacy_datastore"] is True
    # What ran is logged, copy-pasteable.
    log = (standin["work"] / "logs" / "commands.log").read_text()
    assert "fairseq-eval-lm" in log and "--save-knnlm-dstore" in log and "--context-window 32" in log


def test_build_index(standin, prepared):
    index = standin["work"] / "dstore" / "wt103_last_ffn_input_knn.index"
    m = json.loads(open(f"{index}.meta.json").read())
    assert m["complete"] and m["ntotal"] == train_tokens(standin)
    assert "up to date" in script(standin, "build_index.sh").stderr


def test_table1(standin, prepared):
    p = script(standin, "table1.sh")
    rows = markdown_rows(p.stdout)
    assert list(rows) == ["Base LM", "+kNN-LM", "+Continuous cache", "+kNN-LM + continuous cache"]
    assert "| Model | test | paper (dev / test) |" in p.stdout
    test = {name: float(cells[0]) for name, cells in rows.items()}
    assert all(v > 1 for v in test.values())
    # The tiny test split is text from the training set: retrieving it must help.
    assert test["+kNN-LM"] < test["Base LM"] and test["+kNN-LM + continuous cache"] < test["Base LM"]
    # The cache changes the numbers (it is not silently dropped).
    assert test["+Continuous cache"] != test["Base LM"]
    assert (standin["work"] / "results" / "table1.md").read_text() == p.stdout
    # Grave et al.'s cache: the output state, a memory over the context window, lambda and theta
    # tuned on valid (one grid run), each cache row run at its own tuned pair.
    grid = json.loads((standin["work"] / "results" / "table1_cache_grid.json").read_text())
    assert grid["split"] == "valid" and grid["keytype"] == "decoder_output" and grid["include_context"]
    assert grid["cache_size"] == 40 and set(grid) >= {"lm", "knn"}
    lm, kn = grid["lm"], grid["knn"]
    assert (f"lambda={lm['best_lambda']}, theta={lm['best_theta']} over the LM and "
            f"lambda={kn['best_lambda']}, theta={kn['best_theta']} over the kNN-LM (tuned on valid)") in p.stdout
    log = (standin["work"] / "logs" / "commands.log").read_text()
    assert f"--cache-lmbda {lm['best_lambda']} --cache-theta {lm['best_theta']}" in log
    assert "--cache-keytype decoder_output --cache-size 40 --cache-include-context" in log


TABLE5 = {"decoder_output": "Model output", "last_ffn_input": "FFN input after layer norm",
          "last_ffn_input_before_ln": "FFN input before layer norm", "last_attn_input": "MHSA input after layer norm",
          "last_attn_input_before_ln": "MHSA input before layer norm"}


def test_table5_per_key_type(standin, prepared):
    """Every default key type: the one the WikiText-103 shape lacks is left out before any dump."""
    p = script(standin, "table5.sh")
    rows = markdown_rows(p.stdout)
    assert list(rows) == ["No datastore", "Model output", "Model output layer normalized", "FFN input after layer norm",
                          "FFN input before layer norm", "MHSA input after layer norm", "MHSA input before layer norm"]
    assert rows["Model output layer normalized"][0].startswith("n/a")
    assert "key type decoder_output_ln left out" in p.stderr and "no final LayerNorm" in p.stderr
    work = standin["work"]
    assert not (work / "dstore" / "wt103_decoder_output_ln_meta.json").exists()
    assert meta(work / "dstore" / "wt103_decoder_output")["keytype"] == "decoder_output"
    for kt, name in TABLE5.items():
        r = json.loads((work / "results" / f"table5_{kt}.json").read_text())
        assert r["temperatures"] == [1.0] and len(r["lambdas"]) == 101
        assert rows[name][:2] == [f"{r['best_ppl']:.2f}", str(r["best_lambda"])]
        # Tuning includes lambda = 0, so a tuned kNN-LM is never worse than no datastore.
        assert r["best_ppl"] <= r["base_ppl"] + 1e-9


def test_figure2a_datastore_fractions(standin, prepared):
    script(standin, "figure2a.sh")
    work = standin["work"]
    result = json.loads((work / "results" / "figure2a.json").read_text())
    n = train_tokens(standin)
    assert [r["size"] for r in result["rows"]] == [round(0.25 * n), n]
    sub = meta(work / "dstore" / "wt103_last_ffn_input_frac0.25_seed1")
    assert sub["fraction"] == 0.25 and sub["seed"] == 1 and sub["subset_of_size"] == n
    assert (work / "results" / "figure2a.png").stat().st_size > 1000


def test_figure4_k_sweep_matches_runs_with_smaller_k(standin, prepared):
    # FAISS's own (PQ) distances, so that the first k' of the k = 8 neighbors are exactly what a
    # run with --k k' keeps (recomputed distances re-rank them); an export folder of its own.
    work = standin["work"]
    script(standin, "figure4.sh", SIM_FUNC="do_not_recomp_l2", EXPORT_DIR=work / "exports_faiss")
    result = json.loads((work / "results" / "figure4.json").read_text())
    assert [r["k"] for r in result["rows"]] == [2, 4, 8]
    assert (work / "results" / "figure4.png").stat().st_size > 1000
    # The first k' of the k = 8 neighbors are what a run with --k k' retrieves (exact search).
    prefix = work / "dstore" / "wt103_last_ffn_input"
    out = eval_lm(str(work / "data-bin" / "wikitext-103"), str(standin["ckpt"]),
                  "--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32",
                  "--sample-break-mode", "complete", "--knnlm", "--dstore-filename", prefix,
                  "--indexfile", f"{prefix}_knn.index", "--k", "4", "--probe", "8", "--lmbda", "0.25",
                  "--knn-sim-func", "do_not_recomp_l2", "--softmax-batch", "16", "--max-tokens", "2048")
    base, ppl = knn_summary(out.stdout + out.stderr)
    k4 = next(r for r in result["rows"] if r["k"] == 4)
    assert k4["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert result["base_ppl"] == pytest.approx(base, rel=1e-4)


def test_figure5_lambda_sweep(standin, prepared):
    script(standin, "figure5.sh")
    result = json.loads((standin["work"] / "results" / "figure5.json").read_text())
    assert result["lambdas"][0] == 0 and result["lambdas"][-1] == 1 and 0 <= result["best_lambda"] <= 1
    assert (standin["work"] / "results" / "figure5.png").stat().st_size > 1000


def test_table4_domain_adaptation(standin, prepared):
    p = script(standin, "table4_domain_adaptation.sh")
    rows = [line for line in p.stdout.splitlines() if line.startswith("| WikiText-103")]
    assert len(rows) == 2 and "| books |" in rows[1]
    lam_out, lam_in = map(float, re.search(r"Best lambda: ([0-9.]+) on books dev .*, ([0-9.]+) on WikiText-103", p.stdout).groups())
    tuned = json.loads((standin["work"] / "results" / "table4_books_valid.json").read_text())
    assert lam_out == tuned["best_lambda"]
    # Retrieval from the new domain's training text helps there, and earns a larger weight
    # than in domain (where the stand-in's random text has nothing to retrieve).
    assert lam_out > lam_in
    dev_base, dev_knn = (float(r.split("|")[3]) for r in rows)
    assert dev_knn < dev_base
    assert meta(standin["work"] / "dstore" / "books_last_ffn_input")["data"].endswith("books")
    # It says what it measures, and prints none of the paper's Table 4 numbers as comparable.
    assert "not the paper's Table 4" in p.stdout and "Not comparable" in p.stdout
    for paper in ("24.85", "20.47", "37.13", "34.84"):
        assert paper not in p.stdout


# ------------------------------------------------------------------------- refusals before a dump

def test_wrong_checkpoint_is_caught_before_any_dump(standin, prepared):
    """A checkpoint other than the one BASE_PPL_TARGET was measured on: stopped by name, nothing written."""
    work = standin["work"]
    prefix = work / "dstore" / "wrong_ckpt"
    p = script(standin, "dump_datastore.sh", check=False, CKPT=standin["tiny"]["ckpt"], DSTORE=prefix)
    assert p.returncode != 0 and "BasePerplexityMismatch" in p.stderr
    assert f"not {standin['target']} +- 0.05" in p.stderr and "Nothing was dumped" in p.stderr
    assert not os.path.exists(f"{prefix}_meta.json") and not os.path.exists(f"{prefix}_keys.npy")
    # A target out of reach of the right checkpoint fails the same way; an empty one skips the check.
    far = script(standin, "dump_datastore.sh", check=False, BASE_PPL_TARGET=float(standin["target"]) + 1)
    assert far.returncode != 0 and "BasePerplexityMismatch" in far.stderr
    assert "is not checked" in script(standin, "dump_datastore.sh", BASE_PPL_TARGET="").stderr


def test_cpu_and_missing_key_types_are_refused_before_any_dump(standin, prepared):
    prefix = standin["work"] / "dstore" / "refused"
    cpu = script(standin, "dump_datastore.sh", check=False, ALLOW_CPU=0, DSTORE=prefix, FORCE=1)
    assert cpu.returncode != 0 and "CPUDeviceRefused" in cpu.stderr and "ALLOW_CPU=1" in cpu.stderr
    kt = script(standin, "dump_datastore.sh", check=False, KEYTYPE="decoder_output_ln", DSTORE=prefix)
    assert kt.returncode != 0 and "KeytypeUnsupported" in kt.stderr and "decoder_output" in kt.stderr
    assert not os.path.exists(f"{prefix}_meta.json")


def test_checkpoint_defaults_are_the_original_readme_s(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    env.update(WORK="/w", PYTHON=sys.executable, LOG_DIR=str(tmp_path), RESULTS=str(tmp_path))
    show = f'source {SCRIPTS}/common.sh; echo "$CKPT|$CKPT_URL|$SRCDICT"'
    orig = subprocess.run(["bash", "-c", show], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert orig == "/w/checkpoints/wt103_checkpoint_best.pt|https://nlp.stanford.edu/projects/knnlm/wt103_checkpoint_best.pt|"
    fs = subprocess.run(["bash", "-c", show], capture_output=True, text=True, env=dict(env, CKPT_SOURCE="fairseq"),
                        check=True).stdout.strip()
    assert fs == ("/w/checkpoints/adaptive_lm_wiki103.v2/model.pt|https://dl.fbaipublicfiles.com/fairseq/models/lm/"
                  "adaptive_lm_wiki103.v2.tar.bz2|/w/checkpoints/adaptive_lm_wiki103.v2/dict.txt")


# ------------------------------------------------------------------------- the original commands

# The original code's README (urvashik/knnlm), verbatim but for line breaks.
ORIGINAL = {
    "dump": """python eval_lm.py data-bin/wikitext-103 --path checkpoints/checkpoint_best.pt
        --sample-break-mode none --max-tokens 3072 --softmax-batch 1024 --gen-subset train
        --context-window 1536 --tokens-per-sample 1536 --dstore-mmap checkpoints/dstore --knn-keytype 'last_ffn_input'
        --dstore-size 103225485 --model-overrides "{'knn_keytype': 'last_ffn_input'}" --save-knnlm-dstore --fp16""",
    "build": """python build_dstore.py --dstore_mmap checkpoints/dstore --dstore_size 103225485
        --faiss_index checkpoints/knn.index --num_keys_to_add_at_a_time 500000 --starting_point 0""",
    "eval": """python eval_lm.py data-bin/wikitext-103 --path checkpoints/checkpoint_best.pt
        --sample-break-mode complete --max-tokens 3072 --context-window 2560 --softmax-batch 1024
        --gen-subset valid --dstore-filename checkpoints/dstore --indexfile checkpoints/knn.index
        --model-overrides "{'knn_keytype': 'last_ffn_input'}" --k 1024 --lmbda 0.25 --dstore-size 103225485
        --knn-keytype last_ffn_input --probe 32 --knnlm --fp16""",
}
# How each original flag is given here: (our flag, the variable holding its value, our default
# as a function of the original value), None for a switch without a value, or a string saying
# why it has no counterpart. build_dstore.py's own defaults (ncentroids 4096, code_size 64,
# 1M training keys, seed 1) are compared too.
SAME = lambda v: v  # noqa: E731
TRANSLATION = {
    "--path": "the checkpoint (CKPT)", "--dstore-mmap": "a path (DSTORE)", "--dstore-filename": "a path (DSTORE)",
    "--indexfile": "a path (INDEX)", "--faiss_index": "a path (INDEX)", "--dstore_mmap": "a path (DSTORE)",
    "--model-overrides": "keys are captured by hooks: no model option",
    "--dstore-size": "checked, not needed: EXPECTED_DSTORE_SIZE", "--dstore_size": "read from the datastore",
    "--sample-break-mode": {"dump": ("--sample-break-mode", "DUMP_BREAK_MODE", SAME), "eval": ("--sample-break-mode", "EVAL_BREAK_MODE", SAME)},
    "--max-tokens": ("--max-tokens", "MAX_TOKENS", SAME),
    "--softmax-batch": ("--softmax-batch", "SOFTMAX_BATCH", SAME),
    "--gen-subset": ("--gen-subset", None, SAME),
    "--context-window": {"dump": ("--context-window", "DUMP_CONTEXT_WINDOW", SAME), "eval": ("--context-window", "EVAL_CONTEXT_WINDOW", SAME)},
    # The original eval_lm took 3072 from the checkpoint; current fairseq takes the flag: 1536 + 1536.
    "--tokens-per-sample": {"dump": ("--tokens-per-sample", "DUMP_TOKENS_PER_SAMPLE", lambda v: str(int(v) + 1536))},
    "--knn-keytype": ("--knn-keytype", "KEYTYPE", SAME),
    "--save-knnlm-dstore": None, "--knnlm": None,
    "--fp16": ("DEVICE_ARGS", "DEVICE_ARGS", lambda v: "auto"),  # auto: --fp16 on a GPU
    "--k": ("--k", "K", SAME), "--lmbda": ("--lmbda", "LMBDA", SAME), "--probe": ("--probe", "PROBE", SAME),
    "--num_keys_to_add_at_a_time": ("build_index.yaml", "num_keys_to_add_at_a_time", SAME),
    "--starting_point": ("build_index.yaml", "starting_point", SAME),
}
BUILD_DSTORE_DEFAULTS = {"--ncentroids": ("NCENTROIDS", "4096"), "--code_size": ("CODE_SIZE", "64"),
                         "--num_keys_to_train": ("NUM_KEYS_TO_TRAIN", "1000000"), "--seed": ("INDEX_SEED", "1")}
# Flags our commands add to the original's, by command (anything else is drift).
OURS = {
    "dump": {"--user-dir", "--task", "--cpu", "--num-workers", "--dstore-mmap", "--dstore-fp16", "--overwrite"},
    "build": {"--dstore_mmap", "--faiss_index", "--factory", "--ncentroids", "--code_size", "--probe", "--seed",
              "--num_keys_to_train", "--sampler", "--gpu=false", "--overwrite"},
    "eval": {"--user-dir", "--task", "--cpu", "--num-workers", "--tokens-per-sample", "--dstore-filename", "--indexfile",
             "--knn-temp", "--knn-sim-func", "--knnlm-dump-probs", "--overwrite"},
}


def parse_flags(words):
    flags, i = {}, 0
    while i < len(words):
        w = words[i]
        if w.startswith("--") and "=" not in w and i + 1 < len(words) and not words[i + 1].startswith("--"):
            flags[w] = words[i + 1]
            i += 2
        else:
            if w.startswith("--"):
                flags[w] = None
            i += 1
    return flags


def logged(work, kind):
    """The flags of the first command of this kind that the scripts ran (logs/commands.log)."""
    for line in (work / "logs" / "commands.log").read_text().splitlines():
        words = shlex.split(line.split("] ", 1)[1])
        f = parse_flags(words)
        if kind == "dump" and "--save-knnlm-dstore" in f and f["--knn-keytype"] == "last_ffn_input":
            return f
        if kind == "build" and words[0] == "knnlm-build-index" and f["--dstore_mmap"].endswith("wt103_last_ffn_input"):
            return f
        if kind == "eval" and "--knnlm-dump-probs" in f and f["--gen-subset"] == "valid" and \
                f["--knnlm-dump-probs"].endswith("wt103_last_ffn_input_valid_k8") and f["--knn-sim-func"] == "l2":
            return f
    raise AssertionError(f"no {kind} command in commands.log")


@pytest.mark.parametrize("kind", sorted(ORIGINAL))
def test_commands_match_the_original_readme(standin, prepared, kind):
    build_yaml = yaml.safe_load((REPO / "configs" / "build_index.yaml").read_text())
    original = parse_flags(shlex.split(" ".join(ORIGINAL[kind].split())))
    ours = logged(standin["work"], kind)
    expected = set()
    for flag, value in original.items():
        how = TRANSLATION[flag]
        if isinstance(how, dict):
            how = how[kind]
        if isinstance(how, str):  # no counterpart with the original's value (said why)
            if flag in ours:
                expected.add(flag)
            continue
        if how is None:
            assert flag in ours, f"{kind}: the original's {flag} is missing"
            expected.add(flag)
            continue
        our_flag, var, default = how
        if our_flag == "build_index.yaml":
            assert str(build_yaml[var]) == default(value), f"build_index.yaml {var} differs from the original {flag} {value}"
            continue
        if var is not None:
            assert str(DEFAULTS[var]) == default(value), f"configs/wikitext103.yaml {var}={DEFAULTS[var]}, the original {flag} {value}"
        if our_flag == "DEVICE_ARGS":
            assert "--cpu" in ours  # the stand-in's DEVICE_ARGS
            continue
        want = SMALL.get(var, value if var is None else str(DEFAULTS[var])) if var else value
        if kind == "eval" and flag == "--gen-subset":
            want = "valid"
        assert ours.get(our_flag) == want, f"{kind}: {our_flag} is {ours.get(our_flag)!r}, expected {want!r}"
        expected.add(our_flag)
    if kind == "build":
        for flag, (var, default) in BUILD_DSTORE_DEFAULTS.items():
            assert str(DEFAULTS[var]) == default and ours[flag] == SMALL.get(var, default)
    drift = set(ours) - expected - OURS[kind]
    assert not drift, f"{kind}: flags the original commands do not have and this table does not allow: {sorted(drift)}"


# ------------------------------------------------------------------------- static checks

def script_files():
    return sorted(p for p in SCRIPTS.glob("*.sh") if p.name != "common.sh")


@pytest.mark.parametrize("path", script_files(), ids=lambda p: p.name)
def test_script_is_strict_executable_and_documents_defaults(path):
    text = path.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    assert os.access(path, os.X_OK)
    # Header lines "#   NAME=value" document the defaults: they must be those of the YAML file.
    documented = re.findall(r'^#   ([A-Z][A-Z0-9_]*)=("[^"]*"|\S*)', text, re.M)
    assert documented, f"{path.name} documents no environment variables"
    for name, value in documented:
        assert name in DEFAULTS, f"{path.name} documents {name}, which configs/wikitext103.yaml lacks"
        want = "" if DEFAULTS[name] is None else str(DEFAULTS[name])
        assert value.strip('"') == want, f"{path.name} says {name}={value}, configs/wikitext103.yaml {want!r}"


def test_all_scripts_are_tested():
    tested = set(re.findall(r'script\(standin, "([a-z0-9_]+\.sh)"', open(__file__).read()))
    assert tested == {p.name for p in script_files()}
