"""The plan: each analysis as demo-style steps (knnlm.demo.Step) with their settings, outputs and
the steps they build on; `Analyses.run` runs the demo's steps, then the plan, then the report."""

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from .. import demo as demo_mod
from ..demo import DemoError, Step, _digest, load_config, parse_summary
from .report import Report
from .runner import InProcessDemo, ToolRunner
from .settings import (ANALYSES, APPROX, DEMO_LAST_STEP, _plain, _plain_tree, beyond_books, demo_lambdas, fkey,
                       log)
from .text import head_lines, n_tokens, read_lines, sample_chunks, write_lines


class Analyses(ToolRunner):
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
        from ...offline.tune import main as tune_main

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
        from ...store.subset import main as subset_main

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
        from ...offline.sweeps import main as sweeps_main

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
        from ...offline.sweeps import main as sweeps_main

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
            from ..corpora.austen import build_austen_corpus

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
                 score_test, deps=[tune_name, "domain_unseen_index"])

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
            from ..corpora.austen import build_austen_corpus

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
