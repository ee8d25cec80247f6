"""The kNN-LM paper's analyses on the demo's data (Jane Austen).

    python -m knnlm.experiments.analyses [--config YAML] [--austen-dir DIR] [key=value ...] [demo.key=value ...]

Runs the demo's steps first (skipped when done: knnlm.demo), then, reusing its LM, datastore,
index and valid-set export:

  k        perplexity vs k (Figure 4): knnlm.sweeps on the demo's k=1024 export; lambda fixed
           at the demo's tuned value and tuned per k, T fixed at the demo's tuned value
  lambda   perplexity vs lambda and T (Figure 5): knnlm-tune on that export
  size     perplexity and the tuned lambda vs datastore size (Figure 2a/2b): knnlm.subset
           fractions, each indexed (knnlm-build-index) and exported
  keytype  the six key types (Table 5): dump, index, export, tune per key type, all dumped
           from the same random sample of the training text
  approx   exact vs approximate neighbors and scores (Xu et al. 2023, Table 3, Figure 4): per
           datastore fraction, FAISS's neighbors with FAISS's quantized distances
           (do_not_recomp_l2) or with recomputed exact L2 (l2), and the exact neighbors
           (--knn-search exact) with exact L2; each tuned, and at T = 1
  domain   domain adaptation (Table 4, Figure 5 right): an LM trained on three books, a
           datastore of a book it never saw, lambda/T tuned on a held-out book, scored on another
  beyond   a datastore beyond the training data (Section 4.2, Table 3, Figure 2): an LM trained
           on two of the four training books (the demo's dictionary and training compute), alone,
           with a datastore of its own training text and of all four books, vs the demo's LM
           alone and with its datastore; valid and test

Writes DEMO_WORKDIR/analyses/results.md (+ results.json) with every number, PNG plots beside
it, every tool's output in analyses/logs/. Each stage is a knnlm.demo.Step: skipped when its
outputs exist and its stamp (analyses/.steps/NAME.json) records the same settings, those of
the steps it builds on and of the demo included. Settings: configs/demo/analyses.yaml.
"""

import argparse
import contextlib
import io
import json
import logging
import math
import random
import shlex
import shutil
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ..config import config_path, load_yaml
from ..errors import ConfigError

from . import demo as demo_mod
from .demo import (PLUGIN_DIR, SHOW_EVAL, Demo, DemoError, Step, _digest, fmt_seconds, load_config,
                   parse_summary, run_tool, tool)

DEFAULT_CONFIG = config_path("demo/analyses")
ANALYSES = ("k", "lambda", "size", "keytype", "approx", "domain", "beyond")
TITLES = {
    "shared": "shared (valid slice, full-datastore export on it)",
    "k": "1. perplexity vs k (Figure 4)",
    "lambda": "2. perplexity vs lambda and T (Figure 5)",
    "size": "3. datastore size (Figure 2a/2b)",
    "keytype": "4. key types (Table 5)",
    "approx": "5. exact vs approximate neighbors and scores (Xu et al. 2023, Table 3, Figure 4)",
    "domain": "6. domain adaptation (Table 4, Figure 5 right)",
    "beyond": "7. a datastore beyond the training data (Table 3, Figure 2)",
}
# Analysis 5's three ways to score a datastore (Xu et al. 2023's names): label, knn search, sim func.
APPROX = {
    "faiss": ("FAISS neighbors, FAISS scores", "faiss", "do_not_recomp_l2"),
    "l2": ("FAISS neighbors, exact scores", "faiss", "l2"),
    "exact": ("exact neighbors, exact scores", "exact", "l2"),
}
# Xu et al. 2023, Table 3 (WikiText-103, full datastore, lambda and T tuned; base LM 21.750).
APPROX_PAPER = {"faiss": 19.174, "l2": 19.672, "exact": 19.735}
# Khandelwal et al. 2020, Table 3 (WIKI-3B dev, test): the 100M-token LM with a 3B-token
# datastore beats the LM trained on all 3B tokens.
BEYOND_PAPER = {"a": (20.99, 19.59), "c": (14.61, 13.73), "d": (16.11, 15.17)}
# The paper's Table 5 (WikiText-103 dev perplexity, k=1024, lambda tuned); base LM 17.96.
KEYTYPE_PAPER = {
    "decoder_output": ("Model output", 17.07),
    "decoder_output_ln": ("Model output layer normalized", 17.01),
    "last_ffn_input": ("FFN input after layer norm", 16.06),
    "last_ffn_input_before_ln": ("FFN input before layer norm", 17.06),
    "last_attn_input": ("MHSA input after layer norm", 16.76),
    "last_attn_input_before_ln": ("MHSA input before layer norm", 17.14),
}
TABLE_LAMBDAS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# The demo's last step the analyses need: its tuned lambda and T on the valid export.
DEMO_LAST_STEP = "tune"

log = logging.getLogger("knnlm.analyses")


# --------------------------------------------------------------------------- configuration


def load_configs(overrides=(), path=DEFAULT_CONFIG):
    """(analyses config, demo config) from `key=value` overrides; `demo.KEY=v` goes to the demo's."""
    demo_over = [o[len("demo."):] for o in overrides if o.startswith("demo.")]
    own = [o for o in overrides if not o.startswith("demo.")]
    try:
        cfg = load_yaml(path, own)
    except ConfigError as e:
        raise DemoError(str(e)) from None
    unknown = [a for a in cfg.run if a not in ANALYSES]
    if unknown:
        raise DemoError(f"run: unknown analyses {unknown}; known: {list(ANALYSES)}")
    for name in ("valid_fraction", "test_fraction"):
        if not 0 < cfg.eval[name] <= 1:
            raise DemoError(f"eval.{name} must lie in (0, 1], got {cfg.eval[name]}")
    for f in [*cfg.size.fractions, *(cfg.approx.fractions or []), cfg.keytype.train_fraction,
              cfg.domain.dstore_fraction]:
        if not 0 < f <= 1:
            raise DemoError(f"datastore and text fractions must lie in (0, 1], got {f}")
    if "beyond" in cfg.run:
        beyond_books(cfg)
    demo_path = Path(cfg.demo_config) if cfg.demo_config else demo_mod.DEFAULT_CONFIG
    return cfg, load_config(demo_over, demo_path), demo_over, demo_path


def beyond_books(cfg):
    """(the beyond LM's training books, the rest of the demo's), canonical titles, checked."""
    from .corpora.austen import BOOK_TITLES, canonical_title

    train = BOOK_TITLES[:4]  # the demo's training books (knnlm.demo builds the default corpus)
    try:
        part = [canonical_title(b) for b in cfg.beyond.train_books]
    except ValueError as e:
        raise DemoError(f"beyond.train_books: {e}") from None
    if not part or len(set(part)) != len(part) or not set(part) < set(train):
        raise DemoError(f"beyond.train_books must be some, not all, of the demo's training books "
                        f"{list(train)}, each once; got {list(cfg.beyond.train_books)}")
    return [b for b in train if b in part], [b for b in train if b not in part]


def _plain(x):
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) or OmegaConf.is_list(x) else x


def fkey(f):
    return f"{float(f):g}"


# --------------------------------------------------------------------------- text helpers


def n_tokens(lines):
    """Tokens fairseq scores for these lines: the words and one end-of-line each."""
    return sum(len(line.split()) + 1 for line in lines)


def head_lines(lines, fraction):
    """The leading `fraction` of `lines` (at least one)."""
    return lines[:max(1, math.ceil(fraction * len(lines)))] if fraction < 1 else list(lines)


def sample_chunks(lines, *, chunk_lines, seed, fraction=None, tokens=None):
    """A seeded random sample of chunks of `chunk_lines` consecutive lines, in their original
    order: `fraction` of the chunks, or (given `tokens`) random chunks until that many tokens."""
    chunks = [lines[i:i + chunk_lines] for i in range(0, len(lines), chunk_lines)]
    order = list(range(len(chunks)))
    random.Random(seed).shuffle(order)
    if tokens is None:
        if fraction >= 1:
            return list(lines)
        chosen = order[:max(1, round(fraction * len(chunks)))]
    else:
        chosen, total = [], 0
        for i in order:
            if total >= tokens:
                break
            chosen.append(i)
            total += n_tokens(chunks[i])
    return [line for i in sorted(chosen) for line in chunks[i]]


def write_lines(path, lines):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


# --------------------------------------------------------------------------- the analyses


class Analyses:
    """The plan of steps for the selected analyses; `run()` does them and writes results.md."""

    def __init__(self, cfg, dcfg, demo_overrides=(), demo_config=demo_mod.DEFAULT_CONFIG, overrides=()):
        self.cfg, self.dcfg = cfg, dcfg
        self.overrides = list(overrides)
        self.demo_overrides, self.demo_config = list(demo_overrides), demo_config
        self.demo = InProcessDemo(dcfg, self)
        self.out = self.demo.workdir / "analyses"
        self.steps_dir = self.out / ".steps"
        self.logs_dir = self.out / "logs"
        self.env = self.demo.env
        self.plan = {}   # name -> (Step, deps, analysis)
        self.records = {}
        self.keys = {}
        self.demo_key = ""
        self.n_steps = 0
        self.lambdas = demo_lambdas(dcfg)
        temps = dcfg.tune.temperatures
        temps = [float(t) for t in (temps if OmegaConf.is_list(temps) else str(temps).split(","))]
        self.temperatures = ",".join(f"{t:g}" for t in sorted(set(temps) | {float(dcfg.knn_temp)}))
        self.slice = cfg.eval.valid_fraction < 1
        self.eval_data = self.out / "eval-bin" if self.slice else self.demo.data
        self.domain = self.beyond = None

    # ---- running tools ----
    def log_path(self, name):
        return self.logs_dir / f"{name}.log"

    def tool(self, name, prog, *args, show=demo_mod.SHOW_ALL, env=None):
        return run_tool([*tool(prog), *args], self.log_path(name), show=show, env={**self.env, **(env or {})})

    def python(self, name, module, *args, show=demo_mod.SHOW_ALL):
        return run_tool([sys.executable, "-m", module, *args], self.log_path(name), show=show, env=self.env)

    def inprocess(self, name, prog, main, argv, log_path=None):
        """A console tool's main(argv) in this process (no interpreter start-up), output to the log."""
        argv = [str(a) for a in argv]
        log.info("$ %s %s", prog, shlex.join(argv))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(argv)
        log_path = log_path or self.log_path(name)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n$ {prog} {shlex.join(argv)}\n{buf.getvalue()}")
        if rc:
            raise DemoError(f"{prog} exited with status {rc}:\n{buf.getvalue()[-2000:]}\n"
                            f"full output: {log_path}")
        return buf.getvalue().splitlines()

    def eval_lm(self, name, data, ckpt, split, keytype, *args, dcfg=None):
        """fairseq-eval-lm with the demo's evaluation settings (as knnlm.demo's eval_lm); in this
        process unless eval.in_process is false."""
        c = dcfg or self.dcfg
        argv = [data, "--path", ckpt, "--user-dir", PLUGIN_DIR, "--task", "knnlm",
                "--gen-subset", split, "--tokens-per-sample", c.model.tokens_per_sample,
                "--context-window", c.context_window, "--max-tokens", c.eval_max_tokens,
                # "simple", not tqdm: no progress bars to untangle from the log lines we parse (the
                # plugin's kNN-LM summary is logged while tqdm's bar line is still open).
                "--knn-keytype", keytype, "--cpu", "--num-workers", 0, "--log-format", "simple", *args]
        if self.cfg.eval.in_process:
            return self.eval_lm_inprocess(name, argv)
        return self.tool(name, "fairseq-eval-lm", *argv, show=SHOW_EVAL)

    def eval_lm_inprocess(self, name, argv, show=SHOW_EVAL, log_path=None):
        """fairseq-eval-lm's own cli_main, run in this process: the same code and log lines as
        the tool, without its interpreter and fairseq start-up (~5 s of CPU, most of a small
        step). Its log records go to the step's log (those matching `show` to the console too);
        what it changes in the process (the plugin's scorer hook, excepthook, threads, the
        logging level) is put back afterwards."""
        import gc
        import re
        import traceback
        import warnings

        argv = [str(a) for a in argv]
        log_path = log_path or self.log_path(name)
        log.info("$ fairseq-eval-lm %s  (in this process)", shlex.join(argv))
        lines, show_re = [], re.compile(show)
        root = logging.getLogger()
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(f"\n$ fairseq-eval-lm {shlex.join(argv)}  (in this process)\n")
            capture = _CaptureHandler(out, lines, show_re)
            quiet = _OnlyOurs()
            consoles = list(root.handlers)
            for h in consoles:
                h.addFilter(quiet)
            if not consoles:  # else fairseq_cli.eval_lm's import-time basicConfig would add one for good
                root.addHandler(placeholder := logging.NullHandler())
            root.addHandler(capture)
            level, hook = root.level, sys.excepthook
            root.setLevel(min(level or logging.INFO, logging.INFO))
            threads = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import torch
                    from fairseq import distributed_utils, options
                    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
                    import fairseq_cli.eval_lm as fairseq_eval_lm

                    scorer = fairseq_eval_lm.SequenceScorer
                    if self.dcfg.threads:  # what OMP_NUM_THREADS does for the tool
                        threads = torch.get_num_threads()
                        torch.set_num_threads(int(self.dcfg.threads))
                    try:
                        args = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=argv)
                        distributed_utils.call_main(convert_namespace_to_omegaconf(args), fairseq_eval_lm.main)
                    finally:
                        fairseq_eval_lm.SequenceScorer = scorer  # the plugin's hook holds its task alive
            except (Exception, SystemExit) as e:
                if isinstance(e, SystemExit) and not e.code:
                    pass
                else:
                    out.write(traceback.format_exc())
                    tail = "\n".join(f"    {line}" for line in [*lines[-20:], f"{type(e).__name__}: {e}"])
                    raise DemoError(f"fairseq-eval-lm (in this process) failed; its last lines:\n{tail}\n"
                                    f"full output: {log_path}") from None
            finally:
                root.removeHandler(capture)
                if not consoles:
                    root.removeHandler(placeholder)
                for h in consoles:
                    h.removeFilter(quiet)
                root.setLevel(level)
                sys.excepthook = hook
                if threads:
                    torch.set_num_threads(threads)
                gc.collect()
        return lines

    def knn_args(self, dstore, index, sim_func=None, lmbda=None, temperature=None, search="faiss"):
        """The demo's kNN-LM flags; search="exact": exact search over every key, no index."""
        c = self.dcfg
        # (This order keeps the stamps of the steps made before search= existed.)
        search_args = (["--indexfile", index, "--k", c.k, "--probe", c.probe] if search == "faiss" else
                       ["--knn-search", "exact", "--knn-exact-dtype", self.cfg.approx.exact_dtype, "--k", c.k])
        return ["--knnlm", "--dstore-filename", dstore, *search_args,
                "--knn-sim-func", sim_func or c.sim_func,
                "--lmbda", c.lmbda if lmbda is None else lmbda,
                "--knn-temp", c.knn_temp if temperature is None else temperature,
                *(["--move-dstore-to-mem"] if c.move_dstore_to_mem else [])]

    def binarize(self, name, srcdict, dest, **splits):
        """Binarize tokenized text files with an existing dictionary into `dest` (split name ->
        text), as `fairseq-preprocess --only-source --srcdict` does (byte-identical output: the
        same Dictionary.encode_line and mmap builder), in this process: no tool start-up."""
        from fairseq.data import Dictionary, indexed_dataset

        dest = Path(dest)
        tmp = Path(f"{dest}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        d = Dictionary.load(str(srcdict))
        shutil.copyfile(srcdict, tmp / "dict.txt")
        with open(self.log_path(name), "a", encoding="utf-8") as out:
            for split, text in splits.items():
                builder = indexed_dataset.make_builder(str(tmp / f"{split}.bin"), impl="mmap", vocab_size=len(d))
                n_lines = n_tok = n_unk = 0
                with open(text, encoding="utf-8") as f:
                    for line in f:
                        ids = d.encode_line(line, add_if_not_exist=False, append_eos=True).long()
                        builder.add_item(ids)
                        n_lines += 1
                        n_tok += len(ids)
                        n_unk += int((ids == d.unk()).sum())
                builder.finalize(str(tmp / f"{split}.idx"))
                msg = (f"binarized {text} -> {dest / split}.bin: {n_lines:,} lines, {n_tok:,} tokens, "
                       f"{n_unk:,} <unk> (dictionary {srcdict}, {len(d):,} types)")
                out.write(msg + "\n")
                log.info("    %s", msg)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)

    # ---- the plan ----
    def add(self, analysis, name, title, outputs, settings, action, deps=(), scratch=()):
        if name not in self.plan:
            step = Step(name, title, [Path(p) for p in outputs], _plain_tree(settings), action,
                        scratch=[Path(p) for p in scratch])
            self.plan[name] = (step, list(deps), analysis)
        return name

    def tuned(self):
        """The demo's tuned lambda and temperature (its knnlm-tune best.json)."""
        best = json.loads(self.demo.best.read_text())
        return float(best["best_lambda"]), float(best["best_temperature"])

    def step_index(self, analysis, prefix, dstore, deps, shards=None):
        """knnlm-build-index on `dstore` with the demo's index settings; given `shards`
        (datastore prefixes), `dstore` names their combination: its manifest is written and one
        index covers them all (the sharded build: inverted lists merged into INDEX.ivfdata)."""
        i = self.dcfg.index
        index = Path(f"{dstore}_knn.index")
        settings = [f"dstore_mmap={dstore}", f"faiss_index={index}", f"ncentroids={i.ncentroids}",
                    f"code_size={i.code_size}", f"probe={self.dcfg.probe}",
                    f"num_keys_to_train={i.num_keys_to_train}", f"seed={i.seed}",
                    *([f"shards=[{','.join(map(str, shards))}]", "overwrite=true"] if shards else []),
                    *([f"threads={self.dcfg.threads}"] if self.dcfg.threads else []), *i.extra_args]
        name = f"{prefix}_index"
        def action():
            self.tool(name, "knnlm-build-index", *settings)

        extra = [f"{index}.ivfdata", f"{dstore}_shards.json"] if shards else []
        self.add(analysis, name, f"index {Path(dstore).name}", [index, f"{index}.meta.json", *extra],
                 {"args": settings}, action,
                 deps=deps, scratch=[index, f"{index}.meta.json", f"{index}.trained", f"{index}.partial",
                                     f"{index}.progress.json", *extra,
                                     *(index.parent.glob(f"{index.name}.shard*") if shards else [])])
        return name, index

    def step_dump(self, analysis, name, data, ckpt, prefix, keytype, deps, dcfg=None):
        def action():
            Path(prefix).parent.mkdir(parents=True, exist_ok=True)
            self.eval_lm(name, data, ckpt, "train", keytype, "--save-knnlm-dstore", "--dstore-mmap", prefix,
                         *(["--dstore-fp16"] if (dcfg or self.dcfg).datastore.fp16 else []), "--overwrite",
                         dcfg=dcfg)
            meta = json.loads(Path(f"{prefix}_meta.json").read_text())
            log.info("    datastore %s: %s keys of dimension %d", Path(prefix).name, f"{meta['size']:,}", meta["dim"])
            return {"size": meta["size"], "dim": meta["dim"]}

        return self.add(analysis, name, f"dump {keytype} keys to {Path(prefix).name}",
                        [f"{prefix}_meta.json", f"{prefix}_keys.npy"],
                        {"data": data, "ckpt": ckpt, "keytype": keytype},
                        action, deps=deps,
                        scratch=[f"{prefix}_{x}" for x in ("keys.npy", "vals.npy", "meta.json")])

    def step_export(self, analysis, name, data, ckpt, split, dstore, index, keytype, deps,
                    sim_func=None, dcfg=None, search="faiss"):
        """A per-token export (--knnlm-dump-probs) at the demo's k, lambda and T."""
        path = self.out / "exports" / name
        c = dcfg or self.dcfg
        args = self.knn_args(dstore, index, sim_func, search=search)

        def action():
            path.parent.mkdir(parents=True, exist_ok=True)
            lines = self.eval_lm(name, data, ckpt, split, keytype, *args, "--knnlm-dump-probs", path,
                                 "--overwrite", dcfg=dcfg)
            return parse_summary(lines, name)

        self.add(analysis, name, f"export {name}", [path / "meta.json"],
                 {"data": data, "ckpt": ckpt, "split": split, "keytype": keytype, "args": args,
                  "eval": [c.model.tokens_per_sample, c.context_window, c.eval_max_tokens]},
                 action, deps=deps, scratch=[path])
        return name, path

    def step_tune(self, analysis, name, export, deps, plot=None):
        """knnlm-tune over the demo's lambda and temperature grids."""
        from ..offline.tune import main as tune_main

        json_path = self.out / "tune" / f"{name}.json"
        argv = [export, "--lambdas", self.lambdas, "--temperatures", self.temperatures, "--json", json_path,
                *(["--plot", plot] if plot else [])]

        def action():
            json_path.parent.mkdir(parents=True, exist_ok=True)
            self.inprocess(name, "knnlm-tune", tune_main, argv)
            r = json.loads(json_path.read_text())
            log.info("    %s: base %.2f, best %.2f at lambda %g, T %g", name, r["base_ppl"], r["best_ppl"],
                     r["best_lambda"], r["best_temperature"])
            return {k: r[k] for k in ("base_ppl", "best_ppl", "best_lambda", "best_temperature")}

        self.add(analysis, name, f"knnlm-tune {Path(export).name}", [json_path, *([plot] if plot else [])],
                 {"argv": argv}, action, deps=deps, scratch=[json_path])
        return name, json_path

    # ---- shared: the valid slice and the full datastore's export on it ----
    def eval_set(self):
        """(step names, data dir) of the evaluation set of analyses 3-7."""
        if not self.slice:
            return [], self.demo.data
        dest = self.eval_data
        frac = self.cfg.eval.valid_fraction

        def action():
            lines = head_lines(read_lines(self.demo.path("corpus", "valid.txt")), frac)
            text = self.out / "eval-text" / "valid.txt"
            write_lines(text, lines)
            self.binarize("eval_slice", self.demo.data / "dict.txt", dest, valid=text)
            return {"lines": len(lines), "tokens": n_tokens(lines)}

        name = self.add("shared", "eval_slice", f"the first {frac:g} of the valid book",
                        [dest / "valid.bin", dest / "valid.idx"], {"fraction": frac}, action,
                        scratch=[dest, self.out / "eval-text"])
        return [name], dest

    def full_export(self):
        """(step names, export dir) of the demo's datastore at the demo's settings on the eval set."""
        deps, data = self.eval_set()
        if not self.slice:
            return [], self.demo.export
        name, path = self.step_export("shared", "export_full_l2", data, self.demo.checkpoint, "valid",
                                      self.demo.dstore, self.demo.index, self.dcfg.datastore.keytype, deps,
                                      sim_func=self.dcfg.sim_func)
        return [name], path

    def subset(self, f, analysis):
        """(step names, export) of datastore fraction f (1: the demo's own) on the eval set."""
        if float(f) >= 1:
            return self.full_export()
        deps, data = self.eval_set()
        prefix = self.out / "size" / f"dstore_f{fkey(f)}"
        from ..store.subset import main as subset_main

        argv = [self.demo.dstore, float(f), prefix, "--seed", self.cfg.size.seed, "--overwrite"]
        sub = f"size_subset_{fkey(f)}"

        def make():
            prefix.parent.mkdir(parents=True, exist_ok=True)
            self.inprocess(sub, "python -m knnlm.subset", subset_main, argv)
            return {"size": json.loads(Path(f"{prefix}_meta.json").read_text())["size"]}

        self.add(analysis, sub, f"datastore fraction {fkey(f)}", [f"{prefix}_meta.json", f"{prefix}_keys.npy"],
                 {"argv": argv}, make,
                 scratch=[f"{prefix}_{x}" for x in ("keys.npy", "vals.npy", "meta.json", "source_rows.npy")])
        idx, index = self.step_index(analysis, f"size_{fkey(f)}", prefix, [sub])
        exp, path = self.step_export(analysis, f"size_export_{fkey(f)}", data, self.demo.checkpoint, "valid",
                                     prefix, index, self.dcfg.datastore.keytype, [idx, *deps])
        return [exp], path

    # ---- 1. k ----
    def plan_k(self):
        from ..offline.sweeps import main as sweeps_main

        ks = [k for k in self.cfg.k_sweep.ks if k <= self.dcfg.k] or [self.dcfg.k]
        js, png = self.out / "k_sweep.json", self.out / "fig4_k.png"

        def action():
            lam, t = self.tuned()
            self.inprocess("k_sweep", "python -m knnlm.sweeps", sweeps_main,
                           ["k", self.demo.export, "--ks", ",".join(map(str, ks)), "--lmbda", lam,
                            "--knn-temp", t, "--tune-lambda", "--lambdas", self.lambdas,
                            "--plot", png, "--json", js])

        self.add("k", "k_sweep", "perplexity vs k", [js, png], {"ks": list(ks), "lambdas": self.lambdas}, action)

    # ---- 2. lambda and T ----
    def plan_lambda(self):
        self.step_tune("lambda", "lambda_temperature", self.demo.export, [],
                       plot=self.out / "fig5_lambda_temperature.png")

    # ---- 3. datastore size ----
    def plan_size(self):
        from ..offline.sweeps import main as sweeps_main

        deps, exports = [], []
        for f in sorted({float(f) for f in self.cfg.size.fractions}):
            d, path = self.subset(f, "size")
            deps += d
            exports.append(path)
        js, png = self.out / "size_sweep.json", self.out / "fig2_datastore_size.png"

        def action():
            lam, t = self.tuned()
            self.inprocess("size_sweep", "python -m knnlm.sweeps", sweeps_main,
                           ["sizes", *exports, "--lmbda", lam, "--knn-temp", t, "--lambdas", self.lambdas,
                            "--plot", png, "--json", js])

        self.add("size", "size_sweep", "perplexity vs datastore size", [js, png],
                 {"exports": exports, "lambdas": self.lambdas}, action, deps=deps)

    # ---- 4. key types ----
    def plan_keytype(self):
        kc = self.cfg.keytype
        eval_deps, data = self.eval_set()
        kdir = self.out / "keytype"
        bin_dir = kdir / "data-bin"

        def sample():
            lines = sample_chunks(read_lines(self.demo.path("corpus", "train.txt")), chunk_lines=kc.chunk_lines,
                                  seed=kc.seed, fraction=kc.train_fraction)
            text = kdir / "text" / "train.txt"
            write_lines(text, lines)
            self.binarize("keytype_text", self.demo.data / "dict.txt", bin_dir, train=text)
            return {"lines": len(lines), "tokens": n_tokens(lines)}

        whole = kc.train_fraction >= 1
        if whole:  # the demo's own training split; its datastore serves its key type
            bin_dir, text_deps = self.demo.data, []
        else:
            text_deps = [self.add("keytype", "keytype_text", f"{kc.train_fraction:g} of the training text",
                                  [bin_dir / "train.bin", bin_dir / "train.idx"],
                                  {"fraction": kc.train_fraction, "chunk_lines": kc.chunk_lines, "seed": kc.seed},
                                  sample, scratch=[bin_dir, kdir / "text"])]
        for kt in kc.types:
            if whole and kt == self.dcfg.datastore.keytype:
                deps, path = self.full_export()
                self.step_tune("keytype", f"keytype_tune_{kt}", path, deps)
                continue
            prefix = kdir / f"dstore_{kt}"
            dump = self.step_dump("keytype", f"keytype_dump_{kt}", bin_dir, self.demo.checkpoint, prefix, kt,
                                  text_deps)
            idx, index = self.step_index("keytype", f"keytype_{kt}", prefix, [dump])
            exp, path = self.step_export("keytype", f"keytype_export_{kt}", data, self.demo.checkpoint, "valid",
                                         prefix, index, kt, [idx, *eval_deps])
            self.step_tune("keytype", f"keytype_tune_{kt}", path, [exp])

    # ---- 5. exact vs approximate neighbors and scores ----
    def approx_fractions(self):
        fr = self.cfg.approx.fractions
        return sorted({float(f) for f in (self.cfg.size.fractions if fr is None else fr)}, reverse=True)

    def tune_l2(self, f, analysis):
        """(tune step, json) of datastore fraction f scored as the demo scores (FAISS's neighbors,
        exact L2): the size analysis' export (f = 1: the shared full-datastore export)."""
        deps, path = self.subset(f, analysis)
        if f >= 1:
            return self.step_tune("shared", "tune_full_l2", path, deps)
        return self.step_tune(analysis, f"approx_tune_l2_f{fkey(f)}", path, deps)

    def plan_approx(self):
        eval_deps, data = self.eval_set()
        for f in self.approx_fractions():
            self.tune_l2(f, "approx")
            if f >= 1:
                dstore, index, sub, idx = self.demo.dstore, self.demo.index, [], []
            else:
                self.subset(f, "approx")
                dstore = self.out / "size" / f"dstore_f{fkey(f)}"
                index, sub, idx = Path(f"{dstore}_knn.index"), [f"size_subset_{fkey(f)}"], [f"size_{fkey(f)}_index"]
            for way in ("faiss", "exact"):
                _, search, sim_func = APPROX[way]
                exp, path = self.step_export(
                    "approx", f"approx_export_{way}_f{fkey(f)}", data, self.demo.checkpoint, "valid", dstore,
                    index, self.dcfg.datastore.keytype, [*(idx if search == "faiss" else sub), *eval_deps],
                    sim_func=sim_func, search=search)
                self.step_tune("approx", f"approx_tune_{way}_f{fkey(f)}", path, [exp])

    def approx_tune_name(self, way, f):
        if way == "l2":
            return "tune_full_l2" if f >= 1 else f"approx_tune_l2_f{fkey(f)}"
        return f"approx_tune_{way}_f{fkey(f)}"

    # ---- 6. domain adaptation ----
    def plan_domain(self):
        dc = self.cfg.domain
        dcfg = load_config([*self.demo_overrides, *dc.demo_overrides, f"workdir={self.out / 'domain'}"],
                           self.demo_config)
        dom = self.domain = InProcessDemo(dcfg, self)
        ddir = dom.workdir
        corpus = ddir / "corpus"
        seen = bool(dc.seen_datastore)
        stores = ["unseen", *(["seen"] if seen else [])]
        eval_frac, test_frac = self.cfg.eval.valid_fraction, self.cfg.eval.test_fraction

        def make_corpus():
            from .corpora.austen import build_austen_corpus

            source = Path(dcfg.austen_dir).expanduser().resolve() if dcfg.austen_dir else None
            stats = build_austen_corpus(ddir / "corpus-full", data_dir=source, train_books=list(dc.train_books),
                                        valid_book=dc.valid_book, test_book=dc.test_book,
                                        min_count=dcfg.min_count, extra={"dstore": list(dc.dstore_books)})
            full = {s: read_lines(ddir / "corpus-full" / f"{s}.txt") for s in ("train", "valid", "test", "dstore")}
            unseen = sample_chunks(full["dstore"], chunk_lines=dc.chunk_lines, seed=dc.seed,
                                   fraction=dc.dstore_fraction)
            texts = {"train": full["train"], "valid": head_lines(full["valid"], eval_frac),
                     "test": head_lines(full["test"], test_frac), "unseen": unseen}
            if seen:
                texts["seen"] = sample_chunks(full["train"], chunk_lines=dc.chunk_lines, seed=dc.seed,
                                              tokens=n_tokens(unseen))
            for s, lines in texts.items():
                write_lines(corpus / f"{s}.txt", lines)
            dom.logs_dir.mkdir(parents=True, exist_ok=True)
            dom.make_binarized()  # the demo's own step: train/valid/test -> data-bin, its dictionary
            for s in stores:
                self.binarize("domain_corpus", dom.data / "dict.txt", ddir / f"bin-{s}", train=corpus / f"{s}.txt")
            return {"books": stats["books"], "vocab_size": stats["vocab_size"],
                    "tokens": {s: n_tokens(lines) for s, lines in texts.items()}}

        outputs = [dom.data / "dict.txt", dom.data / "train.bin", *[ddir / f"bin-{s}" / "train.bin" for s in stores]]
        corpus_step = self.add(
            "domain", "domain_corpus", "domain corpus (3 books; datastore book; slices)", outputs,
            {"books": {k: _plain(v) for k, v in dc.items() if k != "demo_overrides"},
             "min_count": dcfg.min_count, "austen_dir": dcfg.austen_dir,
             "fractions": [eval_frac, test_frac]},
            make_corpus, scratch=[corpus, ddir / "corpus-full", dom.data, ddir / "data-bin.tmp",
                                  *[ddir / f"bin-{s}" for s in ("unseen", "seen")]])

        def train():
            dom.logs_dir.mkdir(parents=True, exist_ok=True)
            return dom.make_lm()  # the demo's training step with the domain settings

        train_step = self.add("domain", "domain_train", "fairseq-train the 3-book LM", [dom.checkpoint],
                              {"model": _plain(dcfg.model), "train": _plain(dcfg.train)}, train,
                              deps=[corpus_step], scratch=[dom.checkpoint.parent])
        kt = dcfg.datastore.keytype
        tunes = {}
        for s in stores:
            prefix = ddir / "dstore" / s
            dump = self.step_dump("domain", f"domain_dump_{s}", ddir / f"bin-{s}", dom.checkpoint, prefix, kt,
                                  [train_step], dcfg=dcfg)
            idx, index = self.step_index("domain", f"domain_{s}", prefix, [dump])
            exp, path = self.step_export("domain", f"domain_export_{s}", dom.data, dom.checkpoint, "valid",
                                         prefix, index, kt, [idx], dcfg=dcfg)
            tunes[s] = self.step_tune("domain", f"domain_tune_{s}", path, [exp])

        tune_name, tune_json = tunes["unseen"]
        prefix = ddir / "dstore" / "unseen"
        test_json = self.out / "domain_test.json"

        def score_test():
            best = json.loads(tune_json.read_text())
            lines = self.eval_lm("domain_test", dom.data, dom.checkpoint, "test", kt,
                                 *self.knn_args(prefix, f"{prefix}_knn.index", lmbda=best["best_lambda"],
                                                temperature=best["best_temperature"]), dcfg=dcfg)
            result = {**parse_summary(lines, "domain test"), "lmbda": best["best_lambda"],
                      "temperature": best["best_temperature"]}
            test_json.write_text(json.dumps(result, indent=2) + "\n")
            return result

        self.add("domain", "domain_test", "score the test book with the tuned lambda and T", [test_json], {},
                 score_test, deps=[tune_name, f"domain_unseen_index"])

    # ---- 7. a datastore beyond the training data ----
    def plan_beyond(self):
        bc = self.cfg.beyond
        own_books, rest_books = beyond_books(self.cfg)
        dcfg = load_config([*self.demo_overrides, *bc.demo_overrides, f"workdir={self.out / 'beyond'}"],
                           self.demo_config)
        lm = self.beyond = InProcessDemo(dcfg, self)
        bdir, kt = lm.workdir, dcfg.datastore.keytype
        text = bdir / "text"
        eval_deps, valid_data = self.eval_set()
        test_frac = self.cfg.eval.test_fraction

        def make_corpus():
            from .corpora.austen import build_austen_corpus

            source = Path(dcfg.austen_dir).expanduser().resolve() if dcfg.austen_dir else None
            # The demo's corpus (so the demo's vocabulary), with each part of its training text apart.
            build_austen_corpus(bdir / "corpus", data_dir=source, min_count=dcfg.min_count,
                                train_books=[*own_books, *rest_books], extra={"own": own_books, "rest": rest_books})
            parts = {s: read_lines(bdir / "corpus" / f"{s}.txt") for s in ("own", "rest")}
            demo_train = read_lines(self.demo.path("corpus", "train.txt"))
            if n_tokens(parts["own"]) + n_tokens(parts["rest"]) != n_tokens(demo_train):
                raise DemoError(f"the books {own_books} + {rest_books} do not make the demo's training text "
                                f"{self.demo.path('corpus', 'train.txt')} (was the demo's corpus built otherwise?)")
            parts["test"] = head_lines(read_lines(self.demo.path("corpus", "test.txt")), test_frac)
            for s, lines in parts.items():
                write_lines(text / f"{s}.txt", lines)
            lm.logs_dir.mkdir(parents=True, exist_ok=True)
            # The demo's dictionary: every perplexity below is over the same vocabulary.
            self.binarize("beyond_corpus", self.demo.data / "dict.txt", lm.data, train=text / "own.txt",
                          test=text / "test.txt")
            self.binarize("beyond_corpus", self.demo.data / "dict.txt", bdir / "bin-rest", train=text / "rest.txt")
            return {"books": {"own": own_books, "rest": rest_books},
                    "tokens": {s: n_tokens(lines) for s, lines in parts.items()}}

        corpus_step = self.add(
            "beyond", "beyond_corpus", f"the text of {', '.join(own_books)}; the rest; the test slice",
            [lm.data / "train.bin", lm.data / "test.bin", bdir / "bin-rest" / "train.bin"],
            {"books": [own_books, rest_books], "min_count": dcfg.min_count, "austen_dir": dcfg.austen_dir,
             "test_fraction": test_frac},
            make_corpus, deps=[], scratch=[bdir / "corpus", text, lm.data, bdir / "bin-rest"])

        def train():
            lm.logs_dir.mkdir(parents=True, exist_ok=True)
            return lm.make_lm()  # the demo's training step on its data-bin: the part's text

        train_step = self.add("beyond", "beyond_train", f"fairseq-train the LM of {len(own_books)} books",
                              [lm.checkpoint], {"model": _plain(dcfg.model), "train": _plain(dcfg.train)}, train,
                              deps=[corpus_step], scratch=[lm.checkpoint.parent])
        own, rest, both = (bdir / "dstore" / s for s in ("own", "rest", "all"))
        dump_own = self.step_dump("beyond", "beyond_dump_own", lm.data, lm.checkpoint, own, kt, [train_step],
                                  dcfg=dcfg)
        dump_rest = self.step_dump("beyond", "beyond_dump_rest", bdir / "bin-rest", lm.checkpoint, rest, kt,
                                   [train_step], dcfg=dcfg)
        tunes = {}
        for row, dstore, deps, shards in (("b", own, [dump_own], None), ("c", both, [dump_own, dump_rest], [own, rest])):
            idx, index = self.step_index("beyond", f"beyond_{dstore.name}", dstore, deps, shards=shards)
            exp, path = self.step_export("beyond", f"beyond_export_{dstore.name}", valid_data, lm.checkpoint, "valid",
                                         dstore, index, kt, [idx, *eval_deps], dcfg=dcfg)
            tunes[row] = (*self.step_tune("beyond", f"beyond_tune_{dstore.name}", path, [exp]), dstore, index,
                          lm.checkpoint, dcfg, [idx])
        tunes["e"] = (*self.tune_l2(1.0, "beyond"), self.demo.dstore, self.demo.index, self.demo.checkpoint, None, [])
        for row, (tune_name, tune_json, dstore, index, ckpt, c, deps) in tunes.items():
            self.step_beyond_test(row, lm.data, ckpt, dstore, index, tune_name, tune_json, [corpus_step, *deps], c)

    def step_beyond_test(self, row, data, ckpt, dstore, index, tune_name, tune_json, deps, dcfg):
        """Row `row`'s LM and datastore on the test slice at the lambda and T tuned on valid."""
        path = self.out / "beyond" / "scores" / f"test_{row}.json"
        name = f"beyond_test_{row}"

        def action():
            best = json.loads(Path(tune_json).read_text())
            lines = self.eval_lm(name, data, ckpt, "test", (dcfg or self.dcfg).datastore.keytype,
                                 *self.knn_args(dstore, index, lmbda=best["best_lambda"],
                                                temperature=best["best_temperature"]), dcfg=dcfg)
            result = {**parse_summary(lines, name), "lmbda": best["best_lambda"],
                      "temperature": best["best_temperature"]}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            return result

        self.add("beyond", name, f"score the test slice: row ({row}) with its tuned lambda and T", [path],
                 {"ckpt": ckpt, "dstore": dstore}, action, deps=[tune_name, *deps])
        return name, path

    # ---- running ----
    def run_demo(self):
        """The demo's steps up to its tuning (its scoring of valid and test is not needed here),
        chained exactly as knnlm.demo chains them: done steps are skipped, and a later `make
        demo` skips the steps made here."""
        d = self.demo
        for path in (d.workdir, d.steps_dir, d.logs_dir):
            path.mkdir(parents=True, exist_ok=True)
        log.info("the demo's steps up to %s first (skipped when done)", DEMO_LAST_STEP)
        steps = d.steps()
        names = [s.name for s in steps]
        last = names.index(DEMO_LAST_STEP) if DEMO_LAST_STEP in names else len(steps) - 1
        results, key = {}, ""
        for number, step in enumerate(steps[:last + 1], 1):
            results[step.name] = record = step.run(d, number, key)
            key = record["key"]
        self.demo_key = key
        return results

    def build_plan(self):
        for analysis in self.cfg.run:
            getattr(self, f"plan_{analysis}")()
        self.n_steps = len(self.plan)

    def needs(self, analysis):
        """Every step the analysis' tables read: its own and those they build on."""
        todo = [n for n, (_, _, a) in self.plan.items() if a == analysis]
        seen = set()
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo += self.plan[n][1]
        return seen

    def run(self):
        t0 = time.time()
        demo_results = self.run_demo()
        for d in (self.out, self.steps_dir, self.logs_dir):
            d.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg))
        (self.out / "demo_config.yaml").write_text(OmegaConf.to_yaml(self.dcfg))
        self.build_plan()
        log.info("analyses %s: %d steps, outputs in %s", ", ".join(self.cfg.run), self.n_steps, self.out)
        needs = {a: self.needs(a) for a in self.cfg.run}
        reported = set()
        report = None
        for number, (name, (step, deps, _)) in enumerate(self.plan.items(), 1):
            upstream = _digest({"demo": self.demo_key, "deps": {d: self.keys[d] for d in deps}})
            self.records[name] = record = step.run(self, number, upstream)
            self.keys[name] = record["key"]
            done = {a for a, n in needs.items() if n <= set(self.records)}
            if done - reported and number < self.n_steps:
                # Tables of the analyses finished so far, in case a later one is interrupted.
                reported = done
                self.write_report(Report(self, demo_results, time.time() - t0, done), final=False)
        report = Report(self, demo_results, time.time() - t0, set(self.cfg.run))
        self.write_report(report, final=True)
        return report

    def write_report(self, report, final):
        text = report.markdown()
        (self.out / "results.md").write_text(text)
        (self.out / "results.json").write_text(json.dumps(report.data, indent=2, default=str) + "\n")
        if final:
            print("\n" + text)
        log.info("wrote %s%s", self.out / "results.md",
                 "" if final else f" (so far: {', '.join(sorted(report.done, key=ANALYSES.index))})")


class InProcessDemo(Demo):
    """knnlm.demo's steps, their fairseq-eval-lm and knnlm-tune runs (the demo's datastore, export
    and tuning) in the analyses' process when eval.in_process: the same argv and log, no tool
    start-up. Training and fairseq-preprocess stay separate processes."""

    def __init__(self, cfg, analyses):
        self.analyses = analyses
        super().__init__(cfg)

    def tool(self, step, name, *args, show=demo_mod.SHOW_ALL):
        if name == "fairseq-eval-lm" and self.analyses.cfg.eval.in_process:
            return self.analyses.eval_lm_inprocess(step, args, show=show, log_path=self.logs_dir / f"{step}.log")
        if name == "knnlm-tune" and self.analyses.cfg.eval.in_process:
            from ..offline.tune import main as tune_main

            return self.analyses.inprocess(step, name, tune_main, args, log_path=self.logs_dir / f"{step}.log")
        return super().tool(step, name, *args, show=show)


class _CaptureHandler(logging.Handler):
    """fairseq-eval-lm's log records, formatted as the tool prints them, into its step's log and
    `lines`; those matching `show` also to the console."""

    def __init__(self, out, lines, show_re):
        super().__init__(logging.INFO)
        self.out, self.lines, self.show_re = out, lines, show_re
        self.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                                            datefmt="%Y-%m-%d %H:%M:%S"))

    def emit(self, record):
        line = self.format(record)
        self.lines.append(line)
        self.out.write(line + "\n")
        if self.show_re.search(line):
            print(f"    {line[:200]}", flush=True)


class _OnlyOurs(logging.Filter):
    """Keeps the console to this module's and the demo's records while fairseq runs in-process."""

    def filter(self, record):
        return record.name.startswith(("knnlm.analyses", "knnlm.demo"))


def demo_lambdas(dcfg):
    """The demo's lambda grid: tune.lambda_step (0..1) or tune.lambdas (a knnlm-tune grid)."""
    t = dcfg.tune
    if "lambda_step" in t:
        return f"0:1:{t.lambda_step}"
    if "lambdas" in t:
        return str(t.lambdas)
    return "0:1:0.01"


def _plain_tree(x):
    if isinstance(x, dict):
        return {k: _plain_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain_tree(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return _plain(x)


# --------------------------------------------------------------------------- results


def _f(x, digits=2):
    return "inf" if x is None or (isinstance(x, float) and math.isinf(x)) else f"{x:.{digits}f}"


def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _curve(tune_json, temperature):
    """(lambdas, ppl) of a knnlm-tune JSON at the grid temperature closest to `temperature`."""
    ts = tune_json["temperatures"]
    i = min(range(len(ts)), key=lambda j: abs(math.log(ts[j] / temperature)))
    return tune_json["lambdas"], [math.inf if p is None else p for p in tune_json["ppl"][i]], ts[i]


def _at(tune_json, temperature, lmbda):
    lambdas, ppl, _ = _curve(tune_json, temperature)
    j = min(range(len(lambdas)), key=lambda i: abs(lambdas[i] - lmbda))
    return ppl[j]


def _gap(rows, col):
    """How much of the gap from row (a) to row (d) row (c) closes, as a percentage."""
    a, c, d = rows["a"][col], rows["c"][col], rows["d"][col]
    return "-" if a == d else f"{(a - c) / (a - d):.0%}"


def _best_at(tune_json, temperature):
    lambdas, ppl, t = _curve(tune_json, temperature)
    j = min(range(len(ppl)), key=lambda i: ppl[i])
    return lambdas[j], ppl[j], t


class Report:
    """results.md and results.json from the steps' outputs."""

    def __init__(self, an: Analyses, demo_results, total, done):
        self.an, self.demo_results, self.total, self.done = an, demo_results, total, done
        self.data = {"wall_seconds_this_run": round(total, 1), "analyses": sorted(done, key=ANALYSES.index)}

    def read(self, path):
        return json.loads(Path(path).read_text())

    def tune_json(self, name):
        return self.read(self.an.out / "tune" / f"{name}.json")

    def info(self, name):
        return self.an.records[name]["info"]

    def markdown(self):
        an, dc = self.an, self.an.dcfg
        lam, t = an.tuned()
        info = {n: r["info"] for n, r in self.demo_results.items()}
        m = dc.model
        ds = info.get("datastore", {})
        from ..errors import KNNLMError
        from ..offline.export import load_export

        export_tokens = None
        try:
            export_tokens = load_export(str(an.demo.export)).count
        except KNNLMError:  # the demo's export missing or incomplete: the line is left out
            pass
        out = [
            "# kNN-LM analyses on Jane Austen",
            "",
            f"Everything below reuses the demo's ({an.demo.workdir}) LM ({m.layers}-layer, {m.embed_dim}-wide "
            f"transformer, "
            f"{dc.train.max_update} updates of {dc.train.max_tokens} tokens), its datastore of the training "
            f"split ({ds.get('size', '?'):,} keys, {dc.datastore.keytype}) and its index "
            f"(IVF{dc.index.ncentroids},PQ{dc.index.code_size}, probe {dc.probe}); k = {dc.k}, distances "
            f"{dc.sim_func}, context window {dc.context_window}. The demo's knnlm-tune on its valid "
            f"export chose lambda = {lam:g}, T = {t:g}. Grids: lambda {an.lambdas}, T {an.temperatures}.",
            "",
            "Settings: configs/demo/analyses.yaml and the demo's config"
            + (f", with `{' '.join(an.overrides)}`" if an.overrides else "")
            + " (resolved: analyses/config.yaml, analyses/demo_config.yaml).",
            "",
        ]
        if export_tokens:
            out.append(f"Analyses 1 and 2 use the demo's valid export ({export_tokens:,} tokens, the whole valid book).")
        if an.slice:
            rec = an.records.get("eval_slice")
            if rec:
                out.append(f"Analyses 3-7 score the first {an.cfg.eval.valid_fraction:g} of the valid book "
                           f"({rec['info']['tokens']:,} tokens) to fit the time budget.")
        else:
            out.append("Analyses 3-7 score the whole valid book.")
        out.append("")
        pending = [a for a in an.cfg.run if a not in self.done]
        if pending:
            out += [f"**Partial results: the run is still going or was interrupted; not done yet: "
                    f"{', '.join(TITLES[a] for a in pending)}.**", ""]
        for a in sorted(self.done, key=ANALYSES.index):
            out += getattr(self, f"section_{a}")()
            out.append("")
        out += self.section_times()
        return "\n".join(out)

    # ---- 1 ----
    def section_k(self):
        r = self.read(self.an.out / "k_sweep.json")
        self.data["k"] = r
        out = [f"## {TITLES['k']}", "",
               f"From one export at k = {r['run_k']} ({r['count']:,} valid tokens): the first k' neighbors of "
               f"each token are what a run with --k k' retrieves. T = {r['temperature']:g} (the demo's tuned "
               f"value) throughout; lambda fixed at the demo's tuned {r['lmbda']:g}, and tuned per k "
               f"(grid {self.an.lambdas}). Base LM: {_f(r['base_ppl'])}. Plot: fig4_k.png.", "",
               _row(["k", f"ppl (lambda = {r['lmbda']:g})", "best lambda", "ppl (best lambda)",
                     "tokens without their target"]), "|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            out.append(_row([row["k"], _f(row["ppl"]), f"{row['best_lambda']:g}", _f(row["best_ppl"]),
                             f"{row['tokens_without_target']:,}"]))
        return out

    # ---- 2 ----
    def section_lambda(self):
        r = self.tune_json("lambda_temperature")
        self.data["lambda"] = {k: r[k] for k in ("base_ppl", "best_ppl", "best_lambda", "best_temperature",
                                                  "count", "lambdas", "temperatures", "ppl")}
        cols = [x for x in TABLE_LAMBDAS]
        out = [f"## {TITLES['lambda']}", "",
               f"knnlm-tune on the demo's valid export ({r['count']:,} tokens, k = {r['k']}): perplexity by "
               f"temperature (rows) and lambda (columns); lambda = 0 is the base LM. Best: lambda = "
               f"{r['best_lambda']:g}, T = {r['best_temperature']:g}, ppl {_f(r['best_ppl'])} "
               f"(base {_f(r['base_ppl'])}). Plot: fig5_lambda_temperature.png.", "",
               _row(["T", *[f"lambda {x:g}" for x in cols], "best lambda", "ppl"]),
               "|" + "---:|" * (len(cols) + 3)]
        for i, temp in enumerate(r["temperatures"]):
            ppl = [math.inf if p is None else p for p in r["ppl"][i]]
            cells = [_f(_at(r, temp, x)) for x in cols]
            j = min(range(len(ppl)), key=lambda q: ppl[q])
            out.append(_row([f"{temp:g}", *cells, f"{r['lambdas'][j]:g}", _f(ppl[j])]))
        return out

    # ---- 3 ----
    def section_size(self):
        r = self.read(self.an.out / "size_sweep.json")
        self.data["size"] = r
        full = json.loads(Path(f"{self.an.demo.dstore}_meta.json").read_text())["size"]
        rows = r["rows"]
        out = [f"## {TITLES['size']}", "",
               f"Seeded random fractions of the demo's datastore (knnlm.subset, seed {self.an.cfg.size.seed}), "
               f"each with its own index (same settings), exported on the same {rows[0]['count']:,} valid "
               f"tokens at k = {rows[0]['k']}. T = {rows[0]['temperature']:g} (the demo's tuned value); "
               f"lambda fixed at {rows[0]['lmbda']:g} and tuned per size (Figure 2b). Plot: "
               f"fig2_datastore_size.png.", "",
               _row(["fraction", "entries", f"ppl (lambda = {rows[0]['lmbda']:g})", "best lambda",
                     "ppl (best lambda)", "base LM"]), "|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            out.append(_row([f"{row['size'] / full:.3g}", f"{row['size']:,}", _f(row["ppl"]),
                             f"{row['best_lambda']:g}", _f(row["best_ppl"]), _f(row["base_ppl"])]))
        return out

    # ---- 4 ----
    def section_keytype(self):
        an, kc = self.an, self.an.cfg.keytype
        t_run = float(an.dcfg.knn_temp)
        demo_size = json.loads(Path(f"{an.demo.dstore}_meta.json").read_text())["size"]
        if "keytype_text" in an.records:
            text = (f"the same seeded random {kc.train_fraction:g} of the training text "
                    f"({self.info('keytype_text')['tokens']:,} tokens, chunks of {kc.chunk_lines} paragraphs: a "
                    f"dump is a forward pass, six full ones would not fit the time budget)")
        else:
            text = f"the whole training split (the demo's datastore serves `{an.dcfg.datastore.keytype}`)"
        rows, data = [], {}
        base = None
        for kt in kc.types:
            r = self.tune_json(f"keytype_tune_{kt}")
            dump = f"keytype_dump_{kt}"
            size = self.info(dump)["size"] if dump in an.records else demo_size
            lam1, ppl1, _ = _best_at(r, t_run)
            base = r["base_ppl"]
            name, paper = KEYTYPE_PAPER.get(kt, (kt, None))
            data[kt] = {"size": size, "base_ppl": r["base_ppl"], "best_ppl": r["best_ppl"],
                        "best_lambda": r["best_lambda"], "best_temperature": r["best_temperature"],
                        f"best_ppl_T{t_run:g}": ppl1, f"best_lambda_T{t_run:g}": lam1}
            rows.append(_row([f"{name} (`{kt}`)", f"{size:,}", _f(r["best_ppl"]), f"{r['best_lambda']:g}",
                              f"{r['best_temperature']:g}", _f(ppl1), f"{lam1:g}",
                              "" if paper is None else f"{paper:.2f}"]))
        self.data["keytype"] = data
        count = self.tune_json(f"keytype_tune_{kc.types[0]}")["count"]
        self._plot_keytypes(data, base)
        return [f"## {TITLES['keytype']}", "",
                f"One datastore per key type, all dumped from {text}, each indexed and "
                f"exported on the same {count:,} valid tokens (k = {an.dcfg.k}). Tuned: lambda and T on the "
                f"grids; also lambda alone at T = {t_run:g} (the paper tuned lambda only). Paper: WikiText-103 "
                f"dev, full datastore, base LM 17.96. Plot: table5_keytypes.png.", "",
                _row(["key type", "entries", "ppl (lambda, T tuned)", "lambda", "T",
                      f"ppl (T = {t_run:g}, lambda tuned)", "lambda", "paper dev ppl"]),
                "|---|---:|---:|---:|---:|---:|---:|---:|",
                _row(["No datastore (base LM)", "-", _f(base), "-", "-", _f(base), "-", "17.96"]), *rows]

    def _plot_keytypes(self, data, base):
        from matplotlib.figure import Figure

        names = list(data)
        fig = Figure(figsize=(7, 3.8))
        ax = fig.add_subplot()
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], [data[n]["best_ppl"] for n in names], height=0.4, label="lambda, T tuned")
        t = [k for k in data[names[0]] if k.startswith("best_ppl_T")][0]
        ax.barh([i - 0.2 for i in y], [data[n][t] for n in names], height=0.4,
                label=f"lambda tuned, T = {t[len('best_ppl_T'):]}")
        ax.axvline(base, color="gray", ls="--", lw=1, label=f"LM only ({base:.2f})")
        ax.set_yticks(list(y), names, fontsize=8)
        ax.set_xlabel("valid perplexity")
        lo = min(min(d["best_ppl"], d[t]) for d in data.values())
        ax.set_xlim(lo * 0.97, base * 1.02)
        ax.set_title("kNN-LM perplexity by key type (Table 5)", fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.an.out / "table5_keytypes.png", dpi=120)

    # ---- 5 ----
    def dstore_size(self, f):
        """Entries of the demo's datastore fraction f (1: the datastore itself)."""
        prefix = self.an.demo.dstore if f >= 1 else self.an.out / "size" / f"dstore_f{fkey(f)}"
        return json.loads(Path(f"{prefix}_meta.json").read_text())["size"]

    def section_approx(self):
        an = self.an
        t_run = float(an.dcfg.knn_temp)
        fractions = an.approx_fractions()
        data, base = {}, None
        rows = []
        for f in fractions:
            size = self.dstore_size(f)
            for way, (label, search, sim_func) in APPROX.items():
                r = self.tune_json(an.approx_tune_name(way, f))
                base = r["base_ppl"]
                lam1, ppl1, _ = _best_at(r, t_run)
                data[f"{way}_f{fkey(f)}"] = {
                    "fraction": f, "size": size, "way": label, "search": search, "sim_func": sim_func,
                    "count": r["count"], "base_ppl": r["base_ppl"], "best_ppl": r["best_ppl"],
                    "best_lambda": r["best_lambda"], "best_temperature": r["best_temperature"],
                    f"best_ppl_T{t_run:g}": ppl1, f"best_lambda_T{t_run:g}": lam1}
                rows.append(_row([f"{f:.0%}" if f < 1 else "100% (the demo's)", f"{size:,}", label,
                                  f"`--knn-search {search} --knn-sim-func {sim_func}`", _f(ppl1), f"{lam1:g}",
                                  _f(r["best_ppl"]), f"{r['best_lambda']:g}", f"{r['best_temperature']:g}",
                                  f"{APPROX_PAPER[way]:.3f}" if f >= 1 else "-"]))
        self.data["approx"] = data
        count = next(iter(data.values()))["count"]
        full = {w: data[f"{w}_f1"] for w in APPROX} if 1.0 in fractions else None
        out = [f"## {TITLES['approx']}", "",
               f"Each datastore fraction (the size analysis' subsets and indexes; 100% is the demo's) scored "
               f"three ways on the same {count:,} valid tokens at k = {an.dcfg.k}: the index's neighbors "
               f"(IVF{an.dcfg.index.ncentroids},PQ{an.dcfg.index.code_size}, probe {an.dcfg.probe}) with FAISS's "
               f"distances to the product-quantized keys (Xu et al.'s \"FAISS mask, FAISS score\"), the same "
               f"neighbors with exact squared L2 recomputed from the stored keys (\"FAISS mask, real score\": "
               f"the demo's setting), and the exact k nearest keys by a search over every key (\"real mask, real "
               f"score\": `--knn-search exact`, {an.cfg.approx.exact_dtype} keys). lambda tuned at T = {t_run:g}, "
               f"and lambda and T tuned. Base LM {_f(base)}. Xu et al. (WikiText-103, full datastore, tuned; base "
               f"21.750): 19.174, 19.672, 19.735 — approximate beats exact, both for the neighbors and the "
               f"scores. Plot: fig4_approx.png.", "",
               _row(["datastore", "entries", "neighbors, scores", "flags", f"ppl (T = {t_run:g}, lambda tuned)",
                     "lambda", "ppl (lambda, T tuned)", "lambda", "T", "Xu et al."]),
               "|---|---:|---|---|---:|---:|---:|---:|---:|---:|", *rows]
        if full:
            order = sorted(APPROX, key=lambda w: full[w]["best_ppl"])
            out += ["", f"Full datastore, lambda and T tuned: " + " ≤ ".join(
                f"{APPROX[w][0]} {_f(full[w]['best_ppl'], 3)}" for w in order) + "; at T = "
                f"{t_run:g}: " + ", ".join(f"{APPROX[w][0]} {_f(full[w][f'best_ppl_T{t_run:g}'], 3)}"
                                           for w in APPROX) + "."]
        self._plot_approx(data, fractions, base, t_run)
        return out

    def _plot_approx(self, data, fractions, base, t_run):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4))
        axes = fig.subplots(1, 2)
        for ax, key, what in ((axes[0], f"best_ppl_T{t_run:g}", f"T = {t_run:g}, lambda tuned"),
                              (axes[1], "best_ppl", "lambda and T tuned")):
            for way, (label, _, _) in APPROX.items():
                xs = sorted(fractions)
                ax.plot(xs, [data[f"{way}_f{fkey(f)}"][key] for f in xs], marker="o", label=label)
            ax.axhline(base, color="gray", ls="--", lw=1, label=f"LM alone ({base:.2f})")
            ax.set_xlabel("fraction of the datastore")
            ax.set_ylabel("valid perplexity")
            ax.set_title(f"Exact vs approximate kNN ({what})", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.an.out / "fig4_approx.png", dpi=120)

    def _plot_curves(self, curves, path, title, relative, temps=(None,)):
        """ppl (or ppl / base) vs lambda per (label, tune json); one panel per temperature
        (None: each curve at its own best T)."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5 * len(temps), 4))
        axes = fig.subplots(1, len(temps), squeeze=False)[0]
        for ax, temp in zip(axes, temps):
            for label, r in curves:
                lambdas, ppl, t = _curve(r, temp if temp is not None else r["best_temperature"])
                y = [p / r["base_ppl"] if relative else p for p in ppl]
                y = [math.nan if math.isinf(v) else v for v in y]
                ax.plot(lambdas, y, label=f"{label} (T={t:g})")
            ax.set_xlabel(r"$\lambda$")
            ax.set_ylabel("perplexity / LM alone" if relative else "perplexity")
            ax.set_title(title + (f", T = {temp:g}" if temp is not None else ", tuned T"), fontsize=10)
            if relative:
                ax.axhline(1.0, color="gray", ls="--", lw=1)
                lows = [min(v for v in row if v is not None) / r["base_ppl"] for _, r in curves for row in r["ppl"]]
                ax.set_ylim(min(lows) * 0.98, 1.25)  # the region around the optima
            finite = [v for _, r in curves for row in r["ppl"] for v in row if v is not None]
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            if not relative and finite:
                lo = min(finite)
                base = max(r["base_ppl"] for _, r in curves)
                ax.set_ylim(lo * 0.97, base * 1.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)

    # ---- 6 ----
    def section_domain(self):
        an, dc = self.an, self.an.cfg.domain
        dcfg = an.domain.cfg
        corpus = self.info("domain_corpus")
        tok = corpus["tokens"]
        test = self.read(an.out / "domain_test.json")
        demo_tune = self.read(an.demo.best)
        stores = ["unseen", *(["seen"] if dc.seen_datastore else [])]
        rs = {s: self.tune_json(f"domain_tune_{s}") for s in stores}
        base = rs["unseen"]["base_ppl"]
        sizes = {s: self.info(f"domain_dump_{s}")["size"] for s in stores}
        self.data["domain"] = {"tokens": tok, "vocab_size": corpus["vocab_size"], "test": test,
                               "train": self.an.records["domain_train"]["info"],
                               **{s: {"size": sizes[s], **{k: rs[s][k] for k in (
                                   "base_ppl", "best_ppl", "best_lambda", "best_temperature")}} for s in stores}}
        books = corpus["books"]
        t_run = float(an.dcfg.knn_temp)
        out = [f"## {TITLES['domain']}", "",
               f"A new LM with the demo's architecture, trained on {', '.join(books['train'])} only "
               f"({tok['train']:,} tokens, vocabulary {corpus['vocab_size']:,}; {dcfg.train.max_update} updates "
               f"of {dcfg.train.max_tokens} tokens, the demo's other training settings). Datastore: "
               + (f"a random {dc.dstore_fraction:g} of " if dc.dstore_fraction < 1 else "")
               + f"{', '.join(books['dstore'])} ({tok['unseen']:,} tokens, chunks of {dc.chunk_lines} paragraphs), "
               f"which the LM never saw"
               + (f"; as the in-domain reference, a datastore of a random sample of the LM's own training "
                  f"text of about the same size" if dc.seen_datastore else "")
               + f". lambda and T tuned on the first {an.cfg.eval.valid_fraction:g} of {', '.join(books['valid'])} "
               f"({tok['valid']:,} tokens), then the first {an.cfg.eval.test_fraction:g} of "
               f"{', '.join(books['test'])} ({tok['test']:,} tokens) scored with them. Plot: fig5_domain.png "
               f"(perplexity relative to the LM alone vs lambda, each at its best T).", "",
               _row(["LM trained on", "datastore", "entries", "valid ppl", "tuned lambda", "T",
                     f"best lambda at T = {t_run:g}", "test ppl"]),
               "|---|---|---:|---:|---:|---:|---:|---:|",
               _row(["3 books", "none", "-", _f(base), "-", "-", "-", _f(test["base_ppl"])])]
        labels = {"unseen": f"{', '.join(books['dstore'])} (never trained on)",
                  "seen": "sample of its own training text"}
        for s in stores:
            r = rs[s]
            lam1, _, _ = _best_at(r, t_run)
            out.append(_row(["3 books", labels[s], f"{sizes[s]:,}", _f(r["best_ppl"]), f"{r['best_lambda']:g}",
                             f"{r['best_temperature']:g}", f"{lam1:g}",
                             _f(test["knn_ppl"]) if s == "unseen" else "-"]))
        demo_full = self.read(an.demo.best)
        lam_d1, _, _ = _best_at(demo_full, t_run)
        demo_size = json.loads(Path(f"{an.demo.dstore}_meta.json").read_text())["size"]
        out += [_row(["the demo's LM (4 books)", "its training split", f"{demo_size:,}", _f(demo_tune["best_ppl"]),
                      f"{demo_tune['best_lambda']:g}", f"{demo_tune['best_temperature']:g}", f"{lam_d1:g}", "-"]),
                "",
                f"The demo row is on the whole valid book with the demo's vocabulary (not comparable in "
                f"perplexity, only in lambda). Test ({tok['test']:,} tokens): base LM {_f(test['base_ppl'])} -> "
                f"kNN-LM {_f(test['knn_ppl'])} ({test['gain_pct']:.1f}% lower) with the datastore of "
                f"{', '.join(books['dstore'])} at lambda = {test['lmbda']:g}, T = {test['temperature']:g}. "
                f"Paper (BOOKS, WIKI-3B LM): 34.84 -> 20.47 test, best lambda 0.65 out of domain vs 0.25 in domain."]
        curves = [(f"3-book LM + {labels[s]}", rs[s]) for s in stores]
        curves.append(("demo LM + its training data", demo_full))
        self._plot_curves(curves, an.out / "fig5_domain.png", "Domain adaptation", relative=True)
        return out

    # ---- 7 ----
    def section_beyond(self):
        an = self.an
        lm = an.beyond
        corpus = self.info("beyond_corpus")
        tok, books = corpus["tokens"], corpus["books"]
        tune = {"b": self.tune_json("beyond_tune_own"), "c": self.tune_json("beyond_tune_all"),
                "e": self.tune_json("tune_full_l2")}
        test = {r: self.read(an.out / "beyond" / "scores" / f"test_{r}.json") for r in ("b", "c", "e")}
        n_own, n_rest = self.info("beyond_dump_own")["size"], self.info("beyond_dump_rest")["size"]
        n_demo = self.dstore_size(1.0)
        own = f"{len(books['own'])} books"
        rows = {  # row -> (LM, datastore, entries, valid, lambda, T, test)
            "a": (own, "none", 0, tune["b"]["base_ppl"], None, None, test["b"]["base_ppl"]),
            "b": (own, f"its own training text ({', '.join(books['own'])})", n_own, tune["b"]["best_ppl"],
                  tune["b"]["best_lambda"], tune["b"]["best_temperature"], test["b"]["knn_ppl"]),
            "c": (own, "all four training books (its own keys)", n_own + n_rest, tune["c"]["best_ppl"],
                  tune["c"]["best_lambda"], tune["c"]["best_temperature"], test["c"]["knn_ppl"]),
            "d": ("4 books (the demo's LM)", "none", 0, tune["e"]["base_ppl"], None, None, test["e"]["base_ppl"]),
            "e": ("4 books (the demo's LM)", "all four training books (the demo's datastore)", n_demo,
                  tune["e"]["best_ppl"], tune["e"]["best_lambda"], tune["e"]["best_temperature"],
                  test["e"]["knn_ppl"]),
        }
        self.data["beyond"] = {"books": books, "tokens": tok, "train": an.records["beyond_train"]["info"],
                               "rows": {r: dict(zip(("lm", "datastore", "entries", "valid_ppl", "lmbda",
                                                     "temperature", "test_ppl"), v)) for r, v in rows.items()},
                               "test_tokens": test["b"]["tokens"], "valid_tokens": tune["b"]["count"]}
        t = lm.cfg.train
        c_valid, c_test, d_valid, d_test = rows["c"][3], rows["c"][6], rows["d"][3], rows["d"][6]
        if c_valid <= d_valid and c_test <= d_test:
            verdict = "**(c) reaches (d)**: the LM trained on half the text, with a datastore of all of it, is as good as the LM trained on all of it"
        elif c_valid > d_valid and c_test > d_test:
            verdict = "**(c) does not reach (d)**: the datastore of all four books does not make up for training on them"
        else:
            verdict = "**(c) reaches (d) on one split only**"
        verdict += (f" (valid {_f(c_valid)} vs {_f(d_valid)}, test {_f(c_test)} vs {_f(d_test)}; "
                    f"(c) closes {_gap(rows, 3)} of the gap from (a) to (d) on valid and {_gap(rows, 6)} on test).")
        out = [f"## {TITLES['beyond']}", "",
               f"An LM of the demo's size trained only on {', '.join(books['own'])} ({tok['own']:,} tokens; "
               f"{t.max_update} updates of {t.max_tokens} tokens, the demo's recipe and compute, so "
               f"{t.max_update * t.max_tokens / tok['own']:.1f} epochs of its text against the demo's "
               f"{an.dcfg.train.max_update * an.dcfg.train.max_tokens / (tok['own'] + tok['rest']):.1f}), with the "
               f"demo's dictionary. Its datastore of all four books is its dump of its own text plus its dump of "
               f"{', '.join(books['rest'])} ({tok['rest']:,} tokens), one index over both (a shard manifest). "
               f"lambda and T tuned per row on the first {an.cfg.eval.valid_fraction:g} of the valid book "
               f"({tune['b']['count']:,} tokens), then the first {an.cfg.eval.test_fraction:g} of the test book "
               f"({test['b']['tokens']:,} tokens) scored with them. Paper (Table 3: WIKI-100M LM, WIKI-3B "
               f"datastore, 30 times its training text): (a) 20.99 / 19.59, (c) 14.61 / 13.73, (d) 16.11 / 15.17 "
               f"dev / test. Plot: fig2_beyond.png.", "",
               _row(["row", "LM trained on", "datastore", "entries", "valid ppl", "lambda", "T", "test ppl",
                     "paper dev / test"]), "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for r, (lm_name, ds, n, v, lam, temp, te) in rows.items():
            paper = BEYOND_PAPER.get(r)
            out.append(_row([f"({r})", lm_name, ds, f"{n:,}" if n else "-", _f(v),
                             "-" if lam is None else f"{lam:g}", "-" if temp is None else f"{temp:g}", _f(te),
                             f"{paper[0]:.2f} / {paper[1]:.2f}" if paper else "-"]))
        out += ["", verdict]
        self._plot_beyond(rows)
        return out

    def _plot_beyond(self, rows):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4))
        for ax, col, split in zip(fig.subplots(1, 2), (3, 6), ("valid", "test")):
            part = [rows[r] for r in "abc"]
            ax.plot([x[2] for x in part], [x[col] for x in part], marker="o", label=f"LM of {rows['a'][0]} (a, b, c)")
            for (x, y), r in zip([(p[2], p[col]) for p in part], "abc"):
                ax.annotate(f"({r})", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
            full = [rows[r] for r in "de"]
            ax.plot([x[2] for x in full], [x[col] for x in full], marker="s", label="the demo's LM of 4 books (d, e)")
            for (x, y), r in zip([(p[2], p[col]) for p in full], "de"):
                ax.annotate(f"({r})", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
            ax.axhline(rows["d"][col], color="gray", ls=":", lw=1)
            ax.set_xlabel("datastore entries")
            ax.set_ylabel(f"{split} perplexity")
            ax.set_title(f"A datastore beyond the training data ({split})", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(self.an.out / "fig2_beyond.png", dpi=120)

    # ---- times ----
    def section_times(self):
        an = self.an
        per = {}
        for name, (step, _, analysis) in an.plan.items():
            rec = an.records.get(name)
            if rec is None:
                continue
            p = per.setdefault(analysis, {"seconds": 0.0, "steps": 0, "skipped": 0, "longest": (0.0, "")})
            p["seconds"] += rec["seconds"]
            p["steps"] += 1
            p["skipped"] += bool(rec["skipped"])
            if rec["seconds"] > p["longest"][0]:
                p["longest"] = (rec["seconds"], step.title)
        self.data["times"] = {a: {k: v for k, v in p.items()} for a, p in per.items()}
        self.data["step_seconds"] = {n: {"seconds": r["seconds"], "skipped": r["skipped"]}
                                     for n, r in an.records.items()}
        out = ["## Run times", "",
               "Wall time of each analysis' steps on this machine, measured when each step was made "
               "(a step skipped in this run keeps the time of the run that made it); the machine is shared, "
               "so these include waiting for other work. The analyses need the demo's steps up to its "
               "tuning (not its scoring of valid and test). Per-step times: results.json; tool output: "
               "logs/.", "",
               "| analysis | steps | wall time | longest step |", "|---|---:|---:|---|"]
        demo_s = sum(r["seconds"] for r in self.demo_results.values())
        longest = max(self.demo_results.values(), key=lambda r: r["seconds"])
        out.append(_row(["the demo's steps (corpus ... tune)", len(self.demo_results), fmt_seconds(demo_s),
                         f"{longest['title']} ({fmt_seconds(longest['seconds'])})"]))
        self.data["times"]["demo"] = {"seconds": demo_s, "steps": len(self.demo_results)}
        order = ["shared", *sorted(an.cfg.run, key=ANALYSES.index)]
        for a in order:
            if a in per:
                p = per[a]
                out.append(_row([TITLES[a], p["steps"], fmt_seconds(p["seconds"]),
                                 f"{p['longest'][1]} ({fmt_seconds(p['longest'][0])})"]))
        made = sum(p["seconds"] for p in per.values())
        skipped = sum(p["skipped"] for p in per.values())
        out += [_row(["all analyses (the demo's steps not counted)", sum(p["steps"] for p in per.values()),
                      fmt_seconds(made), ""]), "",
                f"This run took {fmt_seconds(self.total)}{'' if self.done >= set(an.cfg.run) else ' so far'} "
                f"({len(an.records)} of {len(an.plan)} steps, "
                f"{skipped} of them skipped as done).", ""]
        return out


# --------------------------------------------------------------------------- CLI


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m knnlm.experiments.analyses",
        description="The kNN-LM paper's analyses (Figures 2, 4, 5; Tables 3, 4, 5; Xu et al. 2023's exact vs "
                    "approximate neighbors and scores) on the demo's Jane Austen LM, datastore and index.",
        epilog="Settings: any field of configs/demo/analyses.yaml as key=value (run=[k,lambda], "
               "eval.valid_fraction=1); the demo's as demo.key=value (demo.workdir=demo_runs/other).")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default %(default)s)")
    p.add_argument("--austen-dir", metavar="DIR", help="local copy of the books (as knnlm.demo's --austen-dir)")
    p.add_argument("--print-config", action="store_true", help="print both configs and exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | analyses | %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, stream=sys.stdout)
    overrides = list(args.overrides)
    if args.austen_dir:
        overrides.append(f"demo.austen_dir={Path(args.austen_dir).expanduser().resolve()}")
    try:
        cfg, dcfg, demo_over, demo_path = load_configs(overrides, args.config)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg) + "# demo:\n" + OmegaConf.to_yaml(dcfg), end="")
            return 0
        Analyses(cfg, dcfg, demo_over, demo_path, overrides).run()
    except DemoError as e:
        print(f"knnlm.analyses: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("knnlm.analyses: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
