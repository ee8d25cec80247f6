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

from knnlm import KNNLM, DumpSession, FaissRetriever, Tally, open_datastore
from knnlm.checks import Replay, Report, check_artefacts, finish
from knnlm.errors import ConfigError, KNNLMError
from knnlm.lifecycle import run_main
from knnlm.memorisation import check_memorisation
from knnlm.offline.rescoring import write_outputs
from knnlm.features import TokenFeatures, lm_features
from knnlm.model import summary_line

from .hooks import break_into
from .identity import model_identity
from .layers import DEFAULT_KEYTYPE, KEYTYPES, check_keytype, max_positions
from .windows import check_window, run_windows, windows

PROG = "knnlm-hf"
SIM_FUNCS = ("l2", "do_not_recomp_l2", "dot")


# ----------------------------------------------------------------------------- loading
def load_model(args):
    """The model (eval mode, on args.device) and its tokenizer, from a directory or a hub name."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()  # "sequence longer than the model's maximum" etc.
    transformers.logging.disable_progress_bar()
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
    stride = args.stride or max(1, max_length // 2)
    check_window(max_length, stride, max_positions(model))
    wins = windows(n_tokens, max_length, stride)
    if not wins:
        raise ConfigError(f"text {args.text} is {n_tokens} token(s) long: no token to score (it needs 2 or more)")
    return wins, max_length, stride


# ----------------------------------------------------------------------------- kNN-LM
def validate_knn(args):
    """Refuse impossible kNN option combinations before the model is loaded."""
    if getattr(args, "knnlm_dump_probs", None) and not args.knnlm:
        raise ConfigError("--knnlm-dump-probs exports a kNN-LM evaluation: add --knnlm")
    adaptive = getattr(args, "adaptive_retrieval", None)
    skip, threshold = getattr(args, "adaptive_skip", None), getattr(args, "adaptive_threshold", None)
    if not adaptive and (skip is not None or threshold is not None):
        flag = "--adaptive-skip" if skip is not None else "--adaptive-threshold"
        raise ConfigError(f"{flag} is an option of adaptive retrieval: add --adaptive-retrieval PREDICTOR")
    if adaptive and not args.knnlm:
        raise ConfigError("--adaptive-retrieval changes how --knnlm retrieves: add --knnlm")
    if adaptive and getattr(args, "knnlm_dump_probs", None):
        raise ConfigError("--adaptive-retrieval leaves tokens unsearched, but an export records every token's "
                          "neighbors for re-scoring: drop --knnlm-dump-probs (export a plain --knnlm run)")
    if not args.knnlm:
        return
    if not args.dstore_filename or not args.indexfile:
        raise ConfigError("--knnlm needs both --dstore-filename PREFIX and --indexfile INDEX")
    check_keytype(args.knn_keytype)
    if args.knn_sim_func not in SIM_FUNCS:
        raise ConfigError(f"--knn-sim-func must be one of {', '.join(SIM_FUNCS)}, got {args.knn_sim_func!r}")


def build_knnlm(args):
    """The KNNLM over --dstore-filename / --indexfile (checks lambda, T, k, probe, k-factor, index)."""
    store = open_datastore(args.dstore_filename, in_memory=args.move_dstore_to_mem)
    retriever = FaissRetriever(args.indexfile, store, k=args.k, nprobe=args.probe, sim_func=args.knn_sim_func,
                               gpu=args.knn_gpu, k_factor=args.knn_k_factor)
    if getattr(args, "adaptive_retrieval", None):
        from knnlm import AdaptiveRetriever

        retriever = AdaptiveRetriever(retriever, args.adaptive_retrieval, skip=args.adaptive_skip,
                                      threshold=args.adaptive_threshold)
    return KNNLM(retriever, lmbda=args.lmbda, temperature=args.knn_temp)


def check_datastore(args, knn, identity):
    knn.retriever.datastore.check_compatible(keytype=args.knn_keytype, allow_model_mismatch=args.knn_allow_model_mismatch,
                                             **identity.as_dict())
    predictor = getattr(knn.retriever, "predictor", None)
    if predictor is not None:
        predictor.check_compatible(identity=identity, allow_model_mismatch=args.knn_allow_model_mismatch)


# ----------------------------------------------------------------------------- commands
def cmd_dump(args):
    check_keytype(args.knn_keytype)
    model, tokenizer = load_model(args)
    ids = read_tokens(args.text, tokenizer)
    wins, max_length, stride = text_windows(args, model, len(ids))
    identity = model_identity(model, tokenizer)
    capture = break_into(model, args.knn_keytype)  # before any file is written: the key type may not apply
    session = DumpSession(
        args.dstore_mmap, keytype=args.knn_keytype, fp16=args.dstore_fp16, overwrite=args.overwrite,
        expected_size=sum(w.scored for w in wins),
        extra={"frontend": PROG, "model": _ref(args.model), "tokenizer": _ref(args.tokenizer or args.model),
               "model_type": model.config.model_type, "text": os.path.abspath(args.text),
               "text_tokens": len(ids), "max_length": max_length, "stride": stride},
    )
    try:
        session.start(identity)
        for r in run_windows(model, ids, wins, capture, batch_size=args.batch_size, device=device(args), lm=False):
            session.add(r["keys"].float(), r["targets"])
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
    validate_knn(args)
    knn = build_knnlm(args) if args.knnlm else None
    model, tokenizer = load_model(args)
    identity = model_identity(model, tokenizer)
    if knn is not None:
        check_datastore(args, knn, identity)
    ids = read_tokens(args.text, tokenizer)
    if knn is not None:  # the text the datastore was dumped from is refused (knnlm.memorisation)
        check_memorisation(knn.retriever.datastore, ids.numpy(), allow=args.knn_allow_same_split, what=f"text {args.text}")
    wins, max_length, stride = text_windows(args, model, len(ids))
    export = None
    # The LM's per-token features (entropy, top log-probs): for an export, or adaptive retrieval.
    adaptive = knn is not None and getattr(knn.retriever, "needs_lm_features", False)
    top_k = knn.retriever.top_k if adaptive else None
    if args.knnlm_dump_probs:
        from knnlm.features import DEFAULT_TOP_K, feature_names
        from knnlm.ngrams import MAX_ORDER
        from knnlm.offline.export import ExportWriter

        top_k = DEFAULT_TOP_K

        store = knn.retriever.datastore
        kept = args.k if args.knnlm_dump_neighbors < 0 else min(args.knnlm_dump_neighbors, args.k)
        export = ExportWriter(
            args.knnlm_dump_probs, kept, sim_func=args.knn_sim_func, temperature=args.knn_temp, lmbda=args.lmbda,
            with_ids=args.knnlm_dump_ids, overwrite=args.overwrite, feature_names=feature_names(top_k),
            context_order=MAX_ORDER, meta={"frontend": PROG, "model": args.model, "text": os.path.abspath(args.text), "max_length": max_length,
                  "stride": stride, "datastore": store.prefix, "datastore_fingerprint": store.fingerprint,
                  "index": args.indexfile, **identity.as_dict()},
        )
    tally = knn.tally if knn is not None else Tally()
    capture = break_into(model, args.knn_keytype) if knn is not None else None
    try:
        for r in run_windows(model, ids, wins, capture, batch_size=args.batch_size, device=device(args),
                             with_logits=top_k is not None):
            if knn is None:
                tally.add(r["lp_lm"], r["lp_lm"])
                continue
            features = lm_features(r.pop("lm_log_probs"), top_k) if top_k is not None else None
            scored = knn.score(r["keys"], r["targets"], r["lp_lm"], nearest_first=export is not None,
                               state=TokenFeatures(features, r["context"]) if adaptive else None)
            if export is not None:
                n = scored.neighbors
                export.add(r["lp_lm"], scored.lp_knn, r["targets"], dists=n.distances, ids=n.ids, vals=n.values,
                           valid=n.valid, features=features, context=r["context"])
        if export is not None:
            export.finalize()
    except BaseException:
        if export is not None:
            export.abandon()
        raise
    finally:
        if capture is not None:
            capture.remove()
    summary = tally.summary()
    setting = knn.describe() if knn is not None else "no datastore"
    print(summary_line(summary, setting))
    if args.json:
        result = {**summary, "windows": len(wins), "max_length": max_length, "stride": stride,
                  "text": args.text, "text_tokens": len(ids), "setting": setting}
        if knn is not None:
            result.update(k=knn.k, lmbda=knn.lmbda, temperature=knn.temperature, sim_func=knn.sim_func)
        write_outputs(args.json, lambda: result, None, None, prog=PROG, overwrite=args.overwrite, announce=False)
    return 0


def cmd_generate(args):
    from transformers import LogitsProcessorList

    from .generation import KNNLogitsProcessor

    validate_knn(args)
    knn = build_knnlm(args) if args.knnlm else None
    model, tokenizer = load_model(args)
    processors, capture = [], None
    if knn is not None:
        check_datastore(args, knn, model_identity(model, tokenizer))
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
    for seq in out:
        print(tokenizer.decode(seq, skip_special_tokens=True))
    return 0


def cmd_check(args):
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
        for i in picks:
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
        s.add_argument("--knnlm", action="store_true", help="score with the datastore")
        s.add_argument("--dstore-filename", help="datastore prefix (or shard manifest)")
        s.add_argument("--indexfile", help="index from knnlm-build-index")
        s.add_argument("--k", type=int, default=1024, help="neighbors retrieved")
        s.add_argument("--probe", type=int, default=32, help="IVF lists visited (nprobe)")
        s.add_argument("--lmbda", type=float, default=0.25, help="weight of p_kNN")
        s.add_argument("--knn-temp", type=float, default=1.0, help="softmax temperature over distances")
        s.add_argument("--knn-sim-func", default="l2", help=f"one of {', '.join(SIM_FUNCS)}")
        s.add_argument("--knn-k-factor", type=float, default=1.0, help="ask FAISS for ceil(k F) candidates, keep the k nearest")
        s.add_argument("--knn-keytype", default=DEFAULT_KEYTYPE, help=f"one of {', '.join(KEYTYPES)}")
        s.add_argument("--knn-gpu", action="store_true", help="search a GPU copy of the index")
        s.add_argument("--move-dstore-to-mem", action="store_true", help="read keys and values into RAM")
        s.add_argument("--knn-allow-model-mismatch", action="store_true",
                       help="score although the datastore was dumped with other weights")

    s = sub.add_parser("dump", help="write a datastore: one row per token the windows score")
    model_args(s)
    text_args(s)
    s.add_argument("--dstore-mmap", required=True, help="datastore prefix to write")
    s.add_argument("--dstore-fp16", action="store_true", help="store keys as float16")
    s.add_argument("--knn-keytype", default=DEFAULT_KEYTYPE, help=f"one of {', '.join(KEYTYPES)}")
    s.add_argument("--overwrite", action="store_true", help="replace a complete datastore")
    s.set_defaults(run=cmd_dump)

    s = sub.add_parser("eval", help="perplexity by the guide's sliding windows, optionally kNN-LM")
    model_args(s)
    text_args(s)
    knn_args(s)
    s.add_argument("--knnlm-dump-probs", help="per-token export directory for knnlm-tune")
    s.add_argument("--knnlm-dump-neighbors", type=int, default=-1, help="neighbors per token kept in the export (default all k)")
    s.add_argument("--knnlm-dump-ids", action="store_true", help="also export neighbor ids and values")
    s.add_argument("--overwrite", action="store_true", help="replace a complete export")
    s.add_argument("--knn-allow-same-split", action="store_true",
                   help="score the very text the datastore was dumped from (a memorisation experiment; otherwise refused)")
    s.add_argument("--adaptive-retrieval", metavar="PREDICTOR",
                   help="adaptive retrieval (He et al. 2021): a predictor from knnlm-adaptive train; the tokens of "
                        "lowest predicted lambda are not searched (p_LM alone)")
    s.add_argument("--adaptive-skip", type=float, help="--adaptive-retrieval: target fraction of tokens not searched, in [0, 1)")
    s.add_argument("--adaptive-threshold", type=float,
                   help="--adaptive-retrieval: instead, skip the tokens whose predicted lambda is below this")
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
    args = build_parser().parse_args(argv)
    return run_main(PROG, lambda: args.run(args))  # knnlm.lifecycle: errors and SIGINT/SIGTERM as one line


if __name__ == "__main__":
    sys.exit(main())
