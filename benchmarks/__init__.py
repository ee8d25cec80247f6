"""The benchmarks, one module each; run them from the repository root as `python -m benchmarks.NAME`
(benchmarks/README.md). What they share is `benchmarks.common`."""
