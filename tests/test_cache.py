"""The continuous cache through fairseq-eval-lm: it changes only what it should, and adds to kNN-LM."""

import math

import pytest

from .conftest import eval_lm, knn_summary
from .test_generation_check import dumped  # noqa: F401  (shared module fixture)

COMMON = ("--gen-subset", "test", "--tokens-per-sample", "64", "--context-window", "32")


def knn(d, *args):
    """stdout and stderr together: fairseq's logging goes to either, depending on import order."""
    p = eval_lm(d["data"], d["ckpt"], *COMMON, "--knnlm", "--dstore-filename", d["prefix"],
                "--indexfile", d["index"], "--k", "8", *args)
    return p.stdout + p.stderr


def test_cache_alone_and_with_knn(dumped):  # noqa: F811
    base, lm_only = knn_summary(knn(dumped, "--lmbda", "0"))
    assert lm_only == pytest.approx(base, abs=1e-4)
    _, cache_only = knn_summary(knn(dumped, "--lmbda", "0", "--continuous-cache",
                                    "--cache-lmbda", "0.2", "--cache-theta", "0.1"))
    _, knn_only = knn_summary(knn(dumped, "--lmbda", "0.3"))
    _, both = knn_summary(knn(dumped, "--lmbda", "0.3", "--continuous-cache",
                              "--cache-lmbda", "0.2", "--cache-theta", "0.1"))
    for ppl in (cache_only, knn_only, both):
        assert math.isfinite(ppl)
    assert cache_only != pytest.approx(base, abs=1e-3)  # the cache does something
    assert both != pytest.approx(knn_only, abs=1e-3)
    # The cache works without a datastore too, and equals the kNN-LM run at lambda = 0.
    p = eval_lm(dumped["data"], dumped["ckpt"], *COMMON, "--continuous-cache",
                "--cache-lmbda", "0.2", "--cache-theta", "0.1")
    assert knn_summary(p.stdout + p.stderr)[1] == pytest.approx(cache_only, abs=1e-4)
    # cache lambda 0 is the kNN-LM exactly
    _, zero = knn_summary(knn(dumped, "--lmbda", "0.3", "--continuous-cache", "--cache-lmbda", "0"))
    assert zero == pytest.approx(knn_only, abs=1e-4)


def test_cache_options_checked(dumped):  # noqa: F811
    p = eval_lm(dumped["data"], dumped["ckpt"], *COMMON, "--knnlm", "--dstore-filename", dumped["prefix"],
                "--indexfile", dumped["index"], "--continuous-cache", "--cache-lmbda", "1.5", check=False)
    assert p.returncode != 0 and "--cache-lmbda must lie in [0, 1]" in p.stderr
