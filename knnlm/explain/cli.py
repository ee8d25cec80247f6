"""knnlm-explain: a kNN-LM export as a self-contained HTML page, token by token.

    knnlm-explain EXPORT --datastore PREFIX (--dict DICT.txt | --tokenizer PATH) -o report.html

EXPORT: a `--knnlm-dump-probs` directory written with `--knnlm-dump-ids` (fairseq-eval-lm or
knnlm-hf eval); PREFIX: the datastore it was scored against (a prefix, a shard manifest, a
pruned or reduced datastore); DICT.txt: the fairseq dictionary of the data, or PATH: the Hugging
Face tokenizer. This module is a tool on top of the core (it may load the Hugging Face
vocabulary, knnlm/hf/vocab.py); the rest of knnlm/explain is core.
"""

import argparse
import logging
import os
import sys
import time

from ..errors import KNNLMError
from . import page, report, source, summaries
from .vocab import read_dict

PROG = "knnlm-explain"


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("export", metavar="EXPORT", help="export directory (--knnlm-dump-probs, with --knnlm-dump-ids)")
    p.add_argument("--datastore", required=True, metavar="PREFIX", help="the datastore the export was scored against")
    v = p.add_mutually_exclusive_group(required=True)
    v.add_argument("--dict", metavar="DICT.txt", help="fairseq dictionary (the data-bin's dict.txt)")
    v.add_argument("--tokenizer", metavar="PATH", help="Hugging Face tokenizer (directory)")
    p.add_argument("-o", "--output", required=True, metavar="HTML", help="the page to write")
    p.add_argument("--neighbors", type=int, default=8, help="neighbors listed per token (default %(default)s)")
    p.add_argument("--context", type=int, default=16,
                   help="datastore tokens shown before each neighbor (default %(default)s)")
    p.add_argument("--max-ngram", type=int, default=summaries.MAX_NGRAM,
                   help="longest context n-gram looked up in the datastore (default %(default)s)")
    p.add_argument("--page-tokens", type=int, default=page.PAGE_TOKENS,
                   help="tokens per page of the text view (default %(default)s)")
    p.add_argument("--title", help="the page's title")
    return p


def load_vocab(args):
    if args.dict:
        return read_dict(args.dict)
    from ..hf.vocab import read_tokenizer

    return read_tokenizer(args.tokenizer)


def run(args):
    from ..errors import ConfigError

    for name in ("neighbors", "context", "max_ngram", "page_tokens"):
        value, top = getattr(args, name), page.LIMITS.get(name)
        if value < 1 or (top is not None and value > top):
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1{f' and at most {top}' if top else ''}, "
                              f"got {value}")
    t0 = time.time()
    say = lambda msg: print(f"{PROG}: {msg} ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)  # noqa: E731
    vocab = load_vocab(args)
    sources = source.open_sources(args.export, args.datastore, vocab)
    rep = report.build(sources, neighbors=args.neighbors, context=args.context, max_ngram=args.max_ngram,
                       progress=say)
    say("writing the page")
    out = os.path.abspath(args.output)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        size = page.write(rep, vocab, tmp, page_tokens=args.page_tokens, title=args.title)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    m = rep.meta
    print(f"wrote {out}: {m['tokens']:,} tokens, perplexity {m['ppl_lm']:.2f} -> {m['ppl_knnlm']:.2f}, "
          f"{size / 2**20:.1f} MiB, {time.time() - t0:.1f} s")
    return rep


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(format=f"{PROG}: %(message)s", level=logging.WARNING)
    try:
        run(args)
    except KNNLMError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
