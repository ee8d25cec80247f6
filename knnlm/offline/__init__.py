"""Work on per-token exports, without re-running the model.

    export.py     ExportWriter / load_export (--knnlm-dump-probs), re-scoring at other temperatures
    rescoring.py  perplexity, consistency check, grids, writing results (shared by the two below)
    tune.py       knnlm-tune: lambda and temperature grid search
    sweeps.py     perplexity vs k and vs datastore size (the paper's Figures 2 and 4)
    prune.py      knnlm-prune: the index's neighbors for knnlm.store.prune's greedy merging
"""
