"""The continuous cache (Grave et al., 2017) of an evaluation, and tuning its lambda and theta
on one evaluation (`--cache-grid-json`), for every front-end.

`ContinuousCache` holds the settings; a front-end hands it one `CacheBatch` per batch (the
states and next tokens of its rows, which positions are scored and which remembered) and gets
log p_cache(target) of the scored positions at the run's theta and at every theta of the grid.

Theta changes p_cache itself, so a grid over theta needs the cache distribution at each theta:
the scorer computes the cache's dot products once per batch and p_cache(target) at every theta
of the grid (`knnlm.scoring.continuous_cache_log_probs`); lambda is a mix, so each (lambda,
theta) cell only adds log(lambda p_cache + (1 - lambda) p_base) over the scored tokens. Two
bases: the LM alone ("lm": the +continuous cache row of Table 1) and, with --knnlm, the kNN-LM
at the run's --lmbda ("knn": the +kNN-LM + continuous cache row). One pass over valid tunes both.
"""

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from .errors import ConfigError
from .offline.rescoring import parse_lambdas, parse_temperatures, write_outputs
from .scoring import check_lambda, continuous_cache_log_probs


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


@dataclasses.dataclass
class CacheBatch:
    """One batch as the cache sees it: B rows of T positions.

    keys (B, T, D): the state the cache compares at each position; targets (B, T): the token
    each position predicts; scored (B, T) bool: the positions scored; memory (B, T) bool or
    None: the positions remembered (None: every position with a real target); memory_targets
    (B, T) or None: what follows each remembered position where that differs from `targets`
    (fairseq pads its context window's targets); rows, cols (N,): the scored positions, in the
    order of the front-end's N scored tokens.
    """

    keys: torch.Tensor
    targets: torch.Tensor
    scored: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    memory: Optional[torch.Tensor] = None
    memory_targets: Optional[torch.Tensor] = None


def check_cache_options(opts):
    """The continuous cache's own numbers (`knnlm.options.CacheOptions`)."""
    uses = [f for f in ("cache_keytype", "cache_grid_json") if getattr(opts, f, None)]
    if opts.cache_include_context:
        uses.append("cache_include_context")
    if not opts.continuous_cache:
        if uses:
            raise ConfigError(f"--{uses[0].replace('_', '-')} is an option of the continuous cache: add --continuous-cache")
        return
    check_lambda(opts.cache_lmbda, "--cache-lmbda")
    if not math.isfinite(opts.cache_theta):
        raise ConfigError(f"--cache-theta must be finite, got {opts.cache_theta}")
    if opts.cache_size is not None and opts.cache_size < 1:
        raise ConfigError(f"--cache-size must be at least 1, got {opts.cache_size}")
    if opts.cache_grid_json:
        parse_grid(opts.cache_grid_lambdas, opts.cache_grid_thetas)


class ContinuousCache:
    """The cache's settings for one run (`CacheOptions`), its grid if tuning, and its keytype."""

    def __init__(self, opts, keytype, with_knn=False):
        check_cache_options(opts)
        self.lmbda, self.theta, self.size = opts.cache_lmbda, opts.cache_theta, opts.cache_size
        self.keytype = opts.cache_keytype or keytype
        self.include_context = bool(opts.cache_include_context)
        self.grid_json = opts.cache_grid_json
        self.grid = (CacheGrid(opts.cache_grid_lambdas, opts.cache_grid_thetas, with_knn=with_knn)
                     if opts.cache_grid_json else None)
        self.custom_keytype = bool(opts.cache_keytype)

    def log_probs(self, batch):
        """[(N,) log p_cache(target) at the run's theta, then at each theta of the grid]."""
        thetas = [self.theta] + (list(self.grid.thetas) if self.grid is not None else [])
        memory = batch.memory if batch.memory is not None else batch.scored.new_ones(batch.scored.shape)
        lps = continuous_cache_log_probs(batch.keys, batch.targets, batch.scored, thetas, self.size,
                                         memory=memory, memory_targets=batch.memory_targets)
        return [lp[batch.rows.to(lp.device), batch.cols.to(lp.device)] for lp in lps]

    def describe(self):
        text = f"continuous cache lambda={self.lmbda}, theta={self.theta}"
        if self.custom_keytype or self.include_context:
            text += (f", {self.keytype} states, memory {self.size or 'the whole sample'}"
                     f"{' including the context window' if self.include_context else ''}")
        return text
