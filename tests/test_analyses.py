"""knnlm.experiments.analyses end to end on six fake "books" (the stand-in of tests/test_demo.py).

A 1-layer 32-wide LM trained for 20 updates, k=8, two key types, datastore fractions 0.5 and 1,
half of the valid book scored: this proves that every analysis runs through the real tools, that
its tables and plots are written, that its numbers agree with each other, with a direct
evaluation and with a brute-force search, and that a second run skips every step. It says
nothing about whether the kNN-LM helps (the full run's numbers are in
demo_runs/austen/analyses/results.md). fairseq-eval-lm runs in the analyses' process
(eval.in_process, the default): the fixture's ~20 evaluations cost no interpreter start-up.
"""

import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from knnlm.experiments import analyses
from knnlm.experiments.analyses import head_lines, load_configs, n_tokens, sample_chunks
from knnlm.experiments.demo import DemoError

from .test_demo import TINY, write_books

TINY_ANALYSES = [
    "k_sweep.ks=[1,2,4,8]", "size.fractions=[0.5,1.0]", "eval.valid_fraction=0.5", "eval.test_fraction=0.5",
    # The whole training split for the key types: last_ffn_input is then the demo's datastore.
    "keytype.types=[last_ffn_input,decoder_output]", "keytype.train_fraction=1.0",
    "approx.fractions=null", "domain.chunk_lines=4",
    "domain.demo_overrides=[train.max_update=10,train.warmup_updates=2]",
]


def run_analyses(*args):
    return subprocess.run([sys.executable, "-m", "knnlm.experiments.analyses", *map(str, args)],
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyses")
    books = write_books(tmp / "books")
    workdir = tmp / "run"
    args = ["--austen-dir", books, f"demo.workdir={workdir}", *[f"demo.{o}" for o in TINY], *TINY_ANALYSES]
    first = run_analyses(*args)
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    return {"args": args, "out": workdir / "analyses", "workdir": workdir, "stdout": first.stdout}


def tune_json(out, name):
    return json.loads((out / "tune" / f"{name}.json").read_text())


def test_tables_and_plots_are_written(full_run):
    out = full_run["out"]
    text = (out / "results.md").read_text()
    for title in analyses.TITLES.values():
        assert f"## {title}" in text or title.startswith("shared")
    assert "## Run times" in text and "all analyses" in text
    for png in ("fig4_k.png", "fig5_lambda_temperature.png", "fig2_datastore_size.png", "table5_keytypes.png",
                "fig4_approx.png", "fig5_domain.png", "fig2_beyond.png"):
        assert (out / png).stat().st_size > 5000, png
    result = json.loads((out / "results.json").read_text())
    assert set(result["times"]) == {"demo", "shared", "k", "lambda", "size", "keytype", "approx", "domain",
                                    "beyond"}
    assert all(t["seconds"] > 0 for t in result["times"].values())
    # Every table row of numbers is complete: no empty cell before the last column.
    for line in text.splitlines():
        if line.startswith("| ") and "---" not in line:
            assert "|  |" not in line.rstrip(" |") or "demo's LM" in line, line


def test_k_sweep_matches_a_direct_run(full_run):
    """The sweep's perplexity at k'=4 (from the k=8 export) equals fairseq-eval-lm --k 4."""
    out = full_run["out"]
    sweep = json.loads((out / "k_sweep.json").read_text())
    assert [r["k"] for r in sweep["rows"]] == [1, 2, 4, 8]
    best = json.loads((full_run["workdir"] / "tune" / "best.json").read_text())
    assert sweep["lmbda"] == best["best_lambda"] and sweep["temperature"] == best["best_temperature"]
    cfg, dcfg, _, _ = load_configs([a for a in full_run["args"][2:]])
    an = analyses.Analyses(cfg, dcfg)
    an.logs_dir.mkdir(parents=True, exist_ok=True)
    args = an.knn_args(an.demo.dstore, an.demo.index, lmbda=sweep["lmbda"], temperature=sweep["temperature"])
    args[args.index("--k") + 1] = 4
    lines = an.eval_lm("test_direct_k4", an.demo.data, an.demo.checkpoint, "valid", "last_ffn_input", *args)
    direct = analyses.parse_summary(lines, "direct")
    row = next(r for r in sweep["rows"] if r["k"] == 4)
    assert row["ppl"] == pytest.approx(direct["knn_ppl"], abs=1e-3)
    assert sweep["base_ppl"] == pytest.approx(direct["base_ppl"], abs=1e-3)
    # At k = 8 with the export's own lambda and T the sweep reproduces the demo's scored valid.
    for r in sweep["rows"]:
        assert r["best_ppl"] <= r["ppl"] + 1e-9


def test_lambda_zero_is_the_base_lm_everywhere(full_run):
    out = full_run["out"]
    tunes = sorted((out / "tune").glob("*.json"))
    # lambda/T, key types, 3 ways x 2 datastore fractions, domain, beyond's two datastores
    assert len(tunes) == 1 + 2 + 3 * 2 + 2 + 2
    for path in tunes:
        r = json.loads(path.read_text())
        assert r["lambdas"][0] == 0.0
        for row in r["ppl"]:
            assert row[0] == pytest.approx(r["base_ppl"], rel=1e-6)
        assert r["best_ppl"] <= r["base_ppl"] + 1e-9
    # The same LM on the same tokens: one base perplexity for every export of the valid slice.
    same = [tune_json(out, n)["base_ppl"] for n in (
        "keytype_tune_last_ffn_input", "keytype_tune_decoder_output", "tune_full_l2",
        *[f"approx_tune_{w}_f{f}" for w in ("faiss", "exact") for f in ("1", "0.5")], "approx_tune_l2_f0.5")]
    assert max(same) - min(same) < 1e-3
    sizes = json.loads((out / "size_sweep.json").read_text())
    assert all(abs(r["base_ppl"] - same[0]) < 1e-3 for r in sizes["rows"])
    # ... and the results table's lambda = 0 column is the base LM.
    text = (out / "results.md").read_text()
    section = text.split("## 2.")[1].split("## 3.")[0]
    r = tune_json(out, "lambda_temperature")
    for line in section.splitlines():
        if re.match(r"\| [\d.]+ \| ", line):
            assert line.split("|")[2].strip() == f"{r['base_ppl']:.2f}"


def test_sizes_keytypes_domain(full_run):
    out, workdir = full_run["out"], full_run["workdir"]
    n = json.loads((workdir / "dstore" / "train_meta.json").read_text())["size"]
    sizes = json.loads((out / "size_sweep.json").read_text())
    assert [r["size"] for r in sizes["rows"]] == [round(0.5 * n), n]
    # The full-datastore row on the slice is the shared export, scored at the demo's settings.
    steps = json.loads((out / ".steps" / "export_full_l2.json").read_text())["info"]
    assert sizes["rows"][1]["base_ppl"] == pytest.approx(steps["base_ppl"], abs=1e-3)
    result = json.loads((out / "results.json").read_text())
    kt = result["keytype"]
    assert set(kt) == {"last_ffn_input", "decoder_output"}
    assert kt["last_ffn_input"]["size"] == kt["decoder_output"]["size"] == n  # the same text
    # last_ffn_input over the whole training split is the demo's datastore: the shared export.
    assert tune_json(out, "keytype_tune_last_ffn_input")["export"] == tune_json(out, "tune_full_l2")["export"]
    dom = result["domain"]
    for s in ("unseen", "seen"):
        assert 0 <= dom[s]["best_lambda"] <= 1 and dom[s]["best_ppl"] <= dom[s]["base_ppl"] + 1e-9
    # Seen and unseen datastores are about the same size (the seen one is sampled to match).
    assert abs(dom["seen"]["size"] - dom["unseen"]["size"]) < 0.5 * dom["unseen"]["size"]
    test = dom["test"]
    assert test["tokens"] > 100 and test["base_ppl"] > 1 and test["lmbda"] == dom["unseen"]["best_lambda"]
    text = (out / "results.md").read_text()
    assert f"| 3 books | none | - | {dom['unseen']['base_ppl']:.2f} |" in text


def _export(out, name):
    from knnlm.offline.export import load_export

    return load_export(str(out / "exports" / name))


def test_approx_rows_and_exact_neighbors_against_brute_force(full_run, tmp_path):
    """Analysis 5: three ways per datastore fraction; the exact search's neighbors are the true
    k nearest (brute force over the keys, from queries dumped by the same LM on the same tokens),
    FAISS's are never nearer, and FAISS's scores are not the exact ones."""
    out, workdir = full_run["out"], full_run["workdir"]
    result = json.loads((out / "results.json").read_text())
    ap = result["approx"]
    assert set(ap) == {f"{w}_f{f}" for w in ("faiss", "l2", "exact") for f in ("1", "0.5")}
    n = json.loads((workdir / "dstore" / "train_meta.json").read_text())["size"]
    assert ap["exact_f1"]["size"] == n and ap["faiss_f0.5"]["size"] == round(0.5 * n)
    section = (out / "results.md").read_text().split("## 5.")[1].split("## 6.")[0]
    rows = [line for line in section.splitlines() if line.startswith(("| 100%", "| 50%"))]
    assert len(rows) == 6 and sum("exact neighbors, exact scores" in r for r in rows) == 2
    for r in ap.values():
        assert r["best_ppl"] <= r["best_ppl_T1"] + 1e-9 and r["best_ppl_T1"] <= r["base_ppl"] + 1e-9

    # Queries: the LM's keys on the valid slice, dumped in the order the exports score the tokens.
    cfg, dcfg, _, _ = load_configs(full_run["args"][2:])
    an = analyses.Analyses(cfg, dcfg)
    an.logs_dir.mkdir(parents=True, exist_ok=True)
    an.eval_lm("test_queries", an.eval_data, an.demo.checkpoint, "valid", "last_ffn_input",
               "--save-knnlm-dstore", "--dstore-mmap", tmp_path / "q", "--overwrite")
    q = np.load(tmp_path / "q_keys.npy").astype(np.float64)
    keys = np.load(workdir / "dstore" / "train_keys.npy").astype(np.float64)
    exact, faiss_l2, faiss_pq = (_export(out, name) for name in (
        "approx_export_exact_f1", "export_full_l2", "approx_export_faiss_f1"))
    assert exact.count == faiss_l2.count == len(q) > 100
    d2 = (q ** 2).sum(1)[:, None] + (keys ** 2).sum(1)[None, :] - 2 * q @ keys.T
    brute = np.sort(d2, axis=1)[:, :dcfg.k]
    got = np.sort(np.asarray(exact.dists, dtype=np.float64), axis=1)
    np.testing.assert_allclose(got, brute, rtol=1e-4, atol=1e-3)
    approx_l2 = np.sort(np.asarray(faiss_l2.dists, dtype=np.float64), axis=1)
    assert (approx_l2 >= got - 1e-3 - 1e-4 * np.abs(got)).all()  # FAISS's neighbors are never nearer
    assert not np.allclose(np.asarray(faiss_pq.dists), np.asarray(faiss_l2.dists))  # quantized scores


def test_beyond_the_training_data(full_run):
    """Analysis 7: rows (a)-(e) agree with each other and with the other analyses' numbers."""
    out, workdir = full_run["out"], full_run["workdir"]
    b = json.loads((out / "results.json").read_text())["beyond"]
    rows = b["rows"]
    assert list(rows) == ["a", "b", "c", "d", "e"]
    assert b["books"] == {"own": ["Sense & Sensibility", "Pride & Prejudice"], "rest": ["Mansfield Park", "Emma"]}
    own, all4, full = (tune_json(out, n) for n in ("beyond_tune_own", "beyond_tune_all", "tune_full_l2"))
    # The same 2-book LM on the same tokens: one base perplexity; (d) is the demo's LM on the slice.
    assert own["base_ppl"] == pytest.approx(all4["base_ppl"], abs=1e-4)
    assert rows["a"]["valid_ppl"] == own["base_ppl"] and rows["d"]["valid_ppl"] == full["base_ppl"]
    assert full["base_ppl"] == pytest.approx(
        json.loads((out / ".steps" / "export_full_l2.json").read_text())["info"]["base_ppl"], abs=1e-3)
    assert (rows["b"]["valid_ppl"], rows["c"]["valid_ppl"], rows["e"]["valid_ppl"]) == (
        own["best_ppl"], all4["best_ppl"], full["best_ppl"])
    tests = {r: json.loads((out / "beyond" / "scores" / f"test_{r}.json").read_text()) for r in "bce"}
    assert tests["b"]["base_ppl"] == pytest.approx(tests["c"]["base_ppl"], abs=1e-4)
    assert rows["a"]["test_ppl"] == tests["b"]["base_ppl"] and rows["d"]["test_ppl"] == tests["e"]["base_ppl"]
    assert tests["b"]["tokens"] == tests["e"]["tokens"] == b["test_tokens"] > 100
    for r, t in (("b", own), ("c", all4), ("e", full)):  # scored at the lambda and T tuned on valid
        assert (tests[r]["lmbda"], tests[r]["temperature"]) == (t["best_lambda"], t["best_temperature"])
        assert rows[r]["test_ppl"] == tests[r]["knn_ppl"]
    # Its own text; its own text + the other two books = the demo's training text, as many entries.
    n_demo = json.loads((workdir / "dstore" / "train_meta.json").read_text())["size"]
    text = (out / "beyond" / "text" / "own.txt").read_text().splitlines()
    assert rows["b"]["entries"] == n_tokens(text) < n_demo
    assert rows["c"]["entries"] == rows["e"]["entries"] == n_demo
    manifest = json.loads((out / "beyond" / "dstore" / "all_shards.json").read_text())
    assert [s["prefix"] for s in manifest["shards"]] == ["own", "rest"] and manifest["size"] == n_demo
    md = (out / "results.md").read_text().split("## 7.")[1].split("## Run times")[0]
    assert all(f"| ({r}) |" in md for r in "abcde")
    assert sum(v in md for v in ("**(c) reaches (d)**", "**(c) does not reach (d)**", "one split only")) == 1


def test_second_run_skips_everything(full_run):
    again = run_analyses(*full_run["args"])
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    n_steps = len(list((full_run["out"] / ".steps").glob("*.json")))
    demo_steps = len(list((full_run["workdir"] / ".steps").glob("*.json")))
    assert again.stdout.count("done already, skipped") == n_steps + demo_steps
    assert "This run took" in (full_run["out"] / "results.md").read_text()


# ---- helpers and configuration, without any tool ----

def test_text_sampling():
    lines = [" ".join([f"w{i}"] * (i % 7 + 1)) for i in range(100)]
    assert head_lines(lines, 0.25) == lines[:25] and head_lines(lines, 1.0) == lines
    part = sample_chunks(lines, chunk_lines=10, seed=1, fraction=0.3)
    assert len(part) == 30 and part == sample_chunks(lines, chunk_lines=10, seed=1, fraction=0.3)
    assert part != sample_chunks(lines, chunk_lines=10, seed=2, fraction=0.3)
    # Chunks stay whole and in their original order.
    starts = [lines.index(part[i]) for i in range(0, 30, 10)]
    assert starts == sorted(starts) and all(s % 10 == 0 for s in starts)
    target = n_tokens(lines) // 3
    some = sample_chunks(lines, chunk_lines=10, seed=1, tokens=target)
    assert target <= n_tokens(some) < target + n_tokens(lines[:10]) + 10


def test_config_overrides_and_errors():
    cfg, dcfg, demo_over, _ = load_configs(["run=[k]", "demo.k=64", "size.fractions=[0.5]"])
    assert list(cfg.run) == ["k"] and dcfg.k == 64 and demo_over == ["k=64"]
    assert list(cfg.size.fractions) == [0.5]
    with pytest.raises(DemoError, match="unknown analyses"):
        load_configs(["run=[k,nope]"])
    with pytest.raises(DemoError, match="bad setting"):
        load_configs(["no_such=1"])
    with pytest.raises(DemoError, match="bad setting"):
        load_configs(["demo.no_such=1"])
    with pytest.raises(DemoError, match="fraction"):
        load_configs(["eval.valid_fraction=0"])
    with pytest.raises(DemoError, match="fraction"):
        load_configs(["approx.fractions=[0.5,2]"])
    for books in ("[Emma,Emma]", "[Persuasion]", "[]", "[No Such Book]",
                  "[Emma,Mansfield Park,Pride & Prejudice,Sense & Sensibility]"):
        with pytest.raises(DemoError, match="beyond.train_books"):
            load_configs([f"beyond.train_books={books}"])
    assert analyses.beyond_books(load_configs(["beyond.train_books=[emma,sense_and_sensibility]"])[0]) == (
        ["Sense & Sensibility", "Emma"], ["Pride & Prejudice", "Mansfield Park"])
    assert not math.isnan(cfg.eval.valid_fraction)
