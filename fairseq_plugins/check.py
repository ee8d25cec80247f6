"""knnlm-check: do this model, datastore and index belong together?

    knnlm-check --path CKPT --dstore-filename PREFIX --indexfile INDEX [--data DIR]

One line per check. The key check replays the dump: it rebuilds the split eval_lm read
(from the datastore's metadata: data, split, tokens per sample, context window, break
mode), runs the model on a few batches, and compares their keys and values with the
datastore rows they were written to. This is what to run when a perplexity looks wrong.
"""

import argparse
import copy
import logging
import os
import sys
import warnings

import numpy as np
import torch

from knnlm.checks import Replay, Report, check_artefacts, finish
from knnlm.store.datastore import resolve_data_path

from .hooks import KeyCapture
from .identity import model_identity

PROG = "knnlm-check"


def load_model(path, data=None, cpu=True):
    from fairseq import checkpoint_utils

    overrides = {"data": data} if data else {}
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides=overrides)
    model = models[0].eval()
    if torch.cuda.is_available() and not cpu:
        model.cuda()
    return model, task


def replay_batches(task, meta, data, max_positions):
    """Yield (sample, rows) in the order eval_lm scored them: rows = (start, count) in the datastore."""
    from fairseq.tasks.language_modeling import LanguageModelingTask

    args = copy.deepcopy(task.args)
    # eval_lm runs the task with tokens-per-sample reduced by the context window.
    args.tokens_per_sample = meta["tokens_per_sample"] - meta.get("context_window", 0)
    args.sample_break_mode = meta.get("sample_break_mode", "none")
    args.add_bos_token = meta.get("add_bos_token", False)
    args.data = data
    lm_task = LanguageModelingTask(args, task.source_dictionary, task.target_dictionary, targets=["future"])
    lm_task.load_dataset(meta["split"])
    itr = lm_task.eval_lm_dataloader(
        lm_task.dataset(meta["split"]), max_tokens=36000, max_positions=max_positions,
        context_window=meta.get("context_window", 0), num_workers=0,
    )
    pad = task.target_dictionary.pad()
    row = 0
    for sample in itr:
        if "net_input" not in sample:
            continue
        target = sample["target"]
        starts = sample.get("start_indices", [0] * len(target))
        spans = []
        for i in range(len(target)):
            n = int(target[i, starts[i]:].ne(pad).sum()) - (1 if args.add_bos_token else 0)
            spans.append((i, int(starts[i]) + (1 if args.add_bos_token else 0), n))
        count = sum(n for *_, n in spans)
        yield sample, spans, row, count
        row += count


def check_keys(report, model, task, datastore, data, n_batches):
    meta = datastore.meta
    missing = [k for k in ("data", "split", "tokens_per_sample") if meta.get(k) is None]
    if missing:
        report.line(False, "keys recomputed", f"metadata lacks {', '.join(missing)}: cannot replay the dump")
        return
    data = data or resolve_data_path(meta["data"], datastore.prefix)
    if not os.path.isdir(data):
        report.line(False, "keys recomputed", f"data directory {data} not found; pass --data")
        return
    capture = KeyCapture(model, meta["keytype"])
    batches = list(replay_batches(task, meta, data, model.max_positions()))
    total = sum(c for *_, c in batches)
    # A subset (knnlm.subset) keeps some rows of a dump; its source_rows file maps them back.
    source_rows = None
    expected = datastore.size
    if meta.get("subset_of"):
        prefix_dir = os.path.dirname(os.path.abspath(datastore.prefix))
        source_rows = np.load(os.path.join(prefix_dir, meta["source_rows_file"]), mmap_mode="r")
        expected = meta["subset_of_size"]
    if total != expected:
        report.line(False, "entry count", f"the split yields {total:,} scored tokens, the dump had {expected:,}")
        return
    report.line(True, "entry count", f"{total:,} scored tokens = {expected:,} entries dumped")
    picks = sorted({0, len(batches) // 2, len(batches) - 1})[:n_batches]
    replay = Replay(datastore)
    device = next(model.parameters()).device
    with torch.no_grad():
        for b in picks:
            sample, spans, row, count = batches[b]
            model(**{k: v.to(device) for k, v in sample["net_input"].items() if torch.is_tensor(v)})
            keys = capture.pop()
            got = torch.cat([keys[i, s:s + n] for i, s, n in spans]).float().cpu().numpy()
            tgt = torch.cat([sample["target"][i, s:s + n] for i, s, n in spans]).numpy()
            rows = np.arange(row, row + count)  # datastore rows, and positions in this batch
            if source_rows is not None:
                rows = np.flatnonzero((source_rows >= row) & (source_rows < row + count))
                got, tgt = got[source_rows[rows] - row], tgt[source_rows[rows] - row]
            replay.add(rows, got, tgt)
    capture.remove()
    if replay.rows == 0:  # a check that examined nothing proves nothing
        report.line(False, "keys recomputed", f"no row was compared ({len(picks)} batches picked; --batches "
                                              f"{n_batches}): nothing was checked; pass --batches 1 or more")
        return
    replay.report(report, f"{len(picks)} batches")


def run_checks(args, out=sys.stdout):
    report = Report(out)
    if getattr(args, "batches", 1) < 1:
        report.line(False, "arguments", f"--batches {args.batches} would recompute no key: nothing would be checked")
        return report
    kwargs = {k: v for k, v in (("dstore_size", getattr(args, "dstore_size", None)), ("dim", getattr(args, "dimension", None)),
                                ("fp16", True if getattr(args, "dstore_fp16", False) else None)) if v is not None}
    datastore = check_artefacts(report, args.dstore_filename, args.indexfile, allow_index_without_fingerprint=getattr(
        args, "knn_allow_index_without_fingerprint", False), **kwargs)
    if datastore is None:
        return report
    m = datastore.meta
    if args.path:
        try:
            model, task = load_model(args.path, args.data)
        except Exception as e:  # noqa: BLE001 - report any load failure as a check line
            report.line(False, "model", f"cannot load {args.path}: {e}")
            return report
        ident = model_identity(model, task.target_dictionary).as_dict()
        report.line(ident["dim"] == datastore.dim, "dimension", f"model keys {ident['dim']}, datastore {datastore.dim}")
        report.line(ident["dict_fingerprint"] == m.get("dict_fingerprint"), "dictionary",
                    f"model {ident['dict_size']} symbols ({ident['dict_fingerprint']}), datastore {m.get('dict_size')} ({m.get('dict_fingerprint')})")
        report.line(ident["model_fingerprint"] == m.get("model_fingerprint"), "model weights",
                    f"model {ident['model_fingerprint']}, datastore dumped by {m.get('model_fingerprint')} ({m.get('checkpoint')})")
        if ident["dim"] == datastore.dim and not m.get("legacy"):
            check_keys(report, model, task, datastore, args.data, args.batches)
    return report


def main(argv=None):
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)  # fairseq's imports set the root logger to DEBUG
    warnings.filterwarnings("ignore")  # torch/fairseq deprecation chatter would bury the report
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--path", help="model checkpoint")
    p.add_argument("--dstore-filename", "--dstore_filename", "--dstore-mmap", required=True, help="datastore prefix or shard manifest")
    p.add_argument("--indexfile", "--faiss-index", "--faiss_index", help="FAISS index")
    p.add_argument("--data", help="data directory the datastore was dumped from (default: from its metadata)")
    p.add_argument("--batches", type=int, default=3, help="batches whose keys are recomputed (at least 1)")
    p.add_argument("--dstore-size", "--dstore_size", type=int, help="entries of a datastore in the original code's raw format")
    p.add_argument("--dimension", type=int, help="key dimension of a datastore in the original code's raw format")
    p.add_argument("--dstore-fp16", "--dstore_fp16", action="store_true", help="the raw datastore was dumped in float16")
    p.add_argument("--knn-allow-index-without-fingerprint", action="store_true",
                   help="accept an index whose metadata does not record the datastore it was built from")
    args = p.parse_args(argv)
    return finish(run_checks(args))


if __name__ == "__main__":
    sys.exit(main())
