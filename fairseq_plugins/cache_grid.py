"""Tuning the continuous cache's lambda and theta on one evaluation (`--cache-grid-json`).

Theta changes p_cache itself, so a grid over theta needs the cache distribution at each theta:
the scorer computes the cache's dot products once per batch and p_cache(target) at every theta
of the grid (`knnlm.scoring.continuous_cache_log_probs`); lambda is a mix, so each (lambda,
theta) cell only adds log(lambda p_cache + (1 - lambda) p_base) over the scored tokens. Two
bases: the LM alone ("lm": the +continuous cache row of Table 1) and, with --knnlm, the kNN-LM
at the run's --lmbda ("knn": the +kNN-LM + continuous cache row). One pass over valid tunes both.
"""

import math

import numpy as np
import torch

from knnlm.offline.rescoring import write_outputs
from knnlm.errors import ConfigError
from knnlm.offline.rescoring import parse_lambdas, parse_temperatures


def parse_grid(lambdas, thetas):
    lam = parse_lambdas(lambdas, "--cache-grid-lambdas")
    th = parse_temperatures(thetas, "--cache-grid-thetas")  # positive finite numbers, sorted
    if not lam or not th:
        raise ConfigError("--cache-grid-lambdas and --cache-grid-thetas need at least one value each")
    return [float(x) for x in lam], [float(x) for x in th]


class CacheGrid:
    def __init__(self, lambdas, thetas, with_knn=False):
        self.lambdas, self.thetas = parse_grid(lambdas, thetas)
        self.bases = ("lm", "knn") if with_knn else ("lm",)
        self.sums = {b: np.zeros((len(self.thetas), len(self.lambdas))) for b in self.bases}
        self.tokens = 0
        lam = torch.tensor(self.lambdas, dtype=torch.float32)
        self._log_lam = torch.log(lam).unsqueeze(1)        # (L, 1); -inf at lambda 0
        self._log_rest = torch.log1p(-lam).unsqueeze(1)    # -inf at lambda 1

    def add(self, lp_caches, bases):
        """lp_caches: one (N,) log p_cache per theta; bases: {name: (N,) log p} over the same tokens."""
        self.tokens += int(next(iter(bases.values())).numel())
        for i, lp in enumerate(lp_caches):
            lp = lp.float().unsqueeze(0)
            dev = lp.device
            for name, base in bases.items():
                mixed = torch.logaddexp(lp + self._log_lam.to(dev), base.float().to(dev).unsqueeze(0) + self._log_rest.to(dev))
                self.sums[name][i] += mixed.sum(dim=1).double().cpu().numpy()

    def result(self):
        out = {"lambdas": self.lambdas, "thetas": self.thetas, "tokens": self.tokens}
        for name in self.bases:
            ppl = np.exp(-self.sums[name] / max(self.tokens, 1))
            i, j = np.unravel_index(np.nanargmin(np.where(np.isfinite(ppl), ppl, np.inf)), ppl.shape)
            out[name] = {"ppl": [[float(x) if math.isfinite(x) else None for x in row] for row in ppl],
                         "without_cache_ppl": float(ppl[0, self.lambdas.index(0.0)]) if 0.0 in self.lambdas else None,
                         "best_lambda": self.lambdas[j], "best_theta": self.thetas[i], "best_ppl": float(ppl[i, j])}
        return out

    def write(self, path, meta=None, overwrite=False):
        """Write the grid as JSON (knnlm.offline.rescoring.write_outputs: a file this library did
        not write is replaced only with overwrite, and only once the new one is whole)."""
        r = dict(self.result(), **(meta or {}), complete=True)
        write_outputs(path, lambda: r, None, None, prog=f"--cache-grid-json {path}", overwrite=overwrite,
                      announce=False, option="--overwrite (or choose another --cache-grid-json path)")
        what = {"lm": "LM + cache", "knn": "kNN-LM + cache"}
        return [f"cache grid ({what[b]}, {self.tokens} tokens): best lambda={r[b]['best_lambda']}, "
                f"theta={r[b]['best_theta']}, perplexity {r[b]['best_ppl']:.4f}; grid in {path}" for b in self.bases]
