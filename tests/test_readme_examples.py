"""The README's Python examples run as written: every ```python block of README.md, in a
directory holding the datastores and indexes they name (a hub name, "gpt2", is the one thing
mapped: to a tiny local model, since nothing is downloaded here)."""

import re
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import build_index

REPO = Path(__file__).resolve().parent.parent


def blocks():
    return re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from knnlm import DatastoreWriter

    root = tmp_path_factory.mktemp("readme")
    (root / "dstore").mkdir()
    rng = np.random.default_rng(0)
    w = DatastoreWriter(str(root / "dstore" / "train"), 16, keytype="last_ffn_input", dict_size=50,
                        dict_fingerprint="f", model_fingerprint="m")
    w.add(rng.standard_normal((1500, 16)).astype(np.float32), rng.integers(0, 50, 1500))
    w.finalize()
    build_index(str(root / "dstore" / "train"), str(root / "dstore" / "knn.index"), "IVF8,Flat")
    return root


def test_there_are_examples():
    assert len(blocks()) >= 3


@pytest.fixture(scope="module")
def sharded_workdir(tmp_path_factory):
    """dstore/train_shards.json (three shards) and dstore/knn.index kept in parts (merge=none)."""
    from knnlm import DatastoreWriter
    from knnlm.index.builder import build_index as build

    root = tmp_path_factory.mktemp("readme_shards")
    (root / "dstore").mkdir()
    rng = np.random.default_rng(1)
    shards = []
    for i, n in enumerate((600, 500, 700)):
        p = str(root / "dstore" / f"train.shard_{i}")
        w = DatastoreWriter(p, 16, keytype="last_ffn_input", dict_size=50, dict_fingerprint="f", model_fingerprint="m")
        w.add(rng.standard_normal((n, 16)).astype(np.float32), rng.integers(0, 50, n))
        w.finalize()
        shards.append(p)
    build({"dstore_mmap": str(root / "dstore" / "train"), "shards": shards, "faiss_index": str(root / "dstore" / "knn.index"),
           "ncentroids": 8, "code_size": 4, "threads": 1, "merge": "none", "executor": "local"})
    return root


def test_python_api_examples_run_as_written(workdir, sharded_workdir, monkeypatch):
    ran = 0
    for code in blocks():
        if "transformers" in code:
            continue  # the Hugging Face example: below
        monkeypatch.chdir(sharded_workdir if "train_shards.json" in code else workdir)
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
        ran += 1
    assert ran >= 3


def test_hugging_face_example_runs_as_written(workdir, monkeypatch, tmp_path):
    import transformers

    from knnlm.hf.cli import main
    from tests.test_hf import WORDS, make_tokenizer, text, tiny

    tok = make_tokenizer(WORDS)
    model = tiny("gpt2", len(tok), seed=0)
    model.save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    (tmp_path / "train.txt").write_text(text(260, 1))  # more than the example's k = 1024 tokens
    monkeypatch.chdir(workdir)
    assert main(["dump", "--model", str(tmp_path / "gpt2"), "--text", str(tmp_path / "train.txt"), "--max-length", "32",
                 "--dstore-mmap", "dstore/gpt2_train"]) == 0
    build_index("dstore/gpt2_train", "dstore/gpt2.index", "Flat")
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):  # "gpt2" -> the local tiny one
        original = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(
            lambda c, name, *a, _o=original, **k: _o(c, str(tmp_path / name) if name == "gpt2" else name, *a, **k)))
    ran = 0
    for code in blocks():
        if "transformers" in code:
            exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
            ran += 1
    assert ran == 1
