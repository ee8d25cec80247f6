"""`make bench`: what kNN-LM evaluation costs next to plain evaluation, and where it goes.

    .venv/bin/python -m benchmarks.run [--quick] [--out FILE.md] [--demo-dir demo_runs/austen]

In one run, on this machine, side by side:
  * plain fairseq-eval-lm vs kNN-LM eval (k=1024, nprobe=32) with exact recomputed distances
    (--knn-sim-func l2) and without (do_not_recomp_l2): tokens/s and the time ratio;
  * dumping the datastore of a split vs plain evaluation of the same split;
  * knnlm-build-index vs bare FAISS train+add on the same keys, sample, chunks and threads;
  * our scorer vs a naive one that builds a vocabulary-sized distribution per token
    (benchmarks/naive_scorer.py): both perplexities, scoring time, peak memory;
  * kNN-LM eval time as the datastore grows (0.25x / 1x / 4x, the 4x partly synthetic) and as
    k grows (8 / 64 / 256 / 1024);
  * peak resident memory of every command-line run.

Inputs: the demo's model, datastore and index (`make demo`, default demo_runs/austen) when they
are complete; otherwise the benchmark builds its own small setup in bench_runs/austen the same
way (Austen corpus, a 4-layer 256-d transformer LM trained briefly on the CPU, the training
split's datastore, an IVF1024,PQ64 index) and reuses it on later runs. --quick evaluates a
~10K-token slice of the validation split and smaller build/scaling cases (a minute or two once
the setup exists); the full run evaluates the whole validation split.

Times of evaluation runs are fairseq-eval-lm's own ("Evaluated N tokens in T s": the scoring
loop, model and index loading excluded); wall times include everything. Peak memory of a
command-line run is the child's own maximum resident set size (ru_maxrss from os.wait4 on
that child alone). The machine is shared: the load average before and after is printed, and
ratios are only ever taken between runs of this one invocation.
"""

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, fmt_bytes, log, machine, md_table, parse_eval, ratio, run_tool, text_table

PLUGIN = str(REPO / "fairseq_plugins")

K, PROBE = 1024, 32
KS = (8, 64, 256, 1024)
FAST_K_FACTOR = 2

# Own setup: the demo's model and index shape (configs/demo/austen.yaml), trained for less.
OWN = {
    "min_count": 3,
    "train": ["--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", "4",
              "--decoder-embed-dim", "256", "--decoder-ffn-embed-dim", "1024", "--decoder-attention-heads", "4",
              "--tokens-per-sample", "256", "--sample-break-mode", "none", "--max-tokens", "4096",
              "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "0.002",
              "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "40", "--clip-norm", "0.5",
              "--max-update", "120", "--share-decoder-input-output-embed", "--dropout", "0.1",
              "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--disable-validation",
              "--seed", "1", "--log-format", "simple", "--log-interval", "10"],
    "index": ["ncentroids=1024", "code_size=64", "num_keys_to_train=200000", "seed=1"],
    "context_window": 128, "max_tokens": 8192, "tokens_per_sample": 256,
}


class Setup:
    """Paths and settings of the model, data, datastore and index being benchmarked."""

    def __init__(self, source, data, ckpt, dstore, index, text_valid, context_window, max_tokens,
                 tokens_per_sample, keytype="last_ffn_input", move_to_mem=False, lmbda=0.25, temp=1.0):
        self.source, self.data, self.ckpt, self.dstore, self.index = source, str(data), str(ckpt), str(dstore), str(index)
        self.text_valid = text_valid
        self.context_window, self.max_tokens, self.tokens_per_sample = context_window, max_tokens, tokens_per_sample
        self.keytype, self.move_to_mem, self.lmbda, self.temp = keytype, move_to_mem, lmbda, temp
        self.split = "valid"

    def eval_cmd(self, *extra, plain=False, data=None):
        base = ["fairseq-eval-lm", data or self.data, "--path", self.ckpt, "--gen-subset", self.split,
                "--tokens-per-sample", self.tokens_per_sample, "--context-window", self.context_window,
                "--max-tokens", self.max_tokens, "--cpu", "--num-workers", 0, "--no-progress-bar"]
        if plain:
            return base + ["--task", "language_modeling"]  # stock fairseq, no plugin
        return base + ["--user-dir", PLUGIN, "--task", "knnlm", "--knn-keytype", self.keytype, *extra]

    def knn_args(self, k=K, probe=PROBE, sim="l2", dstore=None, index=None):
        return ["--knnlm", "--dstore-filename", dstore or self.dstore, "--indexfile", index or self.index,
                "--k", k, "--probe", probe, "--knn-sim-func", sim, "--lmbda", self.lmbda, "--knn-temp", self.temp,
                *(["--move-dstore-to-mem"] if self.move_to_mem else [])]


# --------------------------------------------------------------------------- inputs

def _complete(meta_path):
    try:
        return json.loads(Path(meta_path).read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def demo_setup(demo_dir):
    """The demo's artifacts (knnlm/demo.py's layout), if every one of them is complete."""
    d = Path(demo_dir)
    need = {
        "data": d / "data-bin" / "dict.txt", "ckpt": d / "checkpoints" / "checkpoint_last.pt",
        "dstore": d / "dstore" / "train_meta.json", "index": d / "dstore" / "train_knn.index",
        "valid": d / "corpus" / "valid.txt",
    }
    if not all(p.exists() for p in need.values()):
        return None
    if not (_complete(need["dstore"]) and _complete(f"{need['index']}.meta.json")):
        return None
    cfg = {}
    if (d / "config.yaml").exists():
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(d / "config.yaml"), resolve=True)
    # The demo's tuned lambda and T when its tuning is done (the cost is the same; the
    # perplexity column then shows the gain), else its run values.
    best = json.loads((d / "tune" / "best.json").read_text()) if (d / "tune" / "best.json").exists() else {}
    return Setup(
        f"the demo's ({d})", d / "data-bin", need["ckpt"], d / "dstore" / "train", need["index"], need["valid"],
        context_window=cfg.get("context_window", 128), max_tokens=cfg.get("eval_max_tokens", 8192),
        tokens_per_sample=cfg.get("model", {}).get("tokens_per_sample", 256),
        keytype=cfg.get("datastore", {}).get("keytype", "last_ffn_input"),
        move_to_mem=bool(cfg.get("move_dstore_to_mem", False)),
        lmbda=best.get("best_lambda", cfg.get("lmbda", 0.25)), temp=best.get("best_temperature", cfg.get("knn_temp", 1.0)),
    )


def _stamped(path, params):
    try:
        return json.loads(Path(path).read_text()) == params
    except (OSError, ValueError):
        return False


def own_setup(root):
    """Build (or reuse) a small Austen setup under root, step by step, each step stamped."""
    from knnlm.experiments.corpora.austen import build_austen_corpus

    root = Path(root)
    text, data = root / "text", root / "bin"
    log(f"[setup] no complete demo outputs: using/building the benchmark's own setup in {root}")
    stats = build_austen_corpus(text, min_count=OWN["min_count"])
    log(f"[setup] corpus: {stats['tokens']['train']:,} train / {stats['tokens']['valid']:,} valid tokens"
        f"{' (reused)' if stats.get('reused') else ''}")
    stamp = {"preprocess": 1, "corpus": str(text)}
    if not _stamped(data / "bench_stamp.json", stamp):
        shutil.rmtree(data, ignore_errors=True)
        log("[setup] binarizing (fairseq-preprocess)")
        run_tool(["fairseq-preprocess", "--only-source", "--trainpref", text / "train.txt",
                  "--validpref", text / "valid.txt", "--testpref", text / "test.txt",
                  "--destdir", data, "--workers", 2], root / "logs" / "preprocess.log")
        (data / "bench_stamp.json").write_text(json.dumps(stamp))
    lm = root / "lm"
    ckpt = lm / "checkpoint_last.pt"
    stamp = {"train": OWN["train"]}
    if not (ckpt.exists() and _stamped(lm / "bench_stamp.json", stamp)):
        shutil.rmtree(lm, ignore_errors=True)
        log("[setup] training the LM (fairseq-train, 120 updates on the CPU: minutes)")
        wall, _, _ = run_tool(["fairseq-train", data, *OWN["train"], "--save-dir", lm], root / "logs" / "train.log")
        (lm / "bench_stamp.json").write_text(json.dumps(stamp))
        log(f"[setup] trained in {wall:.0f} s")
    s = Setup("the benchmark's own (bench_runs/austen)", data, ckpt, root / "dstore" / "train",
              root / "dstore" / "train_knn.index", text / "valid.txt", OWN["context_window"],
              OWN["max_tokens"], OWN["tokens_per_sample"])
    stamp = {"ckpt_mtime": ckpt.stat().st_mtime, "cw": s.context_window, "mt": s.max_tokens}
    if not (_complete(f"{s.dstore}_meta.json") and _stamped(f"{s.dstore}_bench_stamp.json", stamp)):
        log("[setup] dumping the training split's datastore")
        s.split = "train"
        run_tool(s.eval_cmd("--save-knnlm-dstore", "--dstore-mmap", s.dstore, "--overwrite"), root / "logs" / "dump_train.log")
        s.split = "valid"
        Path(f"{s.dstore}_bench_stamp.json").write_text(json.dumps(stamp))
    fp = json.loads(Path(f"{s.dstore}_meta.json").read_text())["uuid"]
    stamp = {"dstore": fp, "index": OWN["index"]}
    if not (_complete(f"{s.index}.meta.json") and _stamped(f"{s.index}.bench_stamp.json", stamp)):
        log("[setup] building the index (knnlm-build-index)")
        run_tool(["knnlm-build-index", f"dstore_mmap={s.dstore}", f"faiss_index={s.index}", *OWN["index"],
                  "overwrite=true"], root / "logs" / "index.log")
        Path(f"{s.index}.bench_stamp.json").write_text(json.dumps(stamp))
    return s


def quick_split(setup, root, min_tokens, text=None, name="quick-bin"):
    """Binarize the first lines of the validation text (or of `text`: another split's, which the
    slice then stands in for as its "valid" split) (>= min_tokens) with the model's dictionary."""
    out = Path(root) / name
    text = text or setup.text_valid
    lines, n = [], 0
    with open(text) as f:
        for line in f:
            lines.append(line)
            n += len(line.split()) + 1
            if n >= min_tokens:
                break
    stamp = {"text": str(text), "lines": len(lines), "dict": str(Path(setup.data) / "dict.txt"),
             "dict_mtime": (Path(setup.data) / "dict.txt").stat().st_mtime}
    if not _stamped(out / "bench_stamp.json", stamp):
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "valid.txt").write_text("".join(lines))
        run_tool(["fairseq-preprocess", "--only-source", "--srcdict", Path(setup.data) / "dict.txt",
                  "--validpref", out / "valid.txt", "--destdir", out, "--workers", 1], out / "preprocess.log")
        (out / "bench_stamp.json").write_text(json.dumps(stamp))
    setup.data = str(out)
    return n


# --------------------------------------------------------------------------- derived datastores

def derived_datastore(base_prefix, base_index, root, fraction, log_dir, noise=0.25, seed=0):
    """A datastore of fraction x the base's size with an index of the base's trained quantizers.

    fraction <= 1: the base's first rows. fraction > 1: the base, then (fraction - 1) copies of
    it with Gaussian noise of `noise` x each dimension's spread added to the keys (same values).
    Cached under root by the base datastore's identity.
    """
    import faiss

    from knnlm.artefacts import write_json_atomic
    from knnlm.store import Datastore, DatastoreWriter
    from knnlm.index import meta_path

    base = Datastore.open(str(base_prefix))
    name = f"x{fraction:g}"
    prefix, index = Path(root) / name / "dstore", Path(root) / name / "dstore_knn.index"
    stamp = {"base": base.fingerprint, "base_index_mtime": Path(base_index).stat().st_mtime,
             "fraction": fraction, "noise": noise, "seed": seed}
    stamp_path = Path(root) / name / "bench_stamp.json"
    if _stamped(stamp_path, stamp) and _complete(f"{prefix}_meta.json") and _complete(meta_path(str(index))):
        return str(prefix), str(index), Datastore.open(str(prefix)).size
    shutil.rmtree(Path(root) / name, ignore_errors=True)
    n = int(round(base.size * fraction))
    m = base.meta
    w = DatastoreWriter(str(prefix), base.dim, keytype=m["keytype"], fp16=m["keys_dtype"] == "float16",
                        dict_size=m["dict_size"], dict_fingerprint=m["dict_fingerprint"],
                        model_fingerprint=m.get("model_fingerprint"), expected_size=n,
                        extra={"derived_from": base.prefix, "fraction": fraction,
                               "synthetic": (f"rows {base.size:,}+ are copies of the base with N(0, ({noise} x "
                                             f"per-dimension std)^2) noise") if fraction > 1 else None})
    chunk = 1 << 17
    rng = np.random.default_rng(seed)
    std = None
    if fraction > 1:
        sample = base.gather_keys(np.sort(rng.choice(base.size, min(base.size, 100_000), replace=False)))
        std = sample.astype(np.float32).std(0) * noise
    written = 0
    while written < n:
        s = written % base.size
        e = min(base.size, s + chunk, s + n - written)
        keys = np.asarray(base.keys[s:e], dtype=np.float32)
        if written >= base.size:
            keys = keys + rng.normal(size=keys.shape).astype(np.float32) * std
        w.add(keys.astype(base.keys.dtype), np.asarray(base.vals[s:e]))
        written += e - s
    w.finalize()
    ds = Datastore.open(str(prefix))
    idx = faiss.read_index(str(base_index))
    idx.reset()  # keeps the trained coarse quantizer and PQ codebooks
    t0 = time.perf_counter()
    for s in range(0, n, 1 << 19):
        e = min(n, s + (1 << 19))
        idx.add_with_ids(np.asarray(ds.keys[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
    faiss.write_index(idx, str(index))
    meta = json.loads(Path(meta_path(str(base_index))).read_text())
    meta.update(datastore=ds.prefix, datastore_fingerprint=ds.fingerprint, datastore_size=ds.size, ntotal=int(idx.ntotal),
                add_seconds=round(time.perf_counter() - t0, 3), starting_point=0,
                note="benchmarks/run.py: the base index's trained quantizers, this datastore's keys added")
    write_json_atomic(meta_path(str(index)), meta)
    stamp_path.write_text(json.dumps(stamp))
    return str(prefix), str(index), ds.size


# --------------------------------------------------------------------------- index build comparison

def bare_build(prefix, index_path, factory, n_train, seed, chunk, threads):
    """Bare FAISS: the builder's training sample, factory, chunks and threads; no checkpoints or metadata."""
    import faiss

    from knnlm.store.datastore import Datastore

    faiss.omp_set_num_threads(threads)
    ds = Datastore.open(prefix)
    t0 = time.perf_counter()
    rows = np.sort(np.random.default_rng(seed).choice(ds.size, size=n_train, replace=False))
    x = np.asarray(ds.keys[rows], dtype=np.float32)
    index = faiss.index_factory(ds.dim, factory, faiss.METRIC_L2)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if getattr(ivf, "do_polysemous_training", False):
        ivf.do_polysemous_training = False  # as knnlm-build-index does
    index.train(x)
    del x
    t1 = time.perf_counter()
    for s in range(0, ds.size, chunk):
        e = min(ds.size, s + chunk)
        index.add_with_ids(np.array(ds.keys[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
    faiss.write_index(index, index_path)
    t2 = time.perf_counter()
    print(json.dumps({"train_seconds": t1 - t0, "add_seconds": t2 - t1}))


# --------------------------------------------------------------------------- report

def _times(r):
    return "/".join(f"{t:.1f}" for t in r["times"])


# --------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description="kNN-LM benchmark (make bench)")
    p.add_argument("--quick", action="store_true", help="a ~10K-token slice and small cases: a minute or two")
    p.add_argument("--out", help="also write the tables as markdown to this file")
    p.add_argument("--demo-dir", default=str(REPO / "demo_runs" / "austen"))
    p.add_argument("--workdir", default=str(REPO / "bench_runs"))
    p.add_argument("--own", action="store_true", help="use the benchmark's own setup even if the demo's exists")
    p.add_argument("--quick-tokens", type=int, default=10_000)
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds of plain / kNN-LM / no-recompute / fast-scan / dump runs, interleaved, and of the two "
                        "index builds, interleaved; each keeps its fastest")
    p.add_argument("--bare-build", nargs=7, metavar=("PREFIX", "INDEX", "FACTORY", "NTRAIN", "SEED", "CHUNK", "THREADS"),
                   help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.bare_build:
        pre, idx, fac, nt, seed, ch, th = a.bare_build
        return bare_build(pre, idx, fac, int(nt), int(seed), int(ch), int(th))

    t_start = time.perf_counter()
    work = Path(a.workdir)
    logs = work / "logs"
    info = machine()
    load0 = os.getloadavg()
    log(f"kNN-LM benchmark{' (--quick)' if a.quick else ''}: {info['cpu']}, {info['cores']} cores, "
        f"{info['memory']}, GPU: {info['gpu']}; torch {info['torch']}, faiss {info['faiss']}, "
        f"fairseq {info['fairseq']}, numpy {info['numpy']}, Python {info['python']}")
    log(f"load average at start: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} (this machine is shared)")

    setup = None if a.own else demo_setup(a.demo_dir)
    if setup is None:
        setup = own_setup(work / "austen")
    full_data = setup.data
    from knnlm.store.datastore import Datastore

    base_ds = Datastore.open(setup.dstore)
    log(f"[inputs] {setup.source}: datastore {setup.dstore} ({base_ds.size:,} x {base_ds.dim}, "
        f"{base_ds.keys.dtype}), index {setup.index}")
    index_meta = json.loads(Path(f"{setup.index}.meta.json").read_text())
    if a.quick:
        n = quick_split(setup, work, a.quick_tokens)
        log(f"[inputs] --quick: the first ~{n:,} tokens of the validation split")

    results = {}

    def evaluate(name, cmd, note=""):
        log(f"[run] {name}{note} ...")
        wall, rss, out = run_tool(cmd, logs / f"{re.sub(r'[^A-Za-z0-9]+', '_', name)}.log")
        r = parse_eval(out)
        r.update(wall=wall, rss=rss, times=[r["seconds"]])
        if name in results:  # a repeat: keep the fastest run, remember every time
            prev = results[name]
            r["times"] = prev["times"] + r["times"]
            if prev["seconds"] <= r["seconds"]:
                r = dict(prev, times=r["times"], rss=max(prev["rss"], rss))
            else:
                r["rss"] = max(prev["rss"], rss)
        results[name] = r
        log(f"      {r['tokens']:,} tokens in {r['times'][-1]:.1f} s ({r['tokens'] / r['times'][-1]:,.0f} tokens/s), "
            f"wall {wall:.1f} s, peak RSS {fmt_bytes(rss)}, perplexity {r.get('ppl', float('nan')):.2f}")
        return r

    # 1. plain vs kNN-LM (interleaved, best of --repeat), dump. The fast-scan row: same code
    # bytes per key as the base index (twice the sub-quantizers at 4 bits), searched for
    # FAST_K_FACTOR x k candidates that the exact recompute re-ranks (--knn-k-factor).
    fast_factory = f"IVF{index_meta['ncentroids']},PQ{2 * index_meta['code_size']}x4fs"
    fast_index = work / "fastscan" / f"{Path(setup.dstore).name}_{fast_factory.replace(',', '_')}.index"
    if not Path(f"{fast_index}.meta.json").exists() or json.loads(Path(f"{fast_index}.meta.json").read_text()).get(
            "datastore_fingerprint") != index_meta.get("datastore_fingerprint"):
        log(f"[prepare] {fast_factory} index of the same datastore ...")
        fast_index.parent.mkdir(parents=True, exist_ok=True)
        run_tool(["knnlm-build-index", f"dstore_mmap={setup.dstore}", f"faiss_index={fast_index}",
                  f"factory='{fast_factory}'", f"num_keys_to_train={index_meta.get('n_train', 200_000)}",
                  f"seed={index_meta.get('seed', 1)}", "overwrite=true"], logs / "build_fastscan.log")
    fast_name = f"kNN-LM, recompute, {fast_factory} + k-factor {FAST_K_FACTOR:g}"
    quartet = [("plain eval", setup.eval_cmd(plain=True)),
               ("kNN-LM, recompute (l2)", setup.eval_cmd(*setup.knn_args())),
               ("kNN-LM, no recompute (do_not_recomp_l2)", setup.eval_cmd(*setup.knn_args(sim="do_not_recomp_l2"))),
               (fast_name, setup.eval_cmd(*setup.knn_args(index=fast_index), "--knn-k-factor", FAST_K_FACTOR)),
               # In the rounds too: a single dump run once came out at 1.66x plain, and 0.97x when interleaved.
               ("dump of the same split", setup.eval_cmd("--save-knnlm-dstore", "--dstore-mmap",
                                                         work / "dump_valid" / "valid", "--overwrite"))]
    for rep in range(a.repeat):
        for name, cmd in quartet:
            evaluate(name, cmd, f" (round {rep + 1} of {a.repeat})" if a.repeat > 1 else "")
    plain, knn, norec, fast, dump = (results[name] for name, _ in quartet)

    # 2. k
    by_k = {K: knn}
    for k in KS:
        if k != K:
            by_k[k] = evaluate(f"kNN-LM, recompute, k={k}", setup.eval_cmd(*setup.knn_args(k=k)))

    # 3. datastore size
    fractions = (0.25, 0.5) if a.quick else (0.25, 4.0)
    by_size = {1.0: (base_ds.size, knn)}
    for f in fractions:
        log(f"[prepare] datastore of {f:g}x the size{' (partly synthetic)' if f > 1 else ''}, index with the base's quantizers")
        t0 = time.perf_counter()
        pre, idx, n = derived_datastore(setup.dstore, setup.index, work / "scaling", f, logs)
        log(f"          {n:,} entries ready in {time.perf_counter() - t0:.0f} s")
        by_size[f] = (n, evaluate(f"kNN-LM, recompute, datastore {f:g}x ({n:,})",
                                  setup.eval_cmd(*setup.knn_args(dstore=pre, index=idx))))

    # 4. index build: ours vs bare FAISS, same keys
    build_frac = 0.0625 if a.quick else 1.0
    if build_frac == 1.0:
        b_prefix, b_size = setup.dstore, base_ds.size
    else:
        b_prefix, _, b_size = derived_datastore(setup.dstore, setup.index, work / "scaling", build_frac, logs)
    n_train = min(int(index_meta.get("n_train", 200_000)), b_size)
    threads = os.cpu_count() or 1
    ours_index, bare_index = work / "build" / "ours.index", work / "build" / "bare.index"
    ours_index.parent.mkdir(parents=True, exist_ok=True)
    log(f"[run] knnlm-build-index vs bare FAISS train+add on {b_size:,} keys ({index_meta['factory_template']}, "
        f"ncentroids {index_meta['ncentroids']}, code_size {index_meta['code_size']}, {n_train:,} training keys, "
        f"{threads} threads), interleaved {a.repeat}x ...")
    builds = {"ours": [], "bare": []}  # per round: (train+add s, wall s, peak RSS, seconds dict)
    for rep in range(a.repeat):
        wall_o, rss_o, _ = run_tool(["knnlm-build-index", f"dstore_mmap={b_prefix}", f"faiss_index={ours_index}",
                                     f"factory='{index_meta['factory_template']}'", f"ncentroids={index_meta['ncentroids']}",
                                     f"code_size={index_meta['code_size']}", f"num_keys_to_train={n_train}",
                                     f"seed={index_meta.get('seed', 1)}", f"threads={threads}", "overwrite=true"],
                                    logs / "build_ours.log")
        om = json.loads(Path(f"{ours_index}.meta.json").read_text())
        builds["ours"].append((om["train_seconds"] + om["add_seconds"], wall_o, rss_o, om))
        wall_b, rss_b, out_b = run_tool([sys.executable, __file__, "--bare-build", b_prefix, bare_index, om["factory"],
                                         om["n_train"], om["seed"], 500_000, threads], logs / "build_bare.log")
        bm = json.loads(out_b.strip().splitlines()[-1])
        builds["bare"].append((bm["train_seconds"] + bm["add_seconds"], wall_b, rss_b, bm))
        log(f"      round {rep + 1}: ours train {om['train_seconds']:.1f} + add {om['add_seconds']:.1f} s "
            f"(wall {wall_o:.1f} s, peak RSS {fmt_bytes(rss_o)}); bare train {bm['train_seconds']:.1f} + add "
            f"{bm['add_seconds']:.1f} s (wall {wall_b:.1f} s, peak RSS {fmt_bytes(rss_b)})")
    build_times = {w: "/".join(f"{r[0]:.1f}" for r in rs) for w, rs in builds.items()}

    def fastest(rounds):  # wall s and seconds of the fastest round; peak RSS, the max over rounds
        best = min(rounds, key=lambda r: r[0])
        return best[1], max(r[2] or 0 for r in rounds) or None, best[3]

    wall_o, rss_o, om = fastest(builds["ours"])
    wall_b, rss_b, bm = fastest(builds["bare"])

    # 5. scorers
    log("[run] our scorer vs the naive (N, V) scorer (benchmarks/naive_scorer.py) ...")
    cmp_json = work / "scorer_compare.json"
    wall_c, rss_c, _ = run_tool(
        [sys.executable, "-m", "benchmarks.naive_scorer", "--data", setup.data, "--path", setup.ckpt,
         "--dstore", setup.dstore, "--index", setup.index, "--k", K, "--probe", PROBE, "--lmbda", setup.lmbda,
         "--temperature", setup.temp, "--context-window", setup.context_window, "--max-tokens", setup.max_tokens,
         "--keytype", setup.keytype, "--json", cmp_json],
        logs / "scorer_compare.log", env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    sc = json.loads(cmp_json.read_text())
    log(f"      perplexity ours {sc['ppl_ours']:.4f} / naive {sc['ppl_naive']:.4f}; scoring {sc['seconds']['ours']:.2f} s"
        f" / {sc['seconds']['naive']:.2f} s")

    load1 = os.getloadavg()
    total = time.perf_counter() - t_start

    # ------------------------------------------------------------------ the report
    split_desc = f"{plain['tokens']:,} tokens of the validation split" + (" (--quick slice)" if a.quick else "")
    head = (f"Machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), {info['memory']} RAM, "
            f"GPU: {info['gpu']}; Python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), "
            f"faiss {info['faiss']} ({info['faiss_threads']} threads), fairseq {info['fairseq']}, numpy {info['numpy']}.\n"
            f"Load average (1/5/15 min) at start {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f}, at end "
            f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f}: above {info['cores']} means other work shared the cores.\n"
            f"Inputs: {setup.source}; datastore {base_ds.size:,} x {base_ds.dim} ({base_ds.keys.dtype}), index "
            f"{index_meta['factory']}; evaluation on {split_desc}, context window {setup.context_window}, "
            f"{setup.max_tokens} tokens per batch; lambda {setup.lmbda}, T {setup.temp}"
            f"{', --move-dstore-to-mem (as the demo)' if setup.move_to_mem else ''}.\n"
            f"Eval times are fairseq-eval-lm's own (scoring loop only); plain / kNN-LM / no-recompute ran "
            f"interleaved {a.repeat}x, fastest kept (all times: plain {_times(plain)}, kNN-LM {_times(knn)}, "
            f"no recompute {_times(norec)}, fast-scan {_times(fast)}, dump {_times(dump)} s); the two index builds ran interleaved {a.repeat}x too, fastest kept (train+add: ours {build_times['ours']}, bare {build_times['bare']} s); other rows ran once. Peak RSS is each child process's "
            f"ru_maxrss (os.wait4), max over repeats. Benchmark wall time {total / 60:.1f} min.")

    headline = [
        f"kNN-LM eval / plain eval (k={K}, nprobe={PROBE}, recompute): {ratio(knn['seconds'], plain['seconds'])}",
        f"kNN-LM eval / plain eval (k={K}, nprobe={PROBE}, no recompute): {ratio(norec['seconds'], plain['seconds'])}",
        f"kNN-LM eval / plain eval (k={K}, nprobe={PROBE}, recompute, {fast_factory} + k-factor {FAST_K_FACTOR:g}): "
        f"{ratio(fast['seconds'], plain['seconds'])}",
        f"dump / plain eval (same split): {ratio(dump['seconds'], plain['seconds'])}",
        f"knnlm-build-index / bare FAISS train+add ({b_size:,} keys): "
        f"{ratio(om['train_seconds'] + om['add_seconds'], bm['train_seconds'] + bm['add_seconds'])} "
        f"(wall {ratio(wall_o, wall_b)})",
        f"naive scorer / our scorer, time: {ratio(sc['seconds']['naive'], sc['seconds']['ours'])}",
    ]
    if sc.get("peak_bytes"):
        headline.append(f"naive scorer / our scorer, peak memory: {ratio(sc['peak_bytes']['naive'], sc['peak_bytes']['ours'])}")
    big, small = max(by_size), min(by_size)
    headline.append(f"kNN-LM eval, datastore {big:g}x / {small:g}x: "
                    f"{ratio(by_size[big][1]['seconds'], by_size[small][1]['seconds'])}")
    headline.append(f"kNN-LM eval, k={K} / k=8: {ratio(knn['seconds'], by_k[8]['seconds'])}")

    # Paired by round: each run over the plain run of its own round. Best-of ratios above can be
    # skewed by one lucky plain run on a host that slows down later; these cannot.
    paired_hdr = ["run"] + [f"round {i + 1}" for i in range(a.repeat)] + ["median"]

    def paired_row(name, mine, base):
        rs = [t / b for t, b in zip(mine, base)]
        return [name] + [f"{x:.2f}x" for x in rs] + [f"{statistics.median(rs):.2f}x"]

    paired_rows = [paired_row(f"{n} / plain eval", r["times"], plain["times"]) for n, r in
                   (("kNN-LM, recompute", knn), ("kNN-LM, no recompute", norec),
                    (f"kNN-LM, recompute, {fast_factory} + k-factor {FAST_K_FACTOR:g}", fast), ("dump", dump))]
    paired_rows.append(paired_row("knnlm-build-index / bare FAISS (train+add)", [r[0] for r in builds["ours"]],
                                  [r[0] for r in builds["bare"]]))

    hdr = ["run", "tokens", "eval s", "tokens/s", "vs plain", "wall s", "peak RSS", "perplexity"]

    def row(name, r):
        return [name, f"{r['tokens']:,}", f"{r['seconds']:.1f}", f"{r['tokens_per_s']:,.0f}",
                ratio(r["seconds"], plain["seconds"]), f"{r['wall']:.1f}", fmt_bytes(r["rss"]),
                f"{r['ppl']:.2f}" if "ppl" in r else "-"]

    eval_rows = [row("plain fairseq-eval-lm", plain), row(f"kNN-LM k={K} nprobe={PROBE}, recompute (l2)", knn),
                 row(f"kNN-LM k={K} nprobe={PROBE}, no recompute", norec),
                 row(f"kNN-LM k={K} nprobe={PROBE}, recompute, {fast_factory}, --knn-k-factor {FAST_K_FACTOR:g}", fast),
                 row("dump (--save-knnlm-dstore)", dump)]
    k_rows = [row(f"k={k}", by_k[k]) for k in KS]
    size_rows = [row(f"{f:g}x: {n:,} entries{' (synthetic 3x)' if f > 1 else ''}", r) for f, (n, r) in sorted(by_size.items())]
    build_hdr = ["build", "train s", "add s", "train+add s", "wall s", "peak RSS"]
    build_rows = [
        ["knnlm-build-index", f"{om['train_seconds']:.1f}", f"{om['add_seconds']:.1f}",
         f"{om['train_seconds'] + om['add_seconds']:.1f}", f"{wall_o:.1f}", fmt_bytes(rss_o)],
        ["bare FAISS", f"{bm['train_seconds']:.1f}", f"{bm['add_seconds']:.1f}",
         f"{bm['train_seconds'] + bm['add_seconds']:.1f}", f"{wall_b:.1f}", fmt_bytes(rss_b)],
    ]
    pk = sc.get("peak_bytes") or {"ours": None, "naive": None}
    scorer_hdr = ["scorer", "perplexity", "scoring s", "peak memory / batch"]
    scorer_rows = [
        ["ours (knnlm.scoring, (N, k))", f"{sc['ppl_ours']:.4f}", f"{sc['seconds']['ours']:.3f}", fmt_bytes(pk["ours"])],
        [f"naive ((N, V), V={sc['vocab']:,})", f"{sc['ppl_naive']:.4f}", f"{sc['seconds']['naive']:.3f}", fmt_bytes(pk["naive"])],
    ]
    s = sc["seconds"]
    stage_total = s["forward"] + s["search"] + s["recompute"] + s["ours"]
    stage_hdr = ["stage (in-process, same batches)", "seconds", "share"]
    stage_rows = [[n, f"{s[key]:.2f}", f"{s[key] / stage_total:.0%}"] for n, key in
                  (("LM forward + log-softmax", "forward"), (f"FAISS search (k={K}, nprobe={PROBE})", "search"),
                   ("exact distance recompute + values", "recompute"), ("our scoring", "ours"))]
    notes = (f"Scorer comparison: {sc['tokens']:,} tokens, LM perplexity {sc['ppl_lm']:.4f}; both scorers get the "
             f"same LM log-softmax and neighbors per batch; max |log p| difference {sc['max_abs_logprob_diff']:.1e}. "
             f"Peak memory: {sc['memory_method'] or 'not measured (no /proc/self/clear_refs)'}, with glibc's mmap "
             f"threshold at 128 KiB. Scaling rows: datastores below 1x are the first rows of the real one"
             f"{'; the 4x one is the real one plus 3 copies with Gaussian noise (0.25 x per-dimension std)' if 4.0 in by_size else ''}"
             f"; all use the real index's trained quantizers. The scorer comparison process peaked at {fmt_bytes(rss_c)}.")

    sections = [
        ("Headline", None, headline),
        ("Ratios paired by round (each over its own round's plain run or bare build)", paired_hdr, paired_rows),
        ("Evaluation runs", hdr, eval_rows),
        (f"kNN-LM eval vs k (nprobe={PROBE}, recompute)", hdr, k_rows),
        (f"kNN-LM eval vs datastore size (k={K}, nprobe={PROBE}, recompute)", hdr, size_rows),
        (f"Index build on {b_size:,} keys ({om['factory']}, {om['n_train']:,} training keys, {threads} threads)", build_hdr, build_rows),
        ("Scorer: ours vs naive", scorer_hdr, scorer_rows),
        ("Where kNN-LM eval time goes", stage_hdr, stage_rows),
    ]
    log("\n" + "=" * 100)
    log(head)
    for title, h, rows in sections:
        log(f"\n{title}")
        log("\n".join(rows) if h is None else text_table(h, rows))
    log("\n" + notes)
    if a.out:
        md = ["# kNN-LM benchmark" + (" (--quick)" if a.quick else ""), "", head.replace("\n", "  \n"), ""]
        for title, h, rows in sections:
            md += [f"## {title}", ""]
            md += ([f"    {r}" for r in rows] if h is None else [md_table(h, rows)])
            md.append("")
        md += [notes, ""]
        Path(a.out).write_text("\n".join(md))
        log(f"\nwritten to {a.out}")
    setup.data = full_data
    return 0


if __name__ == "__main__":
    sys.exit(main())
