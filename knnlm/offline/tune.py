"""knnlm-tune: grid-search lambda and the temperature on an export from `--knnlm-dump-probs`.

    perplexity(lambda, T) = exp(-mean_t log(lambda p_kNN,T(y_t) + (1 - lambda) p_LM(y_t)))

p_kNN at each temperature is re-scored once from the exported neighbor distances (chunked),
after which every lambda is one vector operation over the tokens.

Default temperature grid: T_run * 2**(j/2) for j = -6..6, i.e. 13 values from T_run/8 to
8 T_run in steps of sqrt(2), T_run (the run's own temperature) included exactly.
"""

import argparse
import math
import sys

import numpy as np
import torch

from ..errors import ConfigError, CorruptError
from .export_reader import load_export
from .rescoring import lp_knn_grid, same_temperature
from .rescoring import (DEFAULT_LAMBDAS, check_consistent, json_safe, parse_lambdas,  # noqa: F401
                        PNG_METADATA, parse_temperatures, perplexity, write_outputs)
from ..cli import run_command

DEFAULT_TABLE_LAMBDAS = "0,0.1,0.25,0.5,0.75,0.9,1"


def default_temperatures(t_run):
    return [t_run * 2.0 ** (j / 2) for j in range(-6, 7)]


def tune(export, lambdas, temperatures=None):
    """Perplexity for every (temperature, lambda) of the grid, as a dict.

    temperatures: None for `default_temperatures` around the run's T. Keys: ppl (array,
    rows = temperatures, columns = lambdas; inf where some token gets probability 0),
    best_lambda/best_temperature/best_ppl, base_ppl (lambda = 0), run_ppl (the run's lambda
    and T, from the stored lp_knn), best_lambda_at_run_temperature/best_ppl_at_run_temperature
    (stored lp_knn: exact even for a truncated export), tokens_without_target (per temperature:
    tokens whose target no kept neighbor carries, the cause of inf at lambda = 1),
    consistency_max_abs_diff, approximate_temperatures (K kept < k), and the export's facts.
    """
    meta = export.meta
    t_run, l_run = float(meta["temperature"]), float(meta["lmbda"])
    if export.count == 0:
        raise ConfigError(f"export {export.path} holds no tokens")
    lp_lm = torch.from_numpy(np.array(export.lp_lm, dtype=np.float32))
    stored = torch.from_numpy(np.array(export.lp_knn, dtype=np.float32))
    for name, v in (("lp_lm", lp_lm), ("lp_knn", stored)):
        if torch.isnan(v).any() or (v > 1e-4).any():
            raise CorruptError(f"export {export.path}: {name}.npy holds NaN or positive log-probabilities")
    result = {"export": export.path, "count": export.count, "sim_func": meta["sim_func"],
              "k": export.k, "k_kept": export.k_kept, "run_lambda": l_run, "run_temperature": t_run,
              "approximate_temperatures": bool(export.truncated), "consistency_max_abs_diff": None}
    if not export.has_neighbors:
        if temperatures is not None and any(not same_temperature(t, t_run) for t in temperatures):
            raise ConfigError(
                f"export {export.path} has no neighbor distances, so only lambda can be tuned "
                f"(at the run's T = {t_run:g}); drop --temperatures"
            )
        temperatures, grid = [t_run], stored.unsqueeze(0)
    else:
        temperatures = sorted(set(temperatures if temperatures is not None else default_temperatures(t_run)))
        # The run's own temperature is always re-scored: it checks the export's consistency.
        at_run = [i for i, t in enumerate(temperatures) if same_temperature(t, t_run)]
        grid = torch.from_numpy(lp_knn_grid(export, temperatures + ([] if at_run else [t_run])))
        recomputed = grid[at_run[0] if at_run else -1]
        if not at_run:
            grid = grid[:-1]
        if not export.truncated:
            result["consistency_max_abs_diff"] = check_consistent(export, recomputed.numpy())
        else:
            result["run_ppl_rescored"] = perplexity(lp_lm, recomputed, l_run)[0]
    ppl = np.empty((len(temperatures), len(lambdas)))
    for i in range(len(temperatures)):
        for j, lam in enumerate(lambdas):
            ppl[i, j] = perplexity(lp_lm, grid[i], lam)[0]
    i, j = np.unravel_index(np.argmin(ppl), ppl.shape)
    # p_kNN = 0 exactly where no kept neighbor carries the target, whatever the temperature.
    no_target = [int(torch.isneginf(g).sum()) for g in grid]
    # Lambda alone at the run's T from the stored lp_knn: exact even when K kept < k.
    at_run_ppl = [perplexity(lp_lm, stored, lam)[0] for lam in lambdas]
    j_run = int(np.argmin(at_run_ppl))
    result.update(
        best_lambda_at_run_temperature=float(lambdas[j_run]), best_ppl_at_run_temperature=at_run_ppl[j_run],
        base_ppl=perplexity(lp_lm, stored, 0.0)[0],
        run_ppl=perplexity(lp_lm, stored, l_run)[0],
        best_lambda=float(lambdas[j]), best_temperature=float(temperatures[i]), best_ppl=float(ppl[i, j]),
        lambdas=[float(x) for x in lambdas], temperatures=[float(t) for t in temperatures],
        ppl=ppl, tokens_without_target=no_target, _lp_lm=lp_lm, _grid=grid,
    )
    return result


def _fmt_ppl(x):
    if math.isinf(x):
        return "inf"
    return f"{x:.2f}" if x < 1e5 else f"{x:.3g}"


def table(result, table_lambdas):
    """Rows: temperatures; columns: table_lambdas, then the best lambda of the grid at that T."""
    lp_lm, grid = result["_lp_lm"], result["_grid"]
    head = ["T"] + [f"l={lam:g}" for lam in table_lambdas] + ["best l", "ppl"]
    rows = []
    for i, t in enumerate(result["temperatures"]):
        cells = [f"{t:.4g}" + ("*" if same_temperature(t, result["run_temperature"]) else "")]
        cells += [_fmt_ppl(perplexity(lp_lm, grid[i], lam)[0]) for lam in table_lambdas]
        j = int(np.argmin(result["ppl"][i]))
        cells += [f"{result['lambdas'][j]:g}", _fmt_ppl(result["ppl"][i, j])]
        rows.append(cells)
    widths = [max(len(r[c]) for r in [head] + rows) for c in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(head)] + [line(r) for r in rows])


def plot(result, path):
    """Perplexity vs lambda, one curve per temperature (the paper's Figure 5), best point marked."""
    from matplotlib.figure import Figure  # Agg through Figure.savefig: no pyplot, no display

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ppl, lambdas, temps = result["ppl"], result["lambdas"], result["temperatures"]
    colors = _colors(len(temps))
    for i, t in enumerate(temps):
        run = same_temperature(t, result["run_temperature"])
        y = np.where(np.isfinite(ppl[i]), ppl[i], np.nan)  # inf: a gap, not a spike
        ax.plot(lambdas, y, color=colors[i], lw=2.2 if run else 1.2,
                label=f"T={t:.3g}" + (" (run)" if run else ""))
    ax.axhline(result["base_ppl"], color="gray", ls="--", lw=1, label=f"LM only ({result['base_ppl']:.2f})")
    ax.plot([result["best_lambda"]], [result["best_ppl"]], "r*", ms=14, zorder=5,
            label=f"best: $\\lambda$={result['best_lambda']:g}, T={result['best_temperature']:.3g} "
                  f"({_fmt_ppl(result['best_ppl'])})")
    finite = ppl[np.isfinite(ppl)]
    if finite.size and finite.max() / finite.min() > 3:
        ax.set_yscale("log")
    ax.set_xlabel(r"$\lambda$ (weight of $p_{kNN}$)")
    ax.set_ylabel("perplexity")
    title = f"kNN-LM interpolation, {result['count']:,} tokens"
    if math.isinf(result["ppl"][:, -1].max()) and result["lambdas"][-1] == 1.0:
        title += f"\n($\\lambda$=1: inf, {max(result['tokens_without_target']):,} tokens without their target)"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata=PNG_METADATA)


def _colors(n):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def to_json(result):
    """The result without internals, infinite perplexities as null (JSON has no inf)."""
    out = json_safe({k: v for k, v in result.items() if not k.startswith("_") and k != "ppl"})
    out["ppl"] = json_safe([[float(x) for x in row] for row in result["ppl"]])
    out["ppl_layout"] = "ppl[i][j]: temperatures[i], lambdas[j]; null = infinite"
    return out


def report(result, table_lambdas):
    r = result
    lines = [
        f"export {r['export']}: {r['count']:,} tokens, sim_func {r['sim_func']}, "
        + (f"{r['k_kept']} of k={r['k']} neighbors kept, " if r["k_kept"] else "no neighbors exported, ")
        + f"run lambda={r['run_lambda']:g}, T={r['run_temperature']:g}",
        f"base LM (lambda=0):            ppl {_fmt_ppl(r['base_ppl'])}",
        f"run (lambda={r['run_lambda']:g}, T={r['run_temperature']:g}):  ppl {_fmt_ppl(r['run_ppl'])}",
        f"best (lambda={r['best_lambda']:g}, T={r['best_temperature']:.4g}): ppl {_fmt_ppl(r['best_ppl'])}",
        f"best lambda at the run's T:    lambda={r['best_lambda_at_run_temperature']:g}, "
        f"ppl {_fmt_ppl(r['best_ppl_at_run_temperature'])}",
    ]
    if r["approximate_temperatures"]:
        lines.append(
            f"note: only {r['k_kept']} of {r['k']} neighbors were exported, so perplexities at the grid's "
            f"temperatures are those of a {r['k_kept']}-neighbor kNN-LM, an approximation (at the run's "
            f"setting: {_fmt_ppl(r['run_ppl_rescored'])} re-scored vs {_fmt_ppl(r['run_ppl'])} exact); "
            f"the best lambda at the run's T (above) is exact"
        )
    ts = r["temperatures"]
    if len(ts) > 1 and r["best_temperature"] in (ts[0], ts[-1]) and r["best_lambda"] > 0:
        lines.append(f"note: the best temperature is at the edge of the grid ({ts[0]:.4g} .. {ts[-1]:.4g}); "
                     f"widen --temperatures")
    missing = max(r["tokens_without_target"])
    if missing:
        lines.append(
            f"lambda=1 gives ppl inf: {missing:,} of {r['count']:,} tokens ({100 * missing / r['count']:.2f}%) "
            f"have no retrieved neighbor carrying their target"
            + (f" among the {r['k_kept']} exported" if r["approximate_temperatures"] else "")
        )
    lines += ["", "perplexity by temperature (rows, * = the run's) and lambda (columns):",
              table(r, table_lambdas)]
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(
        prog="knnlm-tune",
        description="Grid-search the kNN-LM interpolation weight lambda and the softmax temperature "
                    "on a per-token export (--knnlm-dump-probs), without re-running the model.",
    )
    p.add_argument("export_dir", metavar="EXPORT_DIR")
    p.add_argument("--lambdas", default=DEFAULT_LAMBDAS,
                   help="START:STOP:STEP (STOP included) or a comma list, within [0, 1] (default %(default)s)")
    p.add_argument("--temperatures",
                   help="comma list of temperatures (default: 13 values T_run * 2**(j/2), j = -6..6, "
                        "i.e. T_run/8 to 8 T_run, T_run included)")
    p.add_argument("--table-lambdas", default=DEFAULT_TABLE_LAMBDAS,
                   help="lambda columns of the printed table (default %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="write perplexity vs lambda, one curve per temperature")
    p.add_argument("--json", metavar="JSON", help="write the best point and the whole grid")
    p.add_argument("--overwrite", action="store_true", help="replace a --json/--plot file this library did not write")
    return p


def _run(args):
    lambdas = parse_lambdas(args.lambdas)
    table_lambdas = parse_lambdas(args.table_lambdas, "--table-lambdas")
    temperatures = parse_temperatures(args.temperatures) if args.temperatures else None
    result = tune(load_export(args.export_dir), lambdas, temperatures)
    print(report(result, table_lambdas))
    write_outputs(args.json, lambda: to_json(result), args.plot, lambda p: plot(result, p), prog=args.prog,
                  overwrite=args.overwrite)


def main(argv=None):
    return run_command("knnlm-tune", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
