"""Re-scoring shared by knnlm-tune and the sweeps: perplexity from per-token log-probabilities,
the consistency check of an export, the lambda/temperature grids, and writing results."""

import json
import math

import numpy as np
import torch

from ..artefacts import AtomicOutput
from ..errors import ConfigError, CorruptError, KNNLMError
from ..scoring import check_lambda, check_temperature, interpolate

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
