"""A naive kNN-LM scorer, and a side-by-side comparison with ours on a real split.

The naive scorer does the same math the way the Hugging Face port of kNN-LM does: for every
token it builds the whole kNN distribution over the vocabulary (scatter_add of the neighbor
softmax into an (N, V) tensor), takes its log, mixes it with the LM's full (N, V)
log-softmax by logaddexp, and only then reads off the target. Ours (knnlm.scoring) never
leaves (N, k): it sums the neighbor weights that carry the target, in log space.

    python -m benchmarks.naive_scorer --data DATA_BIN --path CKPT --dstore PREFIX --index INDEX \
        [--split valid] [--k 1024] [--probe 32] [--context-window 128] [--max-tokens 8192] [--json OUT]

runs the LM over the split (as fairseq-eval-lm batches it), retrieves neighbors once per
batch, and scores every batch with both scorers from the same inputs. It prints (and writes
as JSON) both perplexities, the scoring time of each, and the peak memory each scoring call
needs: the rise of this process's resident set during the call (VmHWM after it minus VmRSS
before it, the high-water mark reset through /proc/self/clear_refs just before; run with
MALLOC_MMAP_THRESHOLD_ set so that freed buffers leave the resident set at once, as
benchmarks/run.py does). It also times each stage of the kNN-LM per batch (LM forward,
FAISS search, exact-distance recompute, scoring): where kNN-LM evaluation spends its time.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import can_reset_peak, measured
from knnlm.scoring import interpolate, knn_log_prob, neighbor_scores


def naive_knn_lm_log_probs(lm_lprobs, distances, neighbor_vals, targets, lmbda, temperature=1.0, valid=None):
    """log p(target) of the interpolated kNN-LM, via full (N, V) distributions (the naive way).

    lm_lprobs (N, V): the LM's log-softmax; distances, neighbor_vals (N, k); targets (N,).
    """
    scores = -distances.float() / temperature
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    p_knn = torch.zeros(lm_lprobs.shape, dtype=torch.float32)
    p_knn.scatter_add_(-1, neighbor_vals.long(), weights)
    mixed = torch.logaddexp(lm_lprobs.float() + math.log1p(-lmbda), p_knn.log() + math.log(lmbda))
    return mixed.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def our_knn_lm_log_probs(lm_lprobs, distances, neighbor_vals, targets, lmbda, temperature=1.0, valid=None):
    """The same quantity through knnlm.scoring: only the target's probability, (N, k) at most."""
    lp_lm = lm_lprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lp_knn = knn_log_prob(neighbor_scores(distances, "l2", temperature), neighbor_vals, targets, valid)
    return interpolate(lp_lm, lp_knn, lmbda)


def compare(data, path, dstore, index, *, split="valid", k=1024, probe=32, lmbda=0.25, temperature=1.0,
            context_window=128, max_tokens=8192, keytype="last_ffn_input", max_batches=None, log=print):
    from fairseq import checkpoint_utils, tasks, utils

    from fairseq_plugins.hooks import KeyCapture
    from knnlm.retrieval import FaissRetriever
    from knnlm.store.sharded import open_datastore

    models, cfg, _ = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data})
    model = models[0].eval()
    # As fairseq-eval-lm: blocks of tokens_per_sample - context_window new tokens, each after
    # up to context_window tokens of context (whose targets are padding: not scored).
    cfg.task.tokens_per_sample -= context_window
    task = tasks.setup_task(cfg.task)
    task.load_dataset(split)
    dataset = task.dataset(split)
    itr = task.eval_lm_dataloader(
        dataset=dataset, max_tokens=max_tokens, batch_size=None,
        max_positions=utils.resolve_max_positions(model.max_positions()),
        num_shards=1, shard_id=0, num_workers=0, data_buffer_size=0, context_window=context_window,
    )
    datastore = open_datastore(dstore)
    retriever = FaissRetriever(index, datastore, k=k, nprobe=probe, sim_func="l2")
    capture = KeyCapture(model, keytype)
    pad = task.target_dictionary.pad()
    memory = can_reset_peak()
    t = dict(forward=0.0, search=0.0, recompute=0.0, ours=0.0, naive=0.0)
    peak = dict(ours=0, naive=0)
    sums = dict(lm=0.0, ours=0.0, naive=0.0)
    n_tokens, max_diff, n_batches = 0, 0.0, 0
    vocab = len(task.target_dictionary)
    with torch.no_grad():
        for b, sample in enumerate(itr):
            if max_batches is not None and b >= max_batches:
                break
            if "net_input" not in sample:
                continue
            t0 = time.perf_counter()
            net_output = model(**sample["net_input"])
            lprobs = model.get_normalized_probs(net_output, log_probs=True, sample=sample).float()
            t1 = time.perf_counter()
            target = sample["target"]
            scored = target.ne(pad)
            keys = capture.pop()
            queries, targets, lm = keys[scored], target[scored], lprobs[scored]  # (N, D), (N,), (N, V)
            del net_output, lprobs
            t2 = time.perf_counter()
            dists_faiss, ids = retriever.search(queries)
            t3 = time.perf_counter()
            valid = torch.from_numpy(ids >= 0)
            safe = ids.clip(min=0)
            vals = torch.from_numpy(datastore.gather_vals(safe).astype("int64"))
            dists = retriever.exact_distances(queries, safe)
            t4 = time.perf_counter()
            t["forward"] += t1 - t0
            t["search"] += t3 - t2
            t["recompute"] += t4 - t3
            args = (lm, dists, vals, targets, lmbda, temperature, valid)
            order = (("ours", our_knn_lm_log_probs), ("naive", naive_knn_lm_log_probs))
            if b % 2:
                order = order[::-1]  # alternate who goes first
            got = {}
            for name, fn in order:
                got[name], secs, extra = measured(fn, *args, memory=memory)
                t[name] += secs
                if extra is not None:
                    peak[name] = max(peak[name], extra)
            max_diff = max(max_diff, float((got["ours"] - got["naive"]).abs().max()))
            sums["lm"] += float(lm.gather(-1, targets.unsqueeze(-1)).sum())
            sums["ours"] += float(got["ours"].sum())
            sums["naive"] += float(got["naive"].sum())
            n_tokens += len(targets)
            n_batches += 1
            if log and (n_batches == 1 or n_batches % 5 == 0):
                log(f"  scorer comparison: batch {n_batches}, {n_tokens:,} tokens")
    capture.remove()
    ppl = {name: math.exp(-s / n_tokens) for name, s in sums.items()}
    return {
        "tokens": n_tokens, "batches": n_batches, "vocab": vocab, "k": k, "probe": probe,
        "lmbda": lmbda, "temperature": temperature,
        "ppl_lm": ppl["lm"], "ppl_ours": ppl["ours"], "ppl_naive": ppl["naive"],
        "max_abs_logprob_diff": max_diff,
        "seconds": t, "peak_bytes": peak if memory else None,
        "memory_method": ("rise of VmHWM over VmRSS per scoring call (high-water mark reset via "
                          "/proc/self/clear_refs); max over batches") if memory else None,
        "faiss_threads": _faiss_threads(), "torch_threads": torch.get_num_threads(),
    }


def _faiss_threads():
    import faiss

    return faiss.omp_get_max_threads()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--dstore", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--split", default="valid")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--probe", type=int, default=32)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--context-window", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--keytype", default="last_ffn_input")
    p.add_argument("--max-batches", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    a = p.parse_args(argv)
    r = compare(a.data, a.path, a.dstore, a.index, split=a.split, k=a.k, probe=a.probe, lmbda=a.lmbda,
                temperature=a.temperature, context_window=a.context_window, max_tokens=a.max_tokens,
                keytype=a.keytype, max_batches=a.max_batches)
    s = r["seconds"]
    print(f"{r['tokens']:,} tokens in {r['batches']} batches, vocabulary {r['vocab']:,}, k={r['k']}")
    print(f"perplexity: LM {r['ppl_lm']:.4f}, kNN-LM ours {r['ppl_ours']:.4f}, naive {r['ppl_naive']:.4f} "
          f"(max |log p| difference {r['max_abs_logprob_diff']:.2e})")
    print(f"scoring time: ours {s['ours']:.3f} s, naive {s['naive']:.3f} s ({s['naive'] / s['ours']:.2f}x)")
    if r["peak_bytes"]:
        pk = r["peak_bytes"]
        print(f"peak memory per batch: ours {pk['ours'] / 2**20:.1f} MiB, naive {pk['naive'] / 2**20:.1f} MiB "
              f"({pk['naive'] / max(pk['ours'], 1):.1f}x)")
    print(f"stages: forward {s['forward']:.2f} s, search {s['search']:.2f} s, recompute {s['recompute']:.2f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    main()
