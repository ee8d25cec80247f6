"""benchmarks/scale.py at a tiny size, so that it cannot rot: every stage runs (writer,
knnlm-build-index, add_rows, search, cold/warm recompute before and after the gather fix,
--move-dstore-to-mem, knnlm-reduce, fp16 vs fp32, the paper-factory probe), the distances
of every variant agree bit for bit, and the synthetic files are deleted."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def test_scale_benchmark_tiny(tmp_path):
    out = tmp_path / "scale"
    p = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--tiny", "--out-dir", str(out),
                        "--demo-dir", str(tmp_path / "no_demo")],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    md = (out / "scale.md").read_text()
    for title in ("Dump: the writer", "Index build", "Search: FAISS only", "Exact recompute from memory-mapped keys, cold",
                  "Exact recompute, warm", "--move-dstore-to-mem", "PCA-reduced keys", "fp16 vs fp32 keys",
                  "IVF4096,PQ64"):
        assert title in md, title
    for frac in ("| 1/8 |", "| 1/4 |", "| 1/2 |", "| 1 |"):
        assert frac in md
    ident = json.loads((out / "identical.json").read_text())
    assert ident["bit_identical"] and ident["comparisons"] >= 8
    assert not (out / "data").exists()  # the synthetic datastore is deleted


def test_threaded_gather_is_exact(tmp_path, monkeypatch):
    """The threaded read of memory-mapped keys (the scale fix) returns what one plain take does,
    for sorted, unsorted and repeated ids, and after MADV_RANDOM."""
    import knnlm.store.datastore as dsm
    from knnlm.store import Datastore
    from knnlm.store.writer import DatastoreWriter

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((5000, 24)).astype(np.float16)
    w = DatastoreWriter(str(tmp_path / "d"), 24, keytype="t", fp16=True, dict_size=10, dict_fingerprint="x")
    w.add(keys, rng.integers(0, 10, 5000))
    w.finalize()
    ds = Datastore.open(str(tmp_path / "d"))
    monkeypatch.setattr(dsm, "GATHER_MIN_ROWS_PER_THREAD", 7)  # many threads on a small datastore
    for ids in (np.arange(0, 5000, 3), rng.integers(0, 5000, 4000), np.repeat(rng.integers(0, 5000, 50), 40)):
        np.testing.assert_array_equal(ds.gather_keys(ids), keys[ids])
    assert ds.advise_random()
    ids = rng.integers(0, 5000, 3000)
    np.testing.assert_array_equal(ds.gather_keys(ids), keys[ids])
    assert not Datastore.open(str(tmp_path / "d"), in_memory=True).advise_random()  # no map to advise
