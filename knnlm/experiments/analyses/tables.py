"""Table cells and readings of a knnlm-tune JSON, shared by the report and its plots."""

import math


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
