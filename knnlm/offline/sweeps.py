"""Perplexity sweeps from per-token exports (`--knnlm-dump-probs`), without re-running the model.

    python -m knnlm.sweeps k EXPORT_DIR [--lmbda L] [--knn-temp T] [--ks 8,16,...] [--tune-lambda]
                           [--lambdas 0:1:0.01] [--plot fig4.png] [--json out.json]
    python -m knnlm.sweeps sizes EXPORT_DIR [EXPORT_DIR ...] [--lmbda L] [--knn-temp T]
                           [--lambdas 0:1:0.01] [--plot fig2.png] [--json out.json]

(also the console script `knnlm-sweeps k ...` / `knnlm-sweeps sizes ...`)

`k` (the paper's Figure 4): perplexity as a function of the number of neighbors k', from one
export made with a large k (1024). FAISS returns neighbors best-first, and the export keeps
them in that order, so its first k' columns are what a run with `--k k'` retrieves (up to
ties in FAISS's distances at position k'); p_kNN over them is exact for that k'.

`sizes` (Figure 2a and 2b): one export per datastore (e.g. random fractions from
`python -m knnlm.subset`), each scored at the given lambda and at its own best lambda;
the datastore size comes from the export's metadata.

lambda and T default to the export's own run values. The math is `knnlm.scoring`'s.
"""

import argparse
import logging
import math
import sys

import numpy as np
import torch

from ..errors import ConfigError, CorruptError
from ..scoring import check_lambda, check_temperature, knn_log_prob, neighbor_scores
from .export_reader import load_export
from .rescoring import same_temperature
from ..cli import run_command
from .rescoring import (DEFAULT_LAMBDAS, PNG_METADATA, best_lambda, check_consistent, json_safe, parse_lambdas,
                        write_outputs)
from .rescoring import perplexity as _perplexity_and_zeros


def perplexity(lp_lm, lp_knn, lmbda):
    """exp(-mean log(lambda p_kNN + (1 - lambda) p_LM)); inf if any token gets probability 0."""
    return _perplexity_and_zeros(lp_lm, lp_knn, lmbda)[0]

logger = logging.getLogger(__name__)

# (rows x neighbors) elements per chunk: bounded memory whatever the export's size.
CHUNK_ELEMENTS = 1 << 20


def default_ks(k_kept):
    """8, 16, ... up to k_kept (and k_kept itself): the paper's Figure 4 axis."""
    ks = [2 ** i for i in range(3, 31) if 2 ** i <= k_kept] or [2 ** i for i in range(31) if 2 ** i <= k_kept]
    return ks if ks[-1] == k_kept else ks + [k_kept]


def parse_ks(text):
    try:
        ks = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--ks must be a comma list of integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--ks must list positive integers, got {text!r}")
    return ks


def _tensor(a, dtype):
    return torch.from_numpy(np.array(a, dtype=dtype))  # a copy: memory maps are read-only


def _check(export, neighbors=True):
    if export.count == 0:
        raise ConfigError(f"export {export.path} holds no tokens")
    if neighbors and not export.has_neighbors:
        raise ConfigError(f"export {export.path} has no neighbor distances (dists.npy): "
                          f"export with --knnlm-dump-probs and the default --knnlm-dump-neighbors")


def lp_knn_first_k(export, ks, temperature):
    """log p_kNN(target) over the first k' exported neighbors, for each k' in ks: (len(ks), N)."""
    _check(export)
    check_temperature(temperature)
    too_many = [k for k in ks if k > export.k_kept]
    if too_many:
        raise ConfigError(f"export {export.path} kept {export.k_kept} neighbors per token; "
                          f"cannot score k = {too_many}")
    kmax = max(ks)
    out = np.empty((len(ks), export.count), dtype=np.float32)
    step = max(1, CHUNK_ELEMENTS // kmax)
    for lo in range(0, export.count, step):
        hi = min(lo + step, export.count)
        d = _tensor(export.dists[lo:hi, :kmax], np.float32)
        valid = ~torch.isnan(d)  # NaN: FAISS found fewer neighbors
        scores = neighbor_scores(d.nan_to_num(0.0), export.meta["sim_func"], temperature)
        # `match` already says which neighbor carries the target: compare it with 1.
        carries = _tensor(export.match[lo:hi, :kmax], np.int64)
        ones = torch.ones(hi - lo, dtype=torch.int64)
        for i, k in enumerate(ks):
            out[i, lo:hi] = knn_log_prob(scores[:, :k], carries[:, :k], ones, valid[:, :k]).numpy()
    return out


def _settings(export, lmbda, temperature):
    lmbda = float(export.meta["lmbda"]) if lmbda is None else float(lmbda)
    temperature = float(export.meta["temperature"]) if temperature is None else float(temperature)
    check_lambda(lmbda)
    check_temperature(temperature)
    return lmbda, temperature


def sweep_k(export, ks=None, lmbda=None, temperature=None, lambdas=None):
    """Perplexity at each k' in ks (and, given `lambdas`, at the best lambda per k')."""
    _check(export)
    lmbda, temperature = _settings(export, lmbda, temperature)
    ks = default_ks(export.k_kept) if ks is None else sorted(set(ks))
    grid = lp_knn_first_k(export, ks, temperature)
    lp_lm = _tensor(export.lp_lm, np.float32)
    diff = None
    if export.k_kept == export.k and export.k_kept in ks and same_temperature(temperature, export.meta["temperature"]):
        diff = check_consistent(export, grid[ks.index(export.k_kept)])
    rows = []
    for k, lp in zip(ks, grid):
        lp_knn = torch.from_numpy(lp)
        row = {"k": k, "ppl": perplexity(lp_lm, lp_knn, lmbda),
               "tokens_without_target": int(np.isneginf(lp).sum())}
        if lambdas is not None:
            row["best_lambda"], row["best_ppl"] = best_lambda(lp_lm, lp_knn, lambdas)
        rows.append(row)
    return {"sweep": "k", "export": export.path, "count": export.count, "sim_func": export.meta["sim_func"],
            "run_k": export.k, "k_kept": export.k_kept, "lmbda": lmbda, "temperature": temperature,
            "base_ppl": perplexity(lp_lm, lp_lm, 0.0), "consistency_max_abs_diff": diff, "rows": rows}


def datastore_size(export):
    """Entries of the datastore an export was scored against (its fingerprint ends in ':size')."""
    fp = str(export.meta.get("datastore_fingerprint", ""))
    try:
        return int(fp.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        raise CorruptError(f"export {export.path}: its metadata does not record the datastore's "
                           f"size (datastore_fingerprint {fp!r})") from None


def sweep_sizes(exports, lmbda=None, temperature=None, lambdas=None):
    """One row per export, sorted by datastore size: perplexity at lambda and at the best lambda."""
    if not exports:
        raise ConfigError("give at least one export directory")
    lambdas = parse_lambdas(DEFAULT_LAMBDAS) if lambdas is None else lambdas
    rows = []
    for ex in exports:
        _check(ex, neighbors=False)  # needed only to re-score at another temperature
        lam, t = _settings(ex, lmbda, temperature)
        if same_temperature(t, ex.meta["temperature"]):
            lp = _tensor(ex.lp_knn, np.float32)  # exact for the run's k
            k_used = ex.k
        else:
            lp = torch.from_numpy(lp_knn_first_k(ex, [ex.k_kept], t)[0])
            k_used = ex.k_kept
        lp_lm = _tensor(ex.lp_lm, np.float32)
        best_lam, best_ppl = best_lambda(lp_lm, lp, lambdas)
        rows.append({"export": ex.path, "datastore": ex.meta.get("datastore"), "size": datastore_size(ex),
                     "count": ex.count, "k": k_used, "lmbda": lam, "temperature": t,
                     "base_ppl": perplexity(lp_lm, lp, 0.0), "ppl": perplexity(lp_lm, lp, lam),
                     "best_lambda": best_lam, "best_ppl": best_ppl})
    rows.sort(key=lambda r: r["size"])
    if len({(r["count"], round(r["base_ppl"], 6)) for r in rows}) > 1:
        logger.warning("the exports were not made on the same tokens (their base LM perplexities "
                       "differ): their kNN-LM perplexities are not comparable")
    return {"sweep": "sizes", "rows": rows}


# --------------------------------------------------------------------------- output

def _fmt(x):
    return "inf" if math.isinf(x) else f"{x:.2f}"


def _table(head, rows):
    widths = [max(len(str(r[c])) for r in [head] + rows) for c in range(len(head))]
    return "\n".join("  ".join(str(c).rjust(w) for c, w in zip(r, widths)) for r in [head] + rows)


def report_k(result):
    r = result
    head = ["k", f"ppl (l={r['lmbda']:g})"]
    tuned = "best_lambda" in r["rows"][0]
    head += ["best l", "ppl (best l)"] if tuned else []
    head += ["no target"]
    rows = []
    for row in r["rows"]:
        cells = [row["k"], _fmt(row["ppl"])]
        cells += [f"{row['best_lambda']:g}", _fmt(row["best_ppl"])] if tuned else []
        rows.append(cells + [row["tokens_without_target"]])
    return (f"export {r['export']}: {r['count']:,} tokens, {r['k_kept']} of k={r['run_k']} neighbors kept, "
            f"{r['sim_func']}, T={r['temperature']:g}; base LM ppl {_fmt(r['base_ppl'])}\n"
            + _table(head, rows))


def report_sizes(result):
    head = ["datastore size", "ppl (l)", "l", "best l", "ppl (best l)", "base LM"]
    rows = [[f"{r['size']:,}", _fmt(r["ppl"]), f"{r['lmbda']:g}", f"{r['best_lambda']:g}",
             _fmt(r["best_ppl"]), _fmt(r["base_ppl"])] for r in result["rows"]]
    return _table(head, rows)


def _finite(values):
    return [np.nan if math.isinf(v) else v for v in values]  # inf: a gap in the curve


def plot_k(result, path):
    """Perplexity vs k (log2 axis), the base LM as a dashed line: the paper's Figure 4."""
    from matplotlib.figure import Figure  # Agg via Figure.savefig: no display needed

    r = result
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    ks = [row["k"] for row in r["rows"]]
    ax.plot(ks, _finite([row["ppl"] for row in r["rows"]]), "o-", label=f"kNN-LM, $\\lambda$={r['lmbda']:g}")
    if "best_lambda" in r["rows"][0]:
        ax.plot(ks, _finite([row["best_ppl"] for row in r["rows"]]), "s--", label="kNN-LM, $\\lambda$ tuned per k")
    ax.axhline(r["base_ppl"], color="gray", ls="--", lw=1, label=f"LM only ({r['base_ppl']:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])  # the k values themselves, not powers of two
    ax.minorticks_off()
    ax.set_xlabel("k (number of nearest neighbors)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity vs k, {r['count']:,} tokens, T={r['temperature']:g}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata=PNG_METADATA)


def plot_sizes(result, path):
    """(a) perplexity and (b) the best lambda vs datastore size: the paper's Figure 2."""
    from matplotlib.figure import Figure

    rows = result["rows"]
    sizes = [r["size"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax, bx = fig.subplots(1, 2)
    ax.plot(sizes, _finite([r["ppl"] for r in rows]), "o-", label=f"kNN-LM, $\\lambda$={rows[0]['lmbda']:g}")
    ax.plot(sizes, _finite([r["best_ppl"] for r in rows]), "s--", label="kNN-LM, tuned $\\lambda$")
    ax.axhline(rows[0]["base_ppl"], color="gray", ls="--", lw=1, label=f"LM only ({rows[0]['base_ppl']:.2f})")
    ax.set_ylabel("perplexity")
    ax.set_title("(a) perplexity vs datastore size", fontsize=10)
    bx.plot(sizes, [r["best_lambda"] for r in rows], "o-")
    bx.set_ylabel(r"best $\lambda$")
    bx.set_title(r"(b) tuned $\lambda$ vs datastore size", fontsize=10)
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xlabel("datastore size (entries)")
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata=PNG_METADATA)


def to_json(result):
    """JSON has no inf: infinite perplexities become null."""
    return json_safe(result)


def build_parser():
    p = argparse.ArgumentParser(prog="python -m knnlm.sweeps", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="sweep", required=True)
    k = sub.add_parser("k", help="perplexity vs number of neighbors, from one export (Figure 4)")
    k.add_argument("export_dir", metavar="EXPORT_DIR")
    k.add_argument("--ks", help="comma list of k' (default: 8, 16, ... up to the neighbors exported)")
    k.add_argument("--tune-lambda", action="store_true", help="also report the best lambda for each k'")
    s = sub.add_parser("sizes", help="perplexity and best lambda vs datastore size (Figure 2)")
    s.add_argument("export_dir", metavar="EXPORT_DIR", nargs="+")
    for q in (k, s):
        q.add_argument("--lmbda", type=float, help="interpolation weight (default: the export's run value)")
        q.add_argument("--knn-temp", type=float, help="temperature (default: the export's run value)")
        q.add_argument("--lambdas", default=DEFAULT_LAMBDAS, help="grid for tuning lambda (default %(default)s)")
        q.add_argument("--plot", metavar="PNG")
        q.add_argument("--json", metavar="JSON")
        q.add_argument("--overwrite", action="store_true", help="replace a --json/--plot file this library did not write")
    return p


def _run(args):
    lambdas = parse_lambdas(args.lambdas)
    if args.sweep == "k":
        result = sweep_k(load_export(args.export_dir), parse_ks(args.ks) if args.ks else None,
                         args.lmbda, args.knn_temp, lambdas if args.tune_lambda else None)
        print(report_k(result))
        plot = plot_k
    else:
        result = sweep_sizes([load_export(d) for d in args.export_dir], args.lmbda, args.knn_temp, lambdas)
        print(report_sizes(result))
        plot = plot_sizes
    write_outputs(args.json, lambda: to_json(result), args.plot, lambda p: plot(result, p), prog=args.prog,
                  overwrite=args.overwrite)


def main(argv=None):
    return run_command("knnlm.sweeps", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
