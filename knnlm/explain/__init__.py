"""The neighbor explorer (`knnlm-explain`): where the kNN-LM helps, token by token.

    source.py     the export, its datastore (the text each neighbor came from) and a vocabulary, checked together
    vocab.py      a fairseq dict.txt read as token strings (a Hugging Face tokenizer: knnlm/hf/vocab.py)
    summaries.py  the math of the summaries (gains, frequency and n-gram buckets, helps vs hurts, ranks)
    page.py       the self-contained HTML page
    cli.py        the command line (a tool on top of the core: it may pick the Hugging Face vocabulary)
"""
