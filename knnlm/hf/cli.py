"""knnlm-hf: kNN-LM for Hugging Face causal LMs: dump, eval, generate, check.

    knnlm-hf dump --model gpt2 --text train.txt --dstore-mmap dstore/train
    knnlm-build-index dstore_mmap=dstore/train faiss_index=dstore/knn.index
    knnlm-hf eval --model gpt2 --text valid.txt --knnlm --dstore-filename dstore/train \\
        --indexfile dstore/knn.index --k 1024 --lmbda 0.25 --knnlm-dump-probs runs/valid_export
    knnlm-tune runs/valid_export
    knnlm-hf generate --model gpt2 --prompt "It is a truth" --knnlm --dstore-filename ... --indexfile ...
    knnlm-hf check --model gpt2 --dstore-filename dstore/train --indexfile dstore/knn.index

A text file is read whole and tokenized as one string, as Hugging Face's "Perplexity of
fixed-length models" guide does with its joined dataset; dump, eval and check walk the same
sliding windows (knnlm/hf/windows.py). The kNN options have fairseq-eval-lm's names and
meanings. Errors print `knnlm-hf: error: ...` and exit 2.
"""

import argparse
import logging
import os
import sys
import warnings

import numpy as np
import torch

from knnlm import Context, DumpSession, options
from knnlm.cache import CacheBatch
from knnlm.checks import Replay, Report, check_artefacts, finish
from knnlm.cli import progress
from knnlm.errors import ConfigError, KNNLMError
from knnlm.evaluation import Evaluation, check_model
from knnlm.retrieval.adaptive import lm_features
from knnlm.timing import timed
from knnlm.retrieval.factory import build
from knnlm.retrieval.registry import load_from_argv
from knnlm.lifecycle import run_main
from knnlm.memorisation import check_memorisation
from knnlm.offline.rescoring import write_outputs

from .hooks import break_into
from .identity import model_identity
from .layers import DEFAULT_KEYTYPE, KEYTYPES, check_keytype, max_positions
from .windows import check_window, run_windows, shard_windows, windows

PROG = "knnlm-hf"


# ----------------------------------------------------------------------------- loading

def _features(lm_log_probs, top_k):
    with timed("features"):
        return lm_features(lm_log_probs, top_k)

def load_model(args):
    """The model (eval mode, on args.device) and its tokenizer, from a directory or a hub name."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum" etc.
    transformers.logging.disable_progress_bar()
    for flag, name in (("--model", args.model), ("--tokenizer", args.tokenizer)):
        if name and _looks_like_path(name) and not os.path.isdir(name):
            raise ConfigError(f"cannot load the tokenizer {args.tokenizer or args.model}: {flag} {name} is no such "
                              f"directory (a local model is a directory written by save_pretrained; a hub name has "
                              f"no leading '/', './' or '~')")
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the tokenizer {args.tokenizer or args.model}: {e}") from None
    kwargs = {}
    if getattr(args, "dtype", "float32") != "float32":  # transformers 5 calls it dtype, 4.x torch_dtype
        major = int(transformers.__version__.split(".")[0])
        kwargs["dtype" if major >= 5 else "torch_dtype"] = getattr(torch, args.dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the model {args.model}: {e}") from None
    return model.to(device(args)).eval(), tokenizer


def _looks_like_path(name):
    return name.startswith(("/", "./", "../", "~")) or os.sep + os.sep in name or name.endswith(os.sep)


def device(args):
    if args.device:
        return torch.device(args.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ref(name):
    """A model or tokenizer as the metadata records it: a directory made absolute (so knnlm-hf check
    finds it from anywhere), a hub name as given."""
    return os.path.abspath(name) if os.path.isdir(name) else name


def read_tokens(path, tokenizer):
    """The file read whole and tokenized as one string (the tokenizer's special tokens added as
    its __call__ adds them): a 1-D int64 tensor."""
    if not os.path.isfile(path):
        raise ConfigError(f"text file {path} not found (--text)")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]  # the mask would be 1s, as long as the text
    return torch.tensor(ids, dtype=torch.long)


def text_windows(args, model, n_tokens):
    max_length = args.max_length or max_positions(model)
    if max_length is None:
        raise ConfigError("the model's config does not give its number of positions: pass --max-length")
    stride = args.stride if args.stride is not None else max(1, max_length // 2)
    check_window(max_length, stride, max_positions(model))
    wins = windows(n_tokens, max_length, stride)
    if not wins:
        raise ConfigError(f"text {args.text} is {n_tokens} token(s) long: no token to score (it needs 2 or more)")
    return wins, max_length, stride


# ----------------------------------------------------------------------------- kNN-LM
def retrieval_options(args):
    return options.from_namespace(options.RetrievalOptions, args)


def check_numbers(args):
    """The commands' own numbers, refused by name before anything loads."""
    for name, low in (("max_length", 1), ("stride", 1), ("batch_size", 1), ("windows", 1), ("max_new_tokens", 1),
                      ("num_beams", 1), ("num_return_sequences", 1), ("top_k", 0)):
        v = getattr(args, name, None)
        if v is not None and v < low:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")
    top_p = getattr(args, "top_p", None)
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"--top-p must be in (0, 1], got {top_p}")
    t = getattr(args, "temperature", None)
    if t is not None and not (t > 0 and np.isfinite(t)):
        raise ConfigError(f"--temperature must be a finite number above 0, got {t}")
    if getattr(args, "num_return_sequences", 1) > 1 and not getattr(args, "do_sample", False) \
            and args.num_return_sequences > args.num_beams:
        raise ConfigError(f"--num-return-sequences {args.num_return_sequences} needs --do-sample or at least as many "
                          f"--num-beams (got {args.num_beams})")


# ----------------------------------------------------------------------------- commands
def cmd_dump(args):
    check_numbers(args)
    check_keytype(args.knn_keytype)
    model, tokenizer = load_model(args)
    ids = read_tokens(args.text, tokenizer)
    wins, max_length, stride = text_windows(args, model, len(ids))
    wins = shard_windows(wins, args.num_shards, args.shard_id)  # issue 25: this shard's windows only
    identity = model_identity(model, tokenizer)
    capture = break_into(model, args.knn_keytype)  # before any file is written: the key type may not apply
    session = DumpSession(
        args.dstore_mmap, keytype=args.knn_keytype, fp16=args.dstore_fp16, overwrite=args.overwrite,
        expected_size=sum(w.scored for w in wins),
        extra={"frontend": PROG, "model": _ref(args.model), "tokenizer": _ref(args.tokenizer or args.model),
               "model_type": model.config.model_type, "text": os.path.abspath(args.text),
               "text_tokens": len(ids), "max_length": max_length, "stride": stride,
               **({"num_shards": args.num_shards, "shard_id": args.shard_id} if args.num_shards > 1 else {})},
    )
    try:
        session.start(identity)
        with progress(total=sum(w.scored for w in wins), desc="dumping", unit="tok") as bar:
            for r in run_windows(model, ids, wins, capture, batch_size=args.batch_size, device=device(args), lm=False):
                session.add(r["keys"].float(), r["targets"])
                bar.update(len(r["targets"]))
        meta = session.finish()
    except BaseException:
        session.abandon()
        raise
    finally:
        capture.remove()
    print(f"datastore {args.dstore_mmap}: {meta['size']:,} entries of dimension {meta['dim']} "
          f"({args.knn_keytype}) from {len(wins):,} windows of {args.text}")
    return 0


def cmd_eval(args):
    check_numbers(args)
    check_keytype(args.knn_keytype)
    cache_opts = options.from_namespace(options.CacheOptions, args)
    if cache_opts.cache_keytype is not None:
        check_keytype(cache_opts.cache_keytype)
    ev = Evaluation.from_options(retrieval_options(args), options.from_namespace(options.ExportOptions, args),
                                 cache_opts, keytype=args.knn_keytype, overwrite=args.overwrite)
    model, tokenizer = load_model(args)
    ids = read_tokens(args.text, tokenizer)
    if ev.knn is not None:  # the text the datastore was dumped from is refused (knnlm.memorisation)
        check_memorisation(ev.knn.retriever.datastore, ids.numpy(), allow=args.knn_allow_same_split,
                           what=f"text {args.text}")
    wins, max_length, stride = text_windows(args, model, len(ids))
    ev.start(model_identity(model, tokenizer), meta={
        "frontend": PROG, "model": args.model, "text": os.path.abspath(args.text), "max_length": max_length,
        "stride": stride})
    needs = ev.needs
    capture = break_into(model, args.knn_keytype) if ev.needs_keys else None
    cache_capture = (break_into(model, ev.cache_keytype)
                     if ev.cache is not None and ev.cache_keytype != args.knn_keytype else None)
    try:
        bar = progress(total=sum(w.scored for w in wins), desc="scoring", unit="tok")

        def finish(window):  # score a window whose retrieval was started (prefetched) earlier
            r, context, handle = window
            ev.score(r.get("keys"), r["targets"], r["lp_lm"], context=context, prefetched=handle,
                     cache=_cache_batch(r, ev.cache.include_context) if ev.cache is not None else None)
            bar.update(len(r["targets"]))

        # Pipelined: window i's search is started before the model runs window i + 1 (the
        # generator's next step), and collected after; a strategy that searches elsewhere (the
        # sharded search's threads or Ray actors) overlaps the two, any other searches at once.
        pending = None
        for r in run_windows(model, ids, wins, capture, batch_size=args.batch_size, device=device(args),
                             with_logits="lm_features" in needs, whole_window=ev.cache is not None,
                             cache_capture=cache_capture):
            n = len(r["targets"])
            context = Context(lengths=[n] if "streams" in needs else None,
                              lm_features=(_features(r.pop("lm_log_probs"), ev.feature_top_k)
                                           if "lm_features" in needs else None),
                              context_tokens=r["context"] if "context_tokens" in needs else None)
            handle = ev.prefetch(r.get("keys"), r["targets"], context)
            if pending is not None:
                finish(pending)
            pending = (r, context, handle)
        if pending is not None:
            finish(pending)
        bar.close()
        lines = ev.finish()
    except BaseException:
        bar.close()  # its line ends before the error's
        ev.abandon()
        raise
    finally:
        for c in (capture, cache_capture):
            if c is not None:
                c.remove()
    for line in lines:
        print(line)
    for line in ev.table():  # for the reader; stdout's last line stays the summary scripts parse
        print(line, file=sys.stderr)
    summary = ev.summary()
    if args.json:
        result = {**summary, "windows": len(wins), "max_length": max_length, "stride": stride,
                  "text": args.text, "text_tokens": len(ids), "setting": ev.setting()}
        if ev.knn is not None:
            knn = ev.knn
            result.update(k=knn.k, lmbda=knn.lmbda, temperature=knn.temperature, sim_func=knn.sim_func,
                          per_token_lambda=knn.per_token_lambda)  # --adaptive-lambda: lmbda is unused
        write_outputs(args.json, lambda: result, None, None, prog=PROG, overwrite=args.overwrite, announce=False)
    return 0


def _cache_batch(r, include_context):
    """One window as the continuous cache sees it: position t predicts input t + 1; the scored
    positions are remembered, with --cache-include-context the window's earlier ones too."""
    inputs, pos = r["inputs"], r["positions"]
    steps = len(inputs) - 1
    targets = inputs[1:].unsqueeze(0)
    scored = torch.zeros((1, steps), dtype=torch.bool, device=inputs.device)
    scored[0, pos] = True
    memory = torch.ones_like(scored) if include_context else scored
    return CacheBatch(r["cache_keys"][:steps].unsqueeze(0), targets, scored, torch.zeros_like(pos), pos,
                      memory=memory)


def cmd_generate(args):
    from transformers import LogitsProcessorList

    from .generation import KNNLogitsProcessor

    check_numbers(args)
    check_keytype(args.knn_keytype)
    opts = retrieval_options(args)
    options.validate(opts)
    knn = build(opts) if opts.knnlm else None
    model, tokenizer = load_model(args)
    processors, capture = [], None
    if knn is not None:
        check_model(knn, model_identity(model, tokenizer), keytype=args.knn_keytype,
                    allow_model_mismatch=opts.knn_allow_model_mismatch)
        capture = break_into(model, args.knn_keytype)
        processors.append(KNNLogitsProcessor(knn, capture))
    enc = tokenizer(args.prompt, return_tensors="pt").to(device(args))
    torch.manual_seed(args.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        with torch.no_grad():
            out = model.generate(
                **enc, logits_processor=LogitsProcessorList(processors), max_new_tokens=args.max_new_tokens,
                do_sample=args.do_sample, num_beams=args.num_beams, top_k=args.top_k, top_p=args.top_p,
                temperature=args.temperature, num_return_sequences=args.num_return_sequences,
                pad_token_id=pad if pad is not None else 0,
            )
    finally:
        if capture is not None:
            capture.remove()
        if knn is not None:
            knn.close()
    for seq in out:
        print(tokenizer.decode(seq, skip_special_tokens=True))
    return 0


def cmd_check(args):
    check_numbers(args)
    report = Report()
    store = check_artefacts(report, args.dstore_filename, args.indexfile,
                            allow_index_without_fingerprint=args.knn_allow_index_without_fingerprint)
    if store is None:
        return finish(report)
    m = store.meta
    args.model = args.model or m.get("model")
    args.tokenizer = args.tokenizer or m.get("tokenizer")
    if not args.model:
        report.line(False, "model", "the datastore's metadata names no model: pass --model")
        return finish(report)
    try:
        model, tokenizer = load_model(args)
    except KNNLMError as e:
        report.line(False, "model", str(e))
        return finish(report)
    ident = model_identity(model, tokenizer).as_dict()
    report.line(ident["dim"] == store.dim, "dimension", f"model keys {ident['dim']}, datastore {store.dim}")
    report.line(ident["dict_fingerprint"] == m.get("dict_fingerprint") and ident["dict_size"] == m.get("dict_size"),
                "tokenizer", f"model {ident['dict_size']} ids, tokenizer {ident['dict_fingerprint']}; datastore "
                             f"{m.get('dict_size')} ({m.get('dict_fingerprint')})")
    report.line(ident["model_fingerprint"] == m.get("model_fingerprint"), "model weights",
                f"model {ident['model_fingerprint']}, datastore dumped by {m.get('model_fingerprint')} ({m.get('model')})")
    if ident["dim"] == store.dim and not m.get("legacy"):
        check_keys(report, args, model, tokenizer, store)
    return finish(report)


def check_keys(report, args, model, tokenizer, store):
    """Replay the dump: the text, windows and key type from the metadata; a few windows' keys
    and targets against the rows they were written to."""
    m = store.meta
    missing = [k for k in ("text", "max_length", "stride") if m.get(k) is None]
    if missing or m.get("subset_of"):
        why = f"metadata lacks {', '.join(missing)}" if missing else "a subset's rows are not one dump's"
        report.line(False, "keys recomputed", f"{why}: cannot replay the dump")
        return
    text = args.text or m["text"]
    if not os.path.isfile(text):
        report.line(False, "keys recomputed", f"text file {text} not found; pass --text")
        return
    ids = read_tokens(text, tokenizer)
    wins = windows(len(ids), m["max_length"], m["stride"])
    total = sum(w.scored for w in wins)
    if total != store.size:
        report.line(False, "entry count", f"the text yields {total:,} scored tokens, the dump had {store.size:,}")
        return
    report.line(True, "entry count", f"{total:,} scored tokens = {store.size:,} entries dumped")
    starts = np.cumsum([0] + [w.scored for w in wins])
    picks = sorted({0, len(wins) // 2, len(wins) - 1})[:max(1, args.windows)]
    replay = Replay(store)
    with break_into(model, m["keytype"]) as capture:
        for i in progress(picks, desc="replaying windows", unit="window"):
            r = next(run_windows(model, ids, [wins[i]], capture, device=device(args), lm=False))
            replay.add(np.arange(starts[i], starts[i + 1]), r["keys"].float().cpu().numpy(), r["targets"].cpu().numpy())
    replay.report(report, f"{len(picks)} windows")


# ----------------------------------------------------------------------------- parser
def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(s, required=True):
        s.add_argument("--model", required=required, help="model directory or hub name (AutoModelForCausalLM)")
        s.add_argument("--tokenizer", help="tokenizer directory or hub name (default: --model)")
        s.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        s.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                       help="weights' dtype (keys are stored as float32, or float16 with --dstore-fp16)")

    def text_args(s):
        s.add_argument("--text", required=True, help="text file, read whole and tokenized as one string")
        s.add_argument("--max-length", type=int, help="window length L in tokens (default: the model's positions)")
        s.add_argument("--stride", type=int, help="a window starts every S tokens, S <= L (default: L / 2)")
        s.add_argument("--batch-size", type=int, default=1, help="windows per forward")

    def knn_args(s):
        s.add_argument("--knn-keytype", default=DEFAULT_KEYTYPE, help=f"one of {', '.join(KEYTYPES)}")
        options.add_arguments(s, options.RetrievalOptions, "hf")

    s = sub.add_parser("dump", help="write a datastore: one row per token the windows score")
    model_args(s)
    text_args(s)
    s.add_argument("--dstore-mmap", required=True, help="datastore prefix to write")
    s.add_argument("--dstore-fp16", action="store_true", help="store keys as float16")
    s.add_argument("--num-shards", type=int, default=1, help="dump only shard --shard-id of N contiguous runs of windows")
    s.add_argument("--shard-id", type=int, default=0, help="which shard (0..N-1); see knnlm-shard-dump")
    s.add_argument("--knn-keytype", default=DEFAULT_KEYTYPE, help=f"one of {', '.join(KEYTYPES)}")
    s.add_argument("--overwrite", action="store_true", help="replace a complete datastore")
    s.set_defaults(run=cmd_dump)

    s = sub.add_parser("eval", help="perplexity by the guide's sliding windows, optionally kNN-LM")
    model_args(s)
    text_args(s)
    knn_args(s)
    options.add_arguments(s, options.ExportOptions, "hf")
    options.add_arguments(s, options.CacheOptions, "hf")
    s.add_argument("--overwrite", action="store_true", help="replace a complete export")
    s.add_argument("--json", help="write the summary as JSON here")
    s.set_defaults(run=cmd_eval)

    s = sub.add_parser("generate", help="model.generate from the kNN-LM distribution")
    model_args(s)
    knn_args(s)
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--do-sample", action="store_true", help="sample (default: greedy, or beam search with --num-beams)")
    s.add_argument("--num-beams", type=int, default=1)
    s.add_argument("--num-return-sequences", type=int, default=1)
    s.add_argument("--top-k", type=int, default=0, help="sampling: keep the k most likely tokens (0: all)")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (not --knn-temp)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(run=cmd_generate)

    s = sub.add_parser("check", help="do this model, datastore and index belong together?")
    model_args(s, required=False)
    s.add_argument("--dstore-filename", "--dstore-mmap", required=True, help="datastore prefix")
    s.add_argument("--indexfile", help="FAISS index")
    s.add_argument("--text", help="the dumped text (default: from the datastore's metadata)")
    s.add_argument("--windows", type=int, default=3, help="windows whose keys are recomputed")
    s.add_argument("--knn-allow-index-without-fingerprint", action="store_true",
                   help="accept an index whose metadata does not record the datastore it was built from")
    s.set_defaults(run=cmd_check)
    return p


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format=f"{PROG}: %(message)s")
    warnings.filterwarnings("ignore")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        load_from_argv(argv)  # its strategies are --knn-search choices
    except KNNLMError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: args.run(args))  # knnlm.lifecycle: errors and SIGINT/SIGTERM as one line


if __name__ == "__main__":
    sys.exit(main())
