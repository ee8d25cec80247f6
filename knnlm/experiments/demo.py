"""The kNN-LM demo: Jane Austen's novels, a small LM trained on the CPU, and its kNN-LM.

    python -m knnlm.experiments.demo [--austen-dir DIR] [--config YAML] [key=value ...]   (`make demo`)

Steps (each is timed, logged, and skipped when its outputs already exist):

  1. corpus      train/valid/test text from the Debian package r-cran-janeaustenr
  2. preprocess  fairseq-preprocess --only-source
  3. train       fairseq-train a small transformer LM
  4. datastore   fairseq-eval-lm --save-knnlm-dstore on the training split
  5. index       knnlm-build-index (FAISS IVF-PQ)
  6. export      fairseq-eval-lm --knnlm --knnlm-dump-probs on valid
  7. tune        knnlm-tune: lambda and the temperature on that export
  8. score       fairseq-eval-lm --knnlm on valid and test with the tuned values
  9. explorer    the test split exported with neighbor ids, and knnlm-explain's page of it

then prints base LM vs kNN-LM perplexity and writes it to WORKDIR/results.md (+ .json), and
prints the path of the explorer page (WORKDIR/explorer.html).

Settings come from configs/demo/austen.yaml; `key=value` arguments override them
(`k=64`, `train.max_update=500`). A step counts as done when its outputs exist and its
stamp (WORKDIR/.steps/NAME.json) records the same settings, those of the steps before it
included: so a second run skips everything, and changing a setting redoes the step it
belongs to and every later one. A step interrupted half-way resumes where its tool can
(fairseq-train from checkpoint_last.pt, the index builder from its partial index).
Every tool's full output is in WORKDIR/logs/.
"""

import argparse
import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf

from ..config import config_path, load_yaml
from ..errors import ConfigError

DEFAULT_CONFIG = config_path("demo/austen")
# The --user-dir: the installed (or checked-out) fairseq_plugins package, found without importing it.
PLUGIN_DIR = Path(importlib.util.find_spec("fairseq_plugins").submodule_search_locations[0])
# Console scripts and the modules they run (used when the script is not next to python).
TOOLS = {
    "fairseq-preprocess": "fairseq_cli.preprocess",
    "fairseq-train": "fairseq_cli.train",
    "fairseq-eval-lm": "fairseq_cli.eval_lm",
    "knnlm-build-index": "knnlm.index.builder",
    "knnlm-tune": "knnlm.offline.tune",
    "knnlm-explain": "knnlm.explain.cli",
}
# Our plugin's summary line (fairseq_plugins/task.py).
SUMMARY_RE = re.compile(r"kNN-LM: ([\d,]+) tokens, base LM perplexity ([\d.]+|inf), "
                        r"kNN-LM perplexity ([\d.]+|inf)")
# fairseq's own last line of eval_lm.
EVAL_RE = re.compile(r"Loss \(base 2\): ([\d.]+), Perplexity: ([\d.]+|inf)")
# Lines of tool output worth showing on the console (everything goes to the step's log).
SHOW_TRAIN = r"\| (train_inner|train|valid) \||done training|num. model params"
SHOW_EVAL = r"fairseq_plugins\.knnlm[:|]|Evaluated \d|Loss \(base 2\)"
SHOW_ALL = r"."
# A tqdm progress bar; shown at most every PROGRESS_EVERY seconds.
TQDM_RE = re.compile(r"\d+/\d+ \[|\d+it \[|it/s\]|s/it\]")
LOG_START_RE = re.compile(r"(?:INFO|WARNING|ERROR|CRITICAL|DEBUG)[:| ]")
PROGRESS_EVERY = 15.0

log = logging.getLogger("knnlm.demo")


class DemoError(RuntimeError):
    """A step failed; the message says which and where its log is."""


# --------------------------------------------------------------------------- configuration


def load_config(overrides=(), path=DEFAULT_CONFIG) -> DictConfig:
    """The YAML at `path` with `key=value` overrides; unknown keys are an error."""
    try:
        cfg = load_yaml(path, overrides)
    except ConfigError as e:
        raise DemoError(str(e)) from None
    if cfg.model.embed_dim % cfg.index.code_size:
        raise DemoError(f"index.code_size={cfg.index.code_size} must divide model.embed_dim={cfg.model.embed_dim}")
    if not 0 <= cfg.context_window < cfg.model.tokens_per_sample:
        raise DemoError(f"context_window must be in [0, model.tokens_per_sample={cfg.model.tokens_per_sample})")
    return cfg


# --------------------------------------------------------------------------- running tools


def tool(name):
    """argv prefix for a console tool of this environment."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", TOOLS[name]]


def _spawn(cmd, env):
    """Start `cmd` with stdout and stderr on a pseudo-terminal where there is one, so that the
    tools draw their progress bars (fairseq shows none when stderr is not a terminal);
    else on a pipe. Returns the process and a read() giving b"" at the end of its output."""
    try:
        import fcntl
        import pty
        import struct
        import termios

        master, slave = pty.openpty()
        # rows, columns: a new terminal has 0 x 0, in which tqdm draws an empty bar.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    except (ImportError, OSError):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        return proc, lambda: proc.stdout.read1(1 << 16)
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    finally:
        os.close(slave)

    def read():
        try:
            return os.read(master, 1 << 16)
        except OSError:  # EIO: every holder of the terminal's other end has exited
            os.close(master)
            return b""

    return proc, read


def _split_bar_and_log(raw_lines):
    """Decoded lines; a log record that tqdm's unfinished bar line swallowed becomes its own line."""
    for raw in raw_lines:
        line = raw.decode("utf-8", "replace").rstrip()
        m = LOG_START_RE.search(line)
        if m and m.start() > 0 and TQDM_RE.search(line[:m.start()]):
            yield line[:m.start()].rstrip()
            line = line[m.start():]
        yield line


def run_tool(cmd, log_path, show=SHOW_ALL, env=None):
    """Run `cmd`, appending its output to `log_path` and echoing the lines that match `show`
    and, every PROGRESS_EVERY seconds, its progress bar; returns the output's lines (progress
    bars left out). Raises DemoError if it fails."""
    cmd = [str(c) for c in cmd]
    show_re = re.compile(show)
    log.info("$ %s", shlex.join(cmd))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1", **(env or {})}
    lines, tail, last_bar = [], deque(maxlen=30), 0.0
    with open(log_path, "a", encoding="utf-8") as out:
        out.write(f"\n$ {shlex.join(cmd)}\n")
        proc, read = _spawn(cmd, env)
        pending = b""
        try:
            for chunk in iter(read, b""):
                *done, pending = re.split(rb"[\r\n]", pending + chunk)
                for line in _split_bar_and_log(done):
                    if not line:
                        continue
                    if TQDM_RE.search(line):  # a progress bar redrawn in place
                        if time.time() - last_bar < PROGRESS_EVERY:
                            continue
                        last_bar = time.time()
                        bar = re.sub(r"\|[^|]*\|", " ", line).strip()  # drop the drawn bar
                        print(f"    {bar[:160]}", flush=True)
                    else:
                        lines.append(line)
                        if show_re.search(line):
                            print(f"    {line[:200]}", flush=True)
                    tail.append(line)
                    out.write(line + "\n")
                out.flush()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        if pending.strip():
            lines.append(pending.decode("utf-8", "replace").rstrip())
            tail.append(lines[-1])
            out.write(lines[-1] + "\n")
        rc = proc.wait()
    if rc != 0:
        last = "\n".join(f"    {line}" for line in tail)
        raise DemoError(f"{Path(cmd[0]).name} exited with status {rc}; its last lines:\n{last}\n"
                        f"full output: {log_path}")
    return lines


# --------------------------------------------------------------------------- steps


def _digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _remove(path: Path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass
class Step:
    """One stage of the demo: `action()` makes `outputs` from `settings`.

    Done (and skipped) when every output exists and the stamp records the same key, a hash
    of `settings` and of the previous step's key. Before redoing a step whose earlier
    attempt had other settings, its outputs and `scratch` paths are deleted; an attempt
    with the same settings is left alone, so the tool can resume it.
    """

    name: str
    title: str
    outputs: list
    settings: dict
    action: Callable[[], Optional[dict]]
    scratch: list = field(default_factory=list)

    def run(self, demo: "Demo", number: int, upstream_key: str) -> dict:
        key = _digest({"settings": self.settings, "upstream": upstream_key})
        stamp = demo.steps_dir / f"{self.name}.json"
        started = demo.steps_dir / f"{self.name}.started"
        header = f"[{number}/{demo.n_steps}] {self.title}"
        record = json.loads(stamp.read_text()) if stamp.is_file() else None
        if record and record.get("key") == key and all(Path(p).exists() for p in self.outputs):
            log.info("%s: done already, skipped (it took %s)", header, fmt_seconds(record["seconds"]))
            return {**record, "skipped": True}

        if not (started.is_file() and started.read_text().strip() == key):
            if record or started.is_file():
                log.info("%s: settings changed since the last run, redoing it", header)
            for path in [*self.outputs, *self.scratch]:
                _remove(Path(path))
            stamp.unlink(missing_ok=True)
            started.write_text(key + "\n")
        else:
            log.info("%s: resuming an interrupted attempt", header)
        log.info("%s ...", header)
        t0 = time.time()
        info = self.action() or {}
        seconds = time.time() - t0
        missing = [str(p) for p in self.outputs if not Path(p).exists()]
        if missing:
            raise DemoError(f"step {self.name} finished but did not write {missing}")
        record = {"key": key, "name": self.name, "title": self.title, "seconds": round(seconds, 1),
                  "settings": self.settings, "info": info,
                  "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, stamp)
        started.unlink(missing_ok=True)
        log.info("%s: done in %s", header, fmt_seconds(seconds))
        return {**record, "skipped": False}


def fmt_seconds(s):
    s = float(s)
    return f"{s:.1f} s" if s < 60 else f"{int(s // 60)} min {s % 60:04.1f} s"


class Demo:
    """The demo's eight steps for one config; `run()` does them in order."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.workdir = Path(cfg.workdir).expanduser().resolve()
        self.steps_dir = self.workdir / ".steps"
        self.logs_dir = self.workdir / "logs"
        self.data = self.workdir / "data-bin"
        self.checkpoint = self.workdir / "checkpoints" / "checkpoint_last.pt"
        self.dstore = self.workdir / "dstore" / "train"
        self.index = self.workdir / "dstore" / "train_knn.index"
        self.export = self.workdir / "export_valid"
        self.best = self.workdir / "tune" / "best.json"
        self.scores = self.workdir / "scores"
        self.export_test = self.workdir / "export_test"
        self.explorer = self.workdir / "explorer.html"
        self.env = {}
        if cfg.threads:
            self.env = {"OMP_NUM_THREADS": str(cfg.threads), "MKL_NUM_THREADS": str(cfg.threads)}
        self.results = {}
        self.n_steps = len(self.steps())

    # ---- helpers ----
    def path(self, *parts) -> Path:
        return self.workdir.joinpath(*parts)

    def tool(self, step, name, *args, show=SHOW_ALL):
        return run_tool([*tool(name), *args], self.logs_dir / f"{step}.log", show=show, env=self.env)

    def eval_lm(self, step, split, *args):
        """fairseq-eval-lm with our plugin on `split`, with the demo's context window."""
        c = self.cfg
        return self.tool(
            step, "fairseq-eval-lm", self.data, "--path", self.checkpoint,
            "--user-dir", PLUGIN_DIR, "--task", "knnlm", "--gen-subset", split,
            "--tokens-per-sample", c.model.tokens_per_sample, "--context-window", c.context_window,
            "--max-tokens", c.eval_max_tokens, "--knn-keytype", c.datastore.keytype,
            "--cpu", "--num-workers", 0, "--log-format", "tqdm", *args, show=SHOW_EVAL)

    def knn_args(self, lmbda, temperature):
        c = self.cfg
        return ["--knnlm", "--dstore-filename", self.dstore, "--indexfile", self.index,
                "--k", c.k, "--probe", c.probe, "--knn-sim-func", c.sim_func,
                "--lmbda", lmbda, "--knn-temp", temperature,
                *(["--move-dstore-to-mem"] if c.move_dstore_to_mem else [])]

    # ---- 1. corpus ----
    def make_corpus(self):
        from .corpora.austen import build_austen_corpus

        c = self.cfg
        source = Path(c.austen_dir).expanduser().resolve() if c.austen_dir else None
        stats = build_austen_corpus(self.path("corpus"), data_dir=source, min_count=c.min_count)
        for split in ("train", "valid", "test"):
            log.info("    %-5s %8s tokens  %s", split, f"{stats['tokens'][split]:,}",
                     ", ".join(stats["books"][split]))
        log.info("    vocabulary %s words (min_count=%d, <unk> included)", f"{stats['vocab_size']:,}", c.min_count)
        return {"tokens": stats["tokens"], "vocab_size": stats["vocab_size"], "books": stats["books"]}

    # ---- 2. preprocess ----
    def make_binarized(self):
        tmp = self.path("data-bin.tmp")
        _remove(tmp)
        corpus = self.path("corpus")
        self.tool("preprocess", "fairseq-preprocess", "--only-source",
                  "--trainpref", corpus / "train.txt", "--validpref", corpus / "valid.txt",
                  "--testpref", corpus / "test.txt", "--destdir", tmp,
                  "--workers", self.cfg.threads or min(os.cpu_count() or 1, 4),
                  show=r"sents, .* tokens|Dictionary")
        os.replace(tmp, self.data)

    # ---- 3. train ----
    def train_args(self):
        m, t = self.cfg.model, self.cfg.train
        return [
            self.data, "--task", "language_modeling", "--arch", m.arch,
            "--decoder-layers", m.layers, "--decoder-embed-dim", m.embed_dim,
            "--decoder-ffn-embed-dim", m.ffn_dim, "--decoder-attention-heads", m.heads,
            *(["--decoder-normalize-before"] if m.normalize_before else []),
            "--share-decoder-input-output-embed", "--dropout", m.dropout,
            "--tokens-per-sample", m.tokens_per_sample, "--sample-break-mode", "none",
            "--criterion", "cross_entropy", "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
            "--weight-decay", t.weight_decay, "--clip-norm", t.clip_norm,
            "--lr", t.lr, "--lr-scheduler", t.lr_scheduler, "--warmup-updates", t.warmup_updates,
            "--warmup-init-lr", 1e-7, "--max-update", t.max_update, "--max-tokens", t.max_tokens,
            "--seed", t.seed, "--save-dir", self.checkpoint.parent, "--no-epoch-checkpoints",
            # checkpoint_last.pt every save_interval_updates: an interrupted run resumes there.
            "--save-interval-updates", t.save_interval_updates, "--keep-interval-updates", 1,
            "--disable-validation", "--cpu", "--num-workers", 0,
            "--log-format", "simple", "--log-interval", t.log_interval, *t.extra_args,
        ]

    def make_lm(self):
        lines = self.tool("train", "fairseq-train", *self.train_args(), show=SHOW_TRAIN)
        # The last train_inner line: loss (base 2) and words per second.
        info = {}
        for line in reversed(lines):
            m = re.search(r"\| train_inner \|.* loss=([\d.]+).*wps=([\d.]+)", line)
            if m:
                info = {"train_loss": float(m[1]), "wps": float(m[2])}
                break
        return info

    # ---- 4. datastore ----
    def make_datastore(self):
        c = self.cfg
        self.eval_lm("datastore", "train", "--save-knnlm-dstore", "--dstore-mmap", self.dstore,
                     *(["--dstore-fp16"] if c.datastore.fp16 else []), "--overwrite")
        meta = json.loads(Path(f"{self.dstore}_meta.json").read_text())
        log.info("    datastore: %s keys of dimension %d", f"{meta['size']:,}", meta["dim"])
        return {"size": meta["size"], "dim": meta["dim"]}

    # ---- 5. index ----
    def make_index(self):
        i = self.cfg.index
        settings = [f"dstore_mmap={self.dstore}", f"faiss_index={self.index}",
                    f"ncentroids={i.ncentroids}", f"code_size={i.code_size}", f"probe={self.cfg.probe}",
                    f"num_keys_to_train={i.num_keys_to_train}", f"seed={i.seed}",
                    *([f"threads={self.cfg.threads}"] if self.cfg.threads else []), *i.extra_args]
        self.tool("index", "knnlm-build-index", *settings)

    # ---- 6. export ----
    def make_export(self):
        c = self.cfg
        lines = self.eval_lm("export", "valid", *self.knn_args(c.lmbda, c.knn_temp),
                             "--knnlm-dump-probs", self.export, "--overwrite")
        return parse_summary(lines, "export")

    # ---- 7. tune ----
    def make_tuning(self):
        t = self.cfg.tune
        temps = t.temperatures
        temps = ",".join(str(x) for x in temps) if OmegaConf.is_list(temps) else str(temps)
        self.best.parent.mkdir(parents=True, exist_ok=True)
        lambdas = f"0:1:{t.lambda_step}"
        self.tool("tune", "knnlm-tune", self.export, "--lambdas", lambdas, "--temperatures", temps,
                  "--json", self.best, "--plot", self.best.with_name("fig5.png"))
        best = json.loads(self.best.read_text())
        return {k: best.get(k) for k in ("best_lambda", "best_temperature", "best_ppl", "base_ppl")}

    # ---- 8. score ----
    def make_score(self, split):
        best = json.loads(self.best.read_text())
        lines = self.eval_lm(f"score_{split}", split,
                             *self.knn_args(best["best_lambda"], best["best_temperature"]))
        result = {**parse_summary(lines, f"score {split}"),
                  "lmbda": best["best_lambda"], "temperature": best["best_temperature"]}
        self.scores.mkdir(parents=True, exist_ok=True)
        (self.scores / f"{split}.json").write_text(json.dumps(result, indent=2) + "\n")
        log.info("    %s: base LM %.2f -> kNN-LM %.2f (%.1f%% lower)", split, result["base_ppl"],
                 result["knn_ppl"], result["gain_pct"])
        return result

    # ---- 9. explorer ----
    def make_explorer(self):
        """The test split scored as in step 8, exported with the neighbors' ids, and its page."""
        c, best = self.cfg.explorer, json.loads(self.best.read_text())
        lines = self.eval_lm("explorer", "test", *self.knn_args(best["best_lambda"], best["best_temperature"]),
                             "--knnlm-dump-probs", self.export_test, "--knnlm-dump-ids",
                             "--knnlm-dump-neighbors", c.dump_neighbors, "--overwrite")
        scored = parse_summary(lines, "explorer export")
        lines = self.tool("explorer", "knnlm-explain", self.export_test, "--datastore", self.dstore,
                          "--dict", self.data / "dict.txt", "-o", self.explorer, "--neighbors", c.neighbors,
                          "--context", c.context, "--title", "kNN-LM explorer: Austen, test split (Persuasion)",
                          show=r"^wrote |^knnlm-explain: ")
        return {"tokens": scored["tokens"], "knn_ppl": scored["knn_ppl"], "page": str(self.explorer),
                "line": next((x for x in reversed(lines) if x.startswith("wrote ")), "")}

    # ---- the pipeline ----
    def steps(self):
        c = self.cfg
        ds = Path(f"{self.dstore}_meta.json")
        return [
            Step("corpus", "Austen corpus", [self.path("corpus", f"{s}.txt") for s in ("train", "valid", "test")],
                 {"austen_dir": c.austen_dir, "min_count": c.min_count}, self.make_corpus,
                 scratch=[self.path("corpus")]),
            Step("preprocess", "fairseq-preprocess", [self.data / "dict.txt", self.data / "train.bin"],
                 {}, self.make_binarized, scratch=[self.data, self.path("data-bin.tmp")]),
            Step("train", "fairseq-train", [self.checkpoint],
                 {"model": c.model, "train": c.train}, self.make_lm, scratch=[self.checkpoint.parent]),
            Step("datastore", "datastore of the training split", [ds, Path(f"{self.dstore}_keys.npy")],
                 {"context_window": c.context_window, "datastore": c.datastore}, self.make_datastore,
                 scratch=[Path(f"{self.dstore}_{x}") for x in ("keys.npy", "vals.npy", "meta.json")]),
            Step("index", "FAISS index", [self.index, Path(f"{self.index}.meta.json")],
                 {"index": c.index, "probe": c.probe}, self.make_index,
                 scratch=list(self.index.parent.glob(self.index.name + "*"))),
            Step("export", "valid-set kNN-LM export", [self.export / "meta.json"],
                 {k: c[k] for k in ("k", "sim_func", "lmbda", "knn_temp", "eval_max_tokens")},
                 self.make_export, scratch=[self.export]),
            Step("tune", "knnlm-tune (lambda, temperature)", [self.best], {"tune": c.tune},
                 self.make_tuning, scratch=[self.best.parent]),
            # The tuned lambda and T are fixed by the keys of the steps above.
            Step("score_valid", "kNN-LM on valid", [self.scores / "valid.json"], {},
                 lambda: self.make_score("valid")),
            Step("score_test", "kNN-LM on test", [self.scores / "test.json"], {},
                 lambda: self.make_score("test")),
            Step("explorer", "neighbor explorer of the test split", [self.explorer],
                 {"explorer": c.explorer}, self.make_explorer, scratch=[self.export_test]),
        ]

    def run(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.steps_dir.mkdir(exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        (self.workdir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        log.info("workdir %s (settings in config.yaml, tool output in logs/)", self.workdir)
        t0 = time.time()
        key = ""
        for number, step in enumerate(self.steps(), 1):
            self.results[step.name] = record = step.run(self, number, key)
            key = record["key"]
        total = time.time() - t0
        text = results_markdown(self.cfg, self.results, total)
        (self.workdir / "results.md").write_text(text)
        (self.workdir / "results.json").write_text(json.dumps(
            results_json(self.results, total), indent=2, default=str) + "\n")
        print("\n" + text)
        log.info("wrote %s", self.workdir / "results.md")
        print(f"explorer (open in a browser): {self.explorer}")
        return self.results


def parse_summary(lines, what):
    for line in reversed(lines):
        m = SUMMARY_RE.search(line)
        if m:
            tokens, base, knn = int(m[1].replace(",", "")), float(m[2]), float(m[3])
            return {"tokens": tokens, "base_ppl": base, "knn_ppl": knn,
                    "gain_pct": 100.0 * (1.0 - knn / base)}
    raise DemoError(f"{what}: fairseq-eval-lm printed no 'kNN-LM: ... perplexity' summary line")


# --------------------------------------------------------------------------- results


def results_json(results, total):
    info = {name: r["info"] for name, r in results.items()}
    return {
        "valid": info["score_valid"], "test": info["score_test"],
        "best_lambda": info["tune"]["best_lambda"], "best_temperature": info["tune"]["best_temperature"],
        "datastore_size": info["datastore"]["size"], "key_dim": info["datastore"]["dim"],
        "steps": {name: {"seconds": r["seconds"], "skipped": r["skipped"]} for name, r in results.items()},
        "wall_seconds_this_run": round(total, 1),
    }


def results_markdown(cfg, results, total):
    info = {name: r["info"] for name, r in results.items()}
    m, ds, tune = cfg.model, info["datastore"], info["tune"]
    rows = ["| split | tokens | base LM ppl | kNN-LM ppl | relative gain |",
            "|---|---:|---:|---:|---:|"]
    for split in ("valid", "test"):
        s = info[f"score_{split}"]
        rows.append(f"| {split} | {s['tokens']:,} | {s['base_ppl']:.2f} | {s['knn_ppl']:.2f} | "
                    f"{s['gain_pct']:.1f}% |")
    books = info["corpus"]["books"]
    lines = [
        "# kNN-LM on Jane Austen",
        "",
        f"LM: {m.arch}, {m.layers} layers, {m.embed_dim} wide (FFN {m.ffn_dim}), {m.tokens_per_sample} "
        f"positions, {cfg.train.max_update} updates of {cfg.train.max_tokens} tokens; trained on "
        f"{', '.join(books['train'])} ({info['corpus']['tokens']['train']:,} tokens, "
        f"vocabulary {info['corpus']['vocab_size']:,}). valid = {', '.join(books['valid'])}, "
        f"test = {', '.join(books['test'])}.",
        "",
        *rows,
        "",
        f"- tuned on valid (knnlm-tune): lambda = {tune['best_lambda']:g}, temperature = "
        f"{tune['best_temperature']:g}",
        f"- datastore: {ds['size']:,} keys of dimension {ds['dim']} ({cfg.datastore.keytype}, "
        f"training split, context window {cfg.context_window}); index IVF{cfg.index.ncentroids},"
        f"PQ{cfg.index.code_size}; k = {cfg.k}, probe = {cfg.probe}, distance {cfg.sim_func}",
        "",
        "| step | wall time | |",
        "|---|---:|---|",
    ]
    for r in results.values():
        lines.append(f"| {r['title']} | {fmt_seconds(r['seconds'])} | "
                     f"{'skipped this run (time of the run that made it)' if r['skipped'] else ''} |")
    made = sum(r["seconds"] for r in results.values())
    lines += [f"| all steps | {fmt_seconds(made)} | |", "",
              f"This run took {fmt_seconds(total)}.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = argparse.ArgumentParser(
        prog="knnlm-demo",
        description="kNN-LM demo on Jane Austen: corpus, LM, datastore, index, tuned kNN-LM, results table.",
        epilog="Settings: any field of the config as key=value, e.g. k=64 train.max_update=500 "
               "workdir=demo_runs/other.")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default %(default)s)")
    p.add_argument("--austen-dir", metavar="DIR",
                   help="local copy of the books (janeaustenr's Rdata.rdb/.rdx or six .txt files) "
                        "instead of apt-get download; same as austen_dir=DIR")
    p.add_argument("--print-config", action="store_true", help="print the settings and exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | demo | %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, stream=sys.stdout)
    overrides = list(args.overrides)
    if args.austen_dir:
        overrides.append(f"austen_dir={Path(args.austen_dir).expanduser().resolve()}")
    try:
        cfg = load_config(overrides, args.config)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        Demo(cfg).run()
    except DemoError as e:
        print(f"knnlm.demo: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("knnlm.demo: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
