"""The summaries' plots as small inline PNGs (base64 data URIs: the page fetches nothing)."""

import base64
import io

import numpy as np

BLUE, RED, GREY = "#2166ac", "#b2182b", "#999999"


def _figure(width=5.2, height=2.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=90)
    return plt, fig, ax


def _data_uri(plt, fig):
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def group_bars(rows, xlabel):
    """Mean gain per group (bars, blue up / red down), the group's share of tokens written above."""
    plt, fig, ax = _figure()
    labels = [r["group"] for r in rows]
    means = [0.0 if r["tokens"] == 0 else r["mean_gain"] for r in rows]
    ax.bar(range(len(rows)), means, color=[BLUE if m >= 0 else RED for m in means])
    for x, r in enumerate(rows):
        ax.annotate(f"{100 * r['token_share']:.0f}%", (x, means[x]), ha="center",
                    va="bottom" if means[x] >= 0 else "top", fontsize=7)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(rows)), labels, fontsize=7, rotation=30 if len(rows) > 7 else 0)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("mean gain (nats)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    return _data_uri(plt, fig)


def gain_histogram(gain, scale):
    """Histogram of the per-token gains (clipped to +-2 scale), log counts."""
    plt, fig, ax = _figure()
    g = np.clip(np.asarray(gain, np.float64), -2 * scale, 2 * scale)
    g = g[np.isfinite(g)]
    bins = np.linspace(-2 * scale, 2 * scale, 41)
    counts, edges = np.histogram(g, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    ax.bar(centers, counts, width=edges[1] - edges[0], color=[BLUE if c > 0 else RED for c in centers],
           log=True)
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_xlabel(f"gain log p_kNN-LM - log p_LM (nats, clipped to +-{2 * scale:g})", fontsize=8)
    ax.set_ylabel("tokens", fontsize=8)
    ax.tick_params(labelsize=7)
    return _data_uri(plt, fig)


def top_dumbbells(labels, p_lm, p_final):
    """p_LM -> p_kNN-LM for a few tokens (the paper's Figure 6 kind)."""
    plt, fig, ax = _figure(height=0.25 * len(labels) + 0.9)
    y = np.arange(len(labels))[::-1]
    for yi, a, b in zip(y, p_lm, p_final):
        ax.annotate("", (b, yi), (a, yi), arrowprops={"arrowstyle": "->", "color": BLUE if b >= a else RED})
    ax.scatter(p_lm, y, color=GREY, s=12, label="p_LM", zorder=3)
    ax.scatter(p_final, y, color=BLUE, s=12, label="p_kNN-LM", zorder=3)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("probability of the target", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")
    return _data_uri(plt, fig)
