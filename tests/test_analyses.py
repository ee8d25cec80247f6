"""knnlm.experiments.analyses end to end on six fake "books" (the stand-in of tests/test_demo.py).

A 1-layer 32-wide LM trained for 20 updates, k=8, two key types, datastore fractions 0.5 and 1,
half of the valid book scored: this proves that every analysis runs through the real tools, that
its tables and plots are written, that its numbers agree with each other and with a direct
evaluation, and that a second run skips every step. It says nothing about whether the kNN-LM
helps (the full run's numbers are in demo_runs/austen/analyses/results.md).
"""

import json
import math
import re
import subprocess
import sys

import pytest

from knnlm.experiments import analyses
from knnlm.experiments.analyses import head_lines, load_configs, n_tokens, sample_chunks
from knnlm.experiments.demo import DemoError

from .test_demo import TINY, write_books

TINY_ANALYSES = [
    "k_sweep.ks=[1,2,4,8]", "size.fractions=[0.5,1.0]", "eval.valid_fraction=0.5", "eval.test_fraction=0.5",
    # The whole training split for the key types: last_ffn_input is then the demo's datastore.
    "keytype.types=[last_ffn_input,decoder_output]", "keytype.train_fraction=1.0",
    "simfunc.fractions=[1.0]", "domain.chunk_lines=4",
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
                "simfunc.png", "fig5_domain.png"):
        assert (out / png).stat().st_size > 5000, png
    result = json.loads((out / "results.json").read_text())
    assert set(result["times"]) == {"demo", "shared", "k", "lambda", "size", "keytype", "simfunc", "domain"}
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
    assert len(tunes) == 1 + 2 + 2 + 2  # lambda/T, key types, sim funcs, domain
    for path in tunes:
        r = json.loads(path.read_text())
        assert r["lambdas"][0] == 0.0
        for row in r["ppl"]:
            assert row[0] == pytest.approx(r["base_ppl"], rel=1e-6)
        assert r["best_ppl"] <= r["base_ppl"] + 1e-9
    # The same LM on the same tokens: one base perplexity for every export of the valid slice.
    same = [tune_json(out, n)["base_ppl"] for n in (
        "keytype_tune_last_ffn_input", "keytype_tune_decoder_output", "simfunc_tune_l2_f1",
        "simfunc_tune_do_not_recomp_l2_f1")]
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


def test_sizes_keytypes_simfunc_domain(full_run):
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
    assert tune_json(out, "keytype_tune_last_ffn_input")["export"] == tune_json(out, "simfunc_tune_l2_f1")["export"]
    sf = result["simfunc"]
    assert set(sf) == {"l2_f1", "do_not_recomp_l2_f1"}
    dom = result["domain"]
    for s in ("unseen", "seen"):
        assert 0 <= dom[s]["best_lambda"] <= 1 and dom[s]["best_ppl"] <= dom[s]["base_ppl"] + 1e-9
    # Seen and unseen datastores are about the same size (the seen one is sampled to match).
    assert abs(dom["seen"]["size"] - dom["unseen"]["size"]) < 0.5 * dom["unseen"]["size"]
    test = dom["test"]
    assert test["tokens"] > 100 and test["base_ppl"] > 1 and test["lmbda"] == dom["unseen"]["best_lambda"]
    text = (out / "results.md").read_text()
    assert f"| 3 books | none | - | {dom['unseen']['base_ppl']:.2f} |" in text


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
    assert not math.isnan(cfg.eval.valid_fraction)
