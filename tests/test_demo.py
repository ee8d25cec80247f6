"""The demo driver (knnlm.experiments.demo) end to end on six fake "books", and its step/skip logic.

The end-to-end run uses a 1-layer 32-wide LM trained for 20 updates and k=8: it proves
that every step runs through the real tools and that a second run skips them all, not
that the kNN-LM helps (the full demo's numbers are in its results.md).
"""

import json
import random
import subprocess
import sys

import pytest

from knnlm.experiments import demo
from knnlm.experiments.demo import DemoError, Step, load_config

BOOKS = ("sense_and_sensibility", "pride_and_prejudice", "mansfield_park", "emma",
         "northanger_abbey", "persuasion")
WORDS = ("the lady said that she was not sure whether her sister would come to the ball and "
         "mr darcy looked at elizabeth with great surprise while emma smiled").split()

TINY = [
    "model.layers=1", "model.embed_dim=32", "model.ffn_dim=64", "model.heads=2",
    "model.tokens_per_sample=64", "context_window=32", "eval_max_tokens=1024",
    "train.max_update=20", "train.max_tokens=512", "train.warmup_updates=5", "train.log_interval=5",
    "index.ncentroids=4", "index.code_size=8", "k=8", "probe=2", "tune.temperatures=[1,10]",
    "tune.lambda_step=0.05", "threads=1",
]


def write_books(folder, seed=0):
    """Six plain-text books named as knnlm.experiments.corpora.austen expects, ~800 words each."""
    rng = random.Random(seed)
    folder.mkdir()
    for name in BOOKS:
        lines = [name.replace("_", " ").upper(), ""]
        for chapter in range(1, 4):
            lines += [f"CHAPTER {chapter}", ""]
            for _ in range(7):
                lines += [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 14))) + "."
                          for _ in range(3)] + [""]
        (folder / f"{name}.txt").write_text("\n".join(lines))
    return folder


def run_demo(*args):
    return subprocess.run([sys.executable, "-m", "knnlm.experiments.demo", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_demo_end_to_end_then_skips(tmp_path):
    books = write_books(tmp_path / "books")
    workdir = tmp_path / "run"
    first = run_demo("--austen-dir", books, f"workdir={workdir}", *TINY)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    result = json.loads((workdir / "results.json").read_text())
    for split in ("valid", "test"):
        s = result[split]
        assert s["tokens"] > 500 and 1 < s["base_ppl"] < 100 and s["knn_ppl"] > 1
        # The tuned lambda can only help on valid (lambda = 0 is on the grid).
        if split == "valid":
            assert s["knn_ppl"] <= s["base_ppl"] + 1e-3
    assert 0 <= result["best_lambda"] <= 1 and result["best_temperature"] in (1, 10)
    assert result["datastore_size"] > 1000 and result["key_dim"] == 32
    assert not any(step["skipped"] for step in result["steps"].values())
    text = (workdir / "results.md").read_text()
    assert "| valid |" in text and "| test |" in text and "fairseq-train" in text
    assert (workdir / "tune" / "fig5.png").is_file()
    assert (workdir / "logs" / "train.log").is_file()
    # step 9: the explorer of the test split, its path printed
    page = workdir / "explorer.html"
    assert page.is_file() and f"explorer (open in a browser): {page}" in first.stdout
    assert '<script id="data" type="application/json">' in page.read_text()
    assert json.loads((workdir / "export_test" / "meta.json").read_text())["count"] == result["test"]["tokens"]

    second = run_demo("--austen-dir", books, f"workdir={workdir}", *TINY)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("done already, skipped") == len(result["steps"])
    again = json.loads((workdir / "results.json").read_text())
    assert all(step["skipped"] for step in again["steps"].values())
    assert again["test"] == result["test"]


# ---- the Step logic, without any tool ----

class FakeDemo:
    def __init__(self, root):
        self.steps_dir = root / ".steps"
        self.steps_dir.mkdir(parents=True)
        self.n_steps = 2


def make_step(root, calls, value, name="a"):
    out = root / f"{name}.txt"

    def action():
        calls.append(name)
        out.write_text(str(value))
        return {"value": value}

    return Step(name, name.upper(), [out], {"value": value}, action)


def test_step_skips_redoes_and_cascades(tmp_path):
    d, calls = FakeDemo(tmp_path), []
    a = make_step(tmp_path, calls, 1).run(d, 1, "")
    b = make_step(tmp_path, calls, 5, "b").run(d, 2, a["key"])
    assert calls == ["a", "b"] and not a["skipped"] and a["info"] == {"value": 1}

    # Same settings: both skipped, keys unchanged.
    a2 = make_step(tmp_path, calls, 1).run(d, 1, "")
    b2 = make_step(tmp_path, calls, 5, "b").run(d, 2, a2["key"])
    assert calls == ["a", "b"] and a2["skipped"] and b2["skipped"] and b2["key"] == b["key"]

    # A changed first step redoes the second one too, although its own settings are the same.
    a3 = make_step(tmp_path, calls, 2).run(d, 1, "")
    make_step(tmp_path, calls, 5, "b").run(d, 2, a3["key"])
    assert calls == ["a", "b", "a", "b"]

    # A missing output redoes the step.
    (tmp_path / "a.txt").unlink()
    make_step(tmp_path, calls, 2).run(d, 1, "")
    assert calls[-1] == "a" and len(calls) == 5


def test_step_interrupted_attempt_is_resumed_not_wiped(tmp_path):
    d = FakeDemo(tmp_path)
    partial = tmp_path / "partial.bin"

    def crash():
        partial.write_text("half")
        raise KeyboardInterrupt

    step = Step("t", "T", [tmp_path / "t.out"], {"x": 1}, crash, scratch=[partial])
    with pytest.raises(KeyboardInterrupt):
        step.run(d, 1, "")
    seen = []

    def finish():
        seen.append(partial.read_text())  # the partial work is still there to resume from
        (tmp_path / "t.out").write_text("done")

    Step("t", "T", [tmp_path / "t.out"], {"x": 1}, finish, scratch=[partial]).run(d, 1, "")
    assert seen == ["half"]

    # Other settings: the scratch of the old attempt is removed before the step runs.
    partial.write_text("stale")
    seen.clear()
    Step("t", "T", [tmp_path / "t.out"], {"x": 2},
         lambda: (seen.append(partial.exists()), (tmp_path / "t.out").write_text("new")),
         scratch=[partial]).run(d, 1, "")
    assert seen == [False]


def test_step_missing_output_is_an_error(tmp_path):
    with pytest.raises(DemoError, match="did not write"):
        Step("s", "S", [tmp_path / "never"], {}, lambda: None).run(FakeDemo(tmp_path), 1, "")


# ---- configuration ----

def test_config_overrides_and_errors():
    cfg = load_config(["k=64", "train.max_update=500", "tune.temperatures=[1,2]"])
    assert cfg.k == 64 and cfg.train.max_update == 500 and list(cfg.tune.temperatures) == [1, 2]
    assert cfg.model.embed_dim % cfg.index.code_size == 0
    with pytest.raises(DemoError, match="bad setting"):
        load_config(["no_such_key=1"])
    with pytest.raises(DemoError, match="key=value"):
        load_config(["k"])
    with pytest.raises(DemoError, match="code_size"):
        load_config(["index.code_size=48"])
    with pytest.raises(DemoError, match="context_window"):
        load_config(["context_window=256", "model.tokens_per_sample=256"])


def test_summary_parsing():
    line = ("INFO | fairseq_plugins.knnlm | kNN-LM: 91,831 tokens, base LM perplexity 120.5000, "
            "kNN-LM perplexity 108.4500 (k=1024, lambda=0.25, T=1.0, l2)")
    s = demo.parse_summary(["noise", line, "Loss (base 2): 6.7, Perplexity: 108.45"], "x")
    assert s["tokens"] == 91831 and s["base_ppl"] == 120.5 and s["knn_ppl"] == 108.45
    assert s["gain_pct"] == pytest.approx(10.0)
    with pytest.raises(DemoError):
        demo.parse_summary(["nothing here"], "x")
