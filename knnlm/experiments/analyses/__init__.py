"""The kNN-LM paper's analyses on the demo's data (Jane Austen).

    python -m knnlm.experiments.analyses [--config YAML] [--austen-dir DIR] [key=value ...] [demo.key=value ...]

Runs the demo's steps first (skipped when done: knnlm.demo), then, reusing its LM, datastore,
index and valid-set export:

  k        perplexity vs k (Figure 4): knnlm.sweeps on the demo's k=1024 export; lambda fixed
           at the demo's tuned value and tuned per k, T fixed at the demo's tuned value
  lambda   perplexity vs lambda and T (Figure 5): knnlm-tune on that export
  size     perplexity and the tuned lambda vs datastore size (Figure 2a/2b): knnlm.subset
           fractions, each indexed (knnlm-build-index) and exported
  keytype  the six key types (Table 5): dump, index, export, tune per key type, all dumped
           from the same random sample of the training text
  approx   exact vs approximate neighbors and scores (Xu et al. 2023, Table 3, Figure 4): per
           datastore fraction, FAISS's neighbors with FAISS's quantized distances
           (do_not_recomp_l2) or with recomputed exact L2 (l2), and the exact neighbors
           (--knn-search exact) with exact L2; each tuned, and at T = 1
  domain   domain adaptation (Table 4, Figure 5 right): an LM trained on three books, a
           datastore of a book it never saw, lambda/T tuned on a held-out book, scored on another
  beyond   a datastore beyond the training data (Section 4.2, Table 3, Figure 2): an LM trained
           on two of the four training books (the demo's dictionary and training compute), alone,
           with a datastore of its own training text and of all four books, vs the demo's LM
           alone and with its datastore; valid and test

Writes DEMO_WORKDIR/analyses/results.md (+ results.json) with every number, PNG plots beside
it, every tool's output in analyses/logs/. Each stage is a knnlm.demo.Step: skipped when its
outputs exist and its stamp (analyses/.steps/NAME.json) records the same settings, those of
the steps it builds on and of the demo included. Settings: configs/demo/analyses.yaml.

    settings.py  the analyses, their titles, the papers' numbers; loading both configs
    text.py      token counts, slices and seeded samples of text lines
    runner.py    running a tool for a step: its own process, or this one (fairseq-eval-lm, knnlm-tune)
    plan.py      Analyses: each analysis as steps; running the demo's steps, the plan, the report
    report.py    Report: results.md and results.json, a section per analysis
    tables.py    table cells and readings of a knnlm-tune JSON
    plots.py     the PNG plots
    cli.py       the command line (`python -m knnlm.experiments.analyses`, make analyses)
"""

from ..demo import DemoError, parse_summary
from .cli import build_parser, main
from .plan import Analyses
from .report import Report
from .runner import InProcessDemo, ToolRunner
from .settings import (ANALYSES, APPROX, APPROX_PAPER, BEYOND_PAPER, DEFAULT_CONFIG, DEMO_LAST_STEP, KEYTYPE_PAPER,
                       TABLE_LAMBDAS, TITLES, beyond_books, demo_lambdas, fkey, load_configs)
from .text import head_lines, n_tokens, read_lines, sample_chunks, write_lines

__all__ = [
    "ANALYSES", "APPROX", "APPROX_PAPER", "BEYOND_PAPER", "DEFAULT_CONFIG", "DEMO_LAST_STEP", "KEYTYPE_PAPER",
    "TABLE_LAMBDAS", "TITLES", "Analyses", "DemoError", "InProcessDemo", "Report", "ToolRunner", "beyond_books",
    "build_parser", "demo_lambdas", "fkey", "head_lines", "load_configs", "main", "n_tokens", "parse_summary",
    "read_lines", "sample_chunks", "write_lines",
]
