"""Re-scoring shared by knnlm-tune and the sweeps: perplexity from per-token log-probabilities,
the consistency check of an export, the lambda/temperature grids, and writing results."""

import json
import logging
import math

import numpy as np
import torch

from ..artefacts import AtomicOutput
from ..errors import ConfigError, CorruptError
from ..scoring import check_lambda, check_temperature, interpolate, knn_log_prob, neighbor_scores

logger = logging.getLogger(__name__)

DEFAULT_LAMBDAS = "0:1:0.01"
# Stored and re-scored lp_knn at the run's temperature must agree this closely (fp32 rounding
# of a logsumexp over up to a few thousand neighbors stays far below it), plus the rounding of
# fp32 scores where they are large (see check_consistent).
CONSISTENCY_ATOL = 1e-4


def parse_lambdas(text, name="--lambdas"):
    """'START:STOP:STEP' (STOP included) or a comma list -> sorted unique values in [0, 1]."""
    try:
        if ":" in text:
            start, stop, step = (float(x) for x in text.split(":"))
            if not step > 0 or stop < start:
                raise ValueError
            n = (stop - start) / step
            if abs(n - round(n)) > 1e-6:
                raise ConfigError(f"{name} {text}: STEP does not divide STOP - START")
            # Rounded so that 0.1 * 3 prints and compares as 0.3.
            values = [round(start + i * step, 12) for i in range(int(round(n)) + 1)]
        else:
            values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be START:STOP:STEP or a comma list of numbers, got {text!r}") from None
    return _checked(values, name, check_lambda)


def parse_temperatures(text, name="--temperatures"):
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be a comma list of numbers, got {text!r}") from None
    return _checked(values, name, check_temperature)


def _checked(values, name, check):
    """Sorted unique values, each passing `check`; an empty list is an error."""
    if not values:
        raise ConfigError(f"{name} is empty")
    for v in values:
        check(v, name)
    return sorted(set(values))


def perplexity(lp_lm, lp_knn, lmbda):
    """(ppl, number of tokens of probability 0) for one lambda; both vectors are torch fp32."""
    lp = interpolate(lp_lm, lp_knn, lmbda)
    n_zero = int(torch.isneginf(lp).sum())
    if n_zero:
        return math.inf, n_zero
    return math.exp(-float(lp.double().mean())), 0


def check_consistent(export, recomputed):
    """Re-scored lp_knn at the run's temperature must reproduce the stored one."""
    stored = np.asarray(export.lp_knn)
    inf_s, inf_r = np.isneginf(stored), np.isneginf(recomputed)
    if (inf_s != inf_r).any():
        i = int(np.argmax(inf_s != inf_r))
        raise CorruptError(
            f"export {export.path} is inconsistent: at token {i} the stored lp_knn is {stored[i]} "
            f"but its distances and matches give {recomputed[i]} (does any neighbor carry the "
            f"target?). Its files do not belong together; export again."
        )
    finite = np.flatnonzero(~inf_s)
    diff = np.abs(stored[finite].astype(np.float64) - recomputed[finite])
    big = diff > CONSISTENCY_ATOL
    if big.any():
        # fp32 scores s/T carry rounding of about eps |s/T| each (large distances, T = 1: ~1e-4
        # already); lp_knn may inherit up to twice the largest. Allow that much beyond the atol.
        rows = finite[big]
        scale = np.nanmax(np.abs(np.asarray(export.dists[rows], dtype=np.float64)), axis=1)
        allowed = CONSISTENCY_ATOL + 4 * np.finfo(np.float32).eps * scale / export.meta["temperature"]
        excess = diff[big] / allowed
        if excess.max() > 1:
            j = int(np.argmax(excess))
            i = int(rows[j])
            raise CorruptError(
                f"export {export.path} is inconsistent: re-scoring its distances at the run's "
                f"temperature T = {export.meta['temperature']:g} gives lp_knn {recomputed[i]:.6f} at "
                f"token {i}, which differs from its stored lp_knn {stored[i]:.6f} (|diff| "
                f"{diff[big][j]:.2e} > {allowed[j]:.2e}); wrong sim_func/temperature in meta.json, "
                f"or distances other than those scored. Export again."
            )
    return float(diff.max()) if diff.size else 0.0




def best_lambda(lp_lm, lp_knn, lambdas):
    """(lambda, perplexity) of the lowest perplexity on the grid (the first one on ties)."""
    ppls = [perplexity(lp_lm, lp_knn, lam)[0] for lam in lambdas]
    j = int(np.argmin(ppls))
    return float(lambdas[j]), ppls[j]


def json_safe(x):
    """JSON has no inf: infinite perplexities become null (in nested dicts and lists too)."""
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return None if isinstance(x, float) and math.isinf(x) else x


# A result this library wrote says so: a JSON field, a PNG text chunk (matplotlib's metadata).
WRITTEN_BY = "knnlm"
PNG_METADATA = {"Software": WRITTEN_BY}


def written_by_us(path):
    """Whether the file at `path` is a result (JSON or PNG) one of our commands wrote: only such
    a file is replaced without --overwrite."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    if head.startswith(b"\x89PNG"):
        return b"Software\x00" + WRITTEN_BY.encode() in head
    try:
        obj = json.loads(head.decode()) if len(head) < (1 << 16) else json.load(open(path))
    except (ValueError, UnicodeDecodeError, OSError):
        return False
    return isinstance(obj, dict) and str(obj.get("written_by", "")).startswith(WRITTEN_BY)


def write_outputs(json_path, result_json, plot_path, plot, *, prog="knnlm", overwrite=False, announce=True,
                  option="--overwrite"):
    """Write the --json and --plot files a command was asked for, naming each: under temporary
    names, moved into place together once both are whole. A file already there is replaced only
    if one of our commands wrote it (its own earlier result), or with --overwrite."""
    targets = [p for p in (json_path, plot_path) if p]
    if not targets:
        return
    output = AtomicOutput(targets, what=prog, overwrite=overwrite, replaceable=written_by_us, option=option,
                          describe_existing=lambda p: f"{p} already exists and is not a result this library wrote",
                          make_dirs=False)
    with output:
        if json_path:
            obj = {**result_json(), "written_by": f"{WRITTEN_BY} ({prog})"}
            with open(output.path(json_path), "w") as f:
                json.dump(obj, f, indent=2, sort_keys=True, default=str)
        if plot_path:
            plot(output.path(plot_path))
        output.commit()
    for path in targets if announce else ():
        print(f"wrote {path}")


# ----------------------------------------------------------------------------- p_kNN re-scored from an export
# Elements of (rows, K) per re-scoring chunk: 4 MB of fp32 per temporary, about cache-sized.
CHUNK_ELEMENTS = 1 << 20

def _chunk_rows(k):
    return max(1, CHUNK_ELEMENTS // max(k, 1))


def _lp_knn_exact(d, m, valid, sim_func, temperature):
    # knn_log_prob compares neighbor values with targets; `match` already is that comparison.
    ones = torch.ones(len(m), dtype=torch.bool)
    return knn_log_prob(neighbor_scores(d, sim_func, temperature), m, ones, valid)


def _lp_knn_chunk(dists, match, sim_func, temperatures):
    """log p_kNN for one (rows, K) chunk at each temperature.

    knn_log_prob costs ~10 passes over the (rows, K) scores per temperature; here the scores
    are shifted by their row maximum once, after which each temperature is one exp pass and
    two sums: log p_kNN = log sum_match e^(x/T) - log sum_all e^(x/T), x = s - max s <= 0, so
    the normalizer lies in [1, K] and cannot over- or underflow. Only the matched sum can
    underflow (every matching neighbor far from the nearest at a low T): those rows, and any
    non-finite one, are redone with knn_log_prob itself. Tests hold this equal to it.
    """
    # Copies: the memory map is read-only, torch wants writable memory.
    d = torch.from_numpy(np.array(dists, dtype=np.float32))
    m = torch.from_numpy(np.array(match, dtype=np.bool_))
    valid = ~torch.isnan(d)
    if valid.all():
        valid = None  # nothing to mask
    else:
        d = d.nan_to_num(0.0)
        m = m & valid
    s = neighbor_scores(d, sim_func, 1.0)  # scoring's sign convention; s / T is its score at T
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    x = s - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mf = m.float()
    has_match = mf.amax(dim=-1) > 0
    buf = torch.empty_like(x)
    out = []
    for t in temperatures:
        torch.div(x, t, out=buf)
        buf.exp_()  # missing neighbors: exp(-inf) = 0
        matched = torch.linalg.vecdot(buf, mf)
        lp = matched.log() - buf.sum(dim=-1).log()
        lp = lp.masked_fill(~has_match, float("-inf"))  # also rows with no neighbor at all
        redo = has_match & ~(matched >= 1e-30) | torch.isnan(lp)  # NaN compares False: redone
        if redo.any():
            lp[redo] = _lp_knn_exact(d[redo], m[redo], None if valid is None else valid[redo], sim_func, t)
        out.append(lp.numpy())
    return out


def lp_knn_grid(export, temperatures, rows=slice(None)):
    """log p_kNN(target) at each temperature: (len(temperatures), n) float32.

    Re-scores from the stored distances and matches in chunks (memory is bounded whatever N
    and K); each chunk is read once for all temperatures. When the export kept fewer
    neighbors than the run used (K < k), this is the softmax over the K nearest only: an
    approximation of what a run at that temperature would give (a warning says so).
    """
    if not export.has_neighbors:
        raise ConfigError(
            f"export {export.path} has no neighbor distances, so p_kNN cannot be re-scored at "
            f"another temperature; only the run's own (T = {export.meta['temperature']}) is available"
        )
    temperatures = [float(t) for t in temperatures]
    for t in temperatures:
        check_temperature(t, "temperature")
    if export.truncated and not export._warned:
        logger.warning(
            "export %s kept %d of the run's %d neighbors: p_kNN re-scored at a new temperature "
            "uses only those %d, an approximation (the stored lp_knn, at T = %g, is exact)",
            export.path, export.k_kept, export.k, export.k_kept, export.meta["temperature"])
        export._warned = True
    sel = np.arange(export.count)[rows]
    contiguous = isinstance(rows, slice) and rows.step in (None, 1)
    out = np.empty((len(temperatures), len(sel)), dtype=np.float32)
    step = _chunk_rows(export.k_kept)
    for s in range(0, len(sel), step):
        part = sel[s:s + step]
        if contiguous:  # a plain slice of the memory map: no fancy-index copy
            lo, hi = int(part[0]), int(part[-1]) + 1
            d, m = export.dists[lo:hi], export.match[lo:hi]
        else:
            d, m = export.dists[part], export.match[part]
        for i, lp in enumerate(_lp_knn_chunk(d, m, export.meta["sim_func"], temperatures)):
            out[i, s:s + len(part)] = lp
    return out


def lp_knn_at(export, temperature, rows=slice(None)):
    """log p_kNN(target) re-scored at `temperature` for `rows` (a slice, index or mask): (n,) float32.

    Exact when the export kept all the run's neighbors; with K kept < k an approximation
    (see `lp_knn_grid`).
    """
    return lp_knn_grid(export, [temperature], rows)[0]


def same_temperature(a, b):
    return math.isclose(a, b, rel_tol=1e-9)
