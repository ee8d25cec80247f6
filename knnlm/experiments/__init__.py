"""Experiments built on the core: the Austen demo, the paper's analyses, the corpus they use.

They drive fairseq's command-line tools and depend on the core; the core never imports them.

    demo.py      make demo: corpus, LM, datastore, index, tuning, results table
    analyses/    make analyses: the paper's figures and tables on the demo's artefacts (plan, runner, report, plots)
    corpora/     the Jane Austen corpus
"""
