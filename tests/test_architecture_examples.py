"""The two worked examples of docs/architecture.md run as written, and give the right numbers.

Each ```python block of the document is executed in a namespace holding the example's inputs
(tiny data made here); the results are checked against FAISS's exact index and against a
numpy brute-force kNN-LM written in this test.
"""

import re
from pathlib import Path

import faiss
import numpy as np
import torch

from knnlm import KNNLM, Datastore, DatastoreWriter, FaissRetriever

DOC = Path(__file__).resolve().parent.parent / "docs" / "architecture.md"
D, V = 16, 12


def blocks():
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def ref_knnlm_lp(keys, vals, queries, targets, lp_lm, k, lmbda, temperature=1.0):
    """log(lambda p_kNN + (1 - lambda) p_LM) in float64 by brute force."""
    out = []
    for q, t, lm in zip(queries.astype(np.float64), targets, lp_lm.astype(np.float64)):
        d = ((keys.astype(np.float64) - q) ** 2).sum(1)
        nn = np.argsort(d, kind="stable")[:k]
        s = -d[nn] / temperature
        w = np.exp(s - s.max())
        p_knn = w[vals[nn] == t].sum() / w.sum()
        out.append(np.log(lmbda * p_knn + (1 - lmbda) * np.exp(lm)))
    return np.array(out)


def test_the_strategy_example_matches_faiss_exact_search(tmp_path):
    rng = np.random.default_rng(0)
    w = DatastoreWriter(str(tmp_path / "ds"), D, keytype="x", dict_size=V, dict_fingerprint="f")
    w.add(rng.normal(size=(300, D)).astype(np.float32), rng.integers(0, V, size=300))
    w.finalize()
    datastore = Datastore.open(str(tmp_path / "ds"))
    queries = torch.from_numpy(rng.normal(size=(40, D)).astype(np.float32))
    targets = torch.from_numpy(rng.integers(0, V, size=40))
    lp_lm = torch.log_softmax(torch.from_numpy(rng.normal(size=(40, V)).astype(np.float32)), -1)[torch.arange(40), targets]
    ns = {"datastore": datastore, "queries": queries, "targets": targets, "lp_lm": lp_lm}
    exec(blocks()[0], ns)
    flat = faiss.IndexFlatL2(D)
    flat.add(np.asarray(datastore.keys))
    want = KNNLM(FaissRetriever(flat, datastore, k=8), lmbda=0.25).score(queries, targets, lp_lm)
    got = ns["scored"]
    assert torch.equal(got.neighbors.ids.sort(1).values, want.neighbors.ids.sort(1).values)
    torch.testing.assert_close(got.final, want.final, rtol=0, atol=1e-6)
    ref = ref_knnlm_lp(np.asarray(datastore.keys), np.asarray(datastore.vals), queries.numpy(), targets.numpy(),
                       lp_lm.numpy(), 8, 0.25)
    np.testing.assert_allclose(got.final.numpy(), ref, atol=1e-5)


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(V, D)
        self.mix = torch.nn.Linear(D, D)
        self.out = torch.nn.Linear(D, V)

    def forward(self, tokens):
        return self.out(torch.tanh(self.mix(self.emb(tokens))))


def test_the_front_end_example_dumps_and_scores_like_a_reference(tmp_path, capsys):
    rng = np.random.default_rng(1)
    lm = TinyLM().eval()
    batches = [torch.from_numpy(rng.integers(0, V, size=(4, 9))) for _ in range(5)]
    test = torch.from_numpy(rng.integers(0, V, size=(3, 9)))
    ns = {"lm": lm, "vocab": [f"w{i}" for i in range(V)], "prefix": str(tmp_path / "dstore"),
          "batches": batches, "test": test}
    exec(blocks()[1], ns)
    ds = Datastore.open(str(tmp_path / "dstore"))
    assert ds.size == sum(b[:, 1:].numel() for b in batches)  # one entry per scored token
    assert np.array_equal(np.asarray(ds.vals), torch.cat([b[:, 1:].reshape(-1) for b in batches]).numpy())
    with torch.no_grad():
        keys = torch.tanh(lm.mix(lm.emb(test[:, :-1]))).reshape(-1, D).numpy()  # the hooked state, by hand
        lp_lm = lm(test[:, :-1]).log_softmax(-1).gather(-1, test[:, 1:, None]).reshape(-1).numpy()
    ref = ref_knnlm_lp(np.asarray(ds.keys), np.asarray(ds.vals), keys, test[:, 1:].reshape(-1).numpy(), lp_lm, 8, 0.25)
    summary = ns["knn"].summary()
    assert summary["tokens"] == test[:, 1:].numel()
    assert abs(summary["ppl"] - np.exp(-ref.mean())) < 1e-4 * summary["ppl"]
    assert abs(summary["base_ppl"] - np.exp(-lp_lm.astype(np.float64).mean())) < 1e-4 * summary["base_ppl"]
