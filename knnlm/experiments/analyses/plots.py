"""The analyses' plots (matplotlib's Figure, no pyplot state): each from the numbers its table shows."""

import math

from .settings import APPROX, fkey
from .tables import _curve


def plot_keytypes(data, base, path):
    """Table 5's perplexity by key type, lambda and T tuned and lambda alone."""
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
    fig.savefig(path, dpi=120)


def plot_approx(data, fractions, base, t_run, path):
    """Exact vs approximate neighbors and scores by datastore fraction."""
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
    fig.savefig(path, dpi=120)


def plot_curves(curves, path, title, relative, temps=(None,)):
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


def plot_beyond(rows, path):
    """Rows (a)-(e) of analysis 7: perplexity vs datastore entries, valid and test."""
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
    fig.savefig(path, dpi=120)
