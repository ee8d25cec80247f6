"""Every script in scripts/wikitext103/ run end to end on a small stand-in for WikiText-103.

The stand-in: the session's tiny corpus saved as wiki.{train,valid,test}.tokens, the session's
tiny LM and its dictionary placed where fetch_checkpoint.sh puts the real checkpoint, a second
small "domain" corpus, and environment variables that shrink contexts, k and the index. The
download URLs point at a closed local port: a script that tried to download would fail. The
scripts share one work directory (module fixture), so later ones reuse the datastore, index and
exports of earlier ones, as they would on WikiText-103.
"""

import json
import os
import random
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from .conftest import BIN, REPO, WORDS, eval_lm, knn_summary

SCRIPTS = REPO / "scripts" / "wikitext103"
CONFIG = REPO / "configs" / "wikitext103.yaml"
DEFAULTS = yaml.safe_load(CONFIG.read_text())
UNREACHABLE = "http://127.0.0.1:9/unreachable"  # discard port: connection refused at once

# Small settings for the stand-in, through the same variables a WikiText-103 user would set.
SMALL = {
    "WT103_URL": UNREACHABLE, "CKPT_URL": UNREACHABLE, "WORKERS": "1",
    "DEVICE_ARGS": "--cpu", "EVAL_EXTRA_ARGS": "--num-workers 0", "MAX_TOKENS": "2048",
    "DUMP_TOKENS_PER_SAMPLE": "64", "DUMP_CONTEXT_WINDOW": "32",
    "EVAL_TOKENS_PER_SAMPLE": "64", "EVAL_CONTEXT_WINDOW": "32",
    # Exact search (all lists probed, no quantization), so that k sweeps can be checked
    # against real runs; the PQ path of the builder has its own tests.
    "INDEX_FACTORY": "IVF{ncentroids},Flat", "NCENTROIDS": "8", "PROBE": "8", "CODE_SIZE": "8",
    "NUM_KEYS_TO_TRAIN": "100000", "K": "8", "KS": "2 4 8",
    "KEYTYPES": "last_ffn_input decoder_output", "FRACTIONS": "0.25 1",
    "DOMAIN_NAME": "books",
    "SPLITS": "test",  # Table 1 on one split: each split costs three evaluations
}


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
    ckpt_dir = work / "checkpoints" / "adaptive_lm_wiki103.v2"
    ckpt_dir.mkdir(parents=True)
    shutil.copy(tiny["ckpt"], ckpt_dir / "model.pt")
    shutil.copy(os.path.join(tiny["data"], "dict.txt"), ckpt_dir / "dict.txt")
    domain_corpus(work / "books")
    # The environment a user would have, minus any of the scripts' variables set outside.
    env = {k: v for k, v in os.environ.items() if k not in DEFAULTS}
    env.update(SMALL, WORK=str(work), PYTHON=sys.executable, PYTHONWARNINGS="ignore",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return {"work": work, "env": env, "tiny": tiny}


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


def test_prepare_data_uses_existing_files_and_checkpoint_dictionary(standin, prepared):
    work = standin["work"]
    assert "not downloading" in prepared.stderr
    data = work / "data-bin" / "wikitext-103"
    for split in ("train", "valid", "test"):
        assert (data / f"{split}.bin").exists() and (data / f"{split}.idx").exists()
    # Binarized with the checkpoint's dictionary: the same ids as the model's.
    assert (data / "dict.txt").read_text() == (work / "checkpoints" / "adaptive_lm_wiki103.v2" / "dict.txt").read_text()
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
    ckpt = work / "checkpoints" / "adaptive_lm_wiki103.v2"
    tar = tmp_path / "adaptive_lm_wiki103.v2.tar.bz2"
    with tarfile.open(tar, "w:bz2") as t:
        t.add(ckpt, "adaptive_lm_wiki103.v2")
    fetched = script(standin, "fetch_checkpoint.sh", CKPT_DIR=tmp_path / "ck", CKPT_URL=f"file://{tar}")
    assert "curl" in fetched.stderr and (tmp_path / "ck" / "adaptive_lm_wiki103.v2" / "model.pt").exists()
    script(standin, "prepare_data.sh", WT103_DIR=tmp_path / "wt", WT103_URL=f"file://{archive}",
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


def test_table5_per_key_type(standin, prepared):
    p = script(standin, "table5.sh")
    rows = markdown_rows(p.stdout)
    assert list(rows) == ["No datastore", "FFN input after layer norm", "Model output"]
    work = standin["work"]
    assert meta(work / "dstore" / "wt103_decoder_output")["keytype"] == "decoder_output"
    for kt in ("last_ffn_input", "decoder_output"):
        r = json.loads((work / "results" / f"table5_{kt}.json").read_text())
        assert r["temperatures"] == [1.0] and len(r["lambdas"]) == 101
        assert rows[{"last_ffn_input": "FFN input after layer norm", "decoder_output": "Model output"}[kt]][:2] == [
            f"{r['best_ppl']:.2f}", str(r["best_lambda"])]
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
    script(standin, "figure4.sh")
    work = standin["work"]
    result = json.loads((work / "results" / "figure4.json").read_text())
    assert [r["k"] for r in result["rows"]] == [2, 4, 8]
    assert (work / "results" / "figure4.png").stat().st_size > 1000
    # The first k' of the k = 8 neighbors are what a run with --k k' retrieves (exact search).
    prefix = work / "dstore" / "wt103_last_ffn_input"
    out = eval_lm(str(work / "data-bin" / "wikitext-103"), str(work / "checkpoints" / "adaptive_lm_wiki103.v2" / "model.pt"),
                  "--gen-subset", "valid", "--tokens-per-sample", "64", "--context-window", "32",
                  "--sample-break-mode", "complete", "--knnlm", "--dstore-filename", prefix,
                  "--indexfile", f"{prefix}_knn.index", "--k", "4", "--probe", "8", "--lmbda", "0.25")
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
