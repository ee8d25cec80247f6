"""results.md and results.json: one section per analysis from its steps' outputs, and the run times."""

import json
import math
from pathlib import Path

from ..demo import fmt_seconds
from .plots import plot_approx, plot_beyond, plot_curves, plot_keytypes
from .settings import ANALYSES, APPROX, APPROX_PAPER, BEYOND_PAPER, KEYTYPE_PAPER, TABLE_LAMBDAS, TITLES, fkey
from .tables import _at, _best_at, _f, _gap, _row


class Report:
    """results.md and results.json from the steps' outputs."""

    def __init__(self, an, demo_results, total, done):
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
        from ...errors import KNNLMError
        from ...offline.export_reader import load_export

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
        plot_keytypes(data, base, self.an.out / "table5_keytypes.png")
        return [f"## {TITLES['keytype']}", "",
                f"One datastore per key type, all dumped from {text}, each indexed and "
                f"exported on the same {count:,} valid tokens (k = {an.dcfg.k}). Tuned: lambda and T on the "
                f"grids; also lambda alone at T = {t_run:g} (the paper tuned lambda only). Paper: WikiText-103 "
                f"dev, full datastore, base LM 17.96. Plot: table5_keytypes.png.", "",
                _row(["key type", "entries", "ppl (lambda, T tuned)", "lambda", "T",
                      f"ppl (T = {t_run:g}, lambda tuned)", "lambda", "paper dev ppl"]),
                "|---|---:|---:|---:|---:|---:|---:|---:|",
                _row(["No datastore (base LM)", "-", _f(base), "-", "-", _f(base), "-", "17.96"]), *rows]


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
            out += ["", "Full datastore, lambda and T tuned: " + " ≤ ".join(
                f"{APPROX[w][0]} {_f(full[w]['best_ppl'], 3)}" for w in order) + "; at T = "
                f"{t_run:g}: " + ", ".join(f"{APPROX[w][0]} {_f(full[w][f'best_ppl_T{t_run:g}'], 3)}"
                                           for w in APPROX) + "."]
        plot_approx(data, fractions, base, t_run, self.an.out / "fig4_approx.png")
        return out


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
               + ("; as the in-domain reference, a datastore of a random sample of the LM's own training "
                  "text of about the same size" if dc.seen_datastore else "")
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
        plot_curves(curves, an.out / "fig5_domain.png", "Domain adaptation", relative=True)
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
        plot_beyond(rows, self.an.out / "fig2_beyond.png")
        return out


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
