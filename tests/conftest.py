"""Shared fixtures: a tiny corpus and tiny fairseq LMs, built once per test session.

Everything runs the real command-line tools in subprocesses, as a user would.
"""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PLUGIN = str(REPO / "fairseq_plugins")

WORDS = ("the cat sat on a mat and dog ran to big red house with small blue car "
         "old man saw young girl near green tree by river under bright sun").split()


def run(cmd, check=True, env=None, **kw):
    """Run a console tool from this venv; return CompletedProcess with text output."""
    cmd = [str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]] + [str(c) for c in cmd[1:]]
    e = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    p = subprocess.run(cmd, capture_output=True, text=True, env=e, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def eval_lm(data, ckpt, *args, check=True):
    return run(["fairseq-eval-lm", data, "--path", ckpt, "--user-dir", PLUGIN, "--task", "knnlm",
                "--cpu", "--num-workers", "0", "--no-progress-bar", *args], check=check)


def perplexity(output):
    """fairseq's final line: 'Loss (base 2): X, Perplexity: Y' -> (loss, ppl) as floats."""
    m = re.findall(r"Loss \(base 2\): (-?[0-9.]+), Perplexity: ([0-9.]+|inf)", output)
    assert m, output[-2000:]
    return float(m[-1][0]), float(m[-1][1])


def knn_summary(output):
    """Our own line: exact base and kNN-LM perplexity (4 decimals)."""
    m = re.findall(r"base LM perplexity ([0-9.]+), kNN-LM perplexity ([0-9.]+|inf)", output)
    assert m, output[-2000:]
    return float(m[-1][0]), float(m[-1][1])


def write_corpus(root, seed=0):
    """Train text, a valid split, and a test split whose text also appears in train."""
    rng = random.Random(seed)
    line = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 18)))  # noqa: E731
    train = [line() for _ in range(500)]
    valid = [line() for _ in range(60)]
    test = train[100:160]  # memorised text: a kNN-LM should nail it
    for name, lines in (("train", train), ("valid", valid), ("test", test)):
        (root / f"{name}.txt").write_text("\n".join(lines) + "\n")


def train_lm(root, data, name, extra=()):
    save = root / name
    run(["fairseq-train", data, "--task", "language_modeling", "--arch", "transformer_lm",
         "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
         "--decoder-attention-heads", "2", "--tokens-per-sample", "64", "--max-tokens", "2048",
         "--optimizer", "adam", "--lr", "0.003", "--max-update", "60", "--save-dir", save,
         "--no-epoch-checkpoints", "--cpu", "--num-workers", "0",
         "--disable-validation", "--seed", "1", "--no-progress-bar", "--log-format", "simple",
         *extra])
    return str(save / "checkpoint_best.pt") if (save / "checkpoint_best.pt").exists() else str(save / "checkpoint_last.pt")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A binarized tiny corpus and two tiny LMs: plain softmax and adaptive softmax/input."""
    root = tmp_path_factory.mktemp("tiny")
    write_corpus(root)
    data = root / "bin"
    run(["fairseq-preprocess", "--only-source", "--trainpref", root / "train.txt",
         "--validpref", root / "valid.txt", "--testpref", root / "test.txt",
         "--destdir", data, "--workers", "1"])
    ckpt = train_lm(root, str(data), "lm")
    # Adaptive input and softmax as in the WikiText-103 model, cutoffs below the tiny vocabulary.
    adaptive = str(root / "adaptive.pt")
    run([sys.executable, REPO / "tests" / "untrained_lm.py", data, adaptive, "--arch", "transformer_lm",
         "--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
         "--decoder-attention-heads", "2", "--tokens-per-sample", "64",
         "--adaptive-softmax-cutoff", "10,20", "--adaptive-input", "--adaptive-input-cutoff", "10,20",
         "--tie-adaptive-weights", "--decoder-input-dim", "32", "--decoder-output-dim", "32",
         "--decoder-normalize-before"])
    return {"root": root, "data": str(data), "ckpt": ckpt, "adaptive": adaptive}
