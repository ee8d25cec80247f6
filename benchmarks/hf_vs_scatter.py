"""Our Hugging Face kNN-LM scoring vs the vocabulary scatter of knn-transformers, at equal perplexity.

knn-transformers (Alon et al.'s `KNNWrapper`) hooks the LM head and, for every position,
turns the k neighbors into a full kNN distribution: softmax over -d/T, `scatter_add` into an
(N, V) tensor of zeros, `log`, then interpolates with the LM's (N, V) log-softmax by a
logsumexp over the two, and only then reads the targets' log-probabilities. `knnlm-hf eval`
(knnlm.KNNLM.score) sums the neighbor weights that carry the target in log space and never
leaves (N, k).

    python -m benchmarks.hf_vs_scatter [--vocab 50257] [--dstore-tokens 16384] [--eval-tokens 4096] \
        [--max-length 256] [--batch-size 4] [--k 1024] [--repeats 5] [--json OUT]

A tiny GPT-2 (random weights, real GPT-2 vocabulary size) dumps a datastore with
`knnlm-hf dump`'s code path; a FAISS Flat index over it. Then, over the eval windows, each
batch runs the LM forward and the retrieval once, and both mixing steps on the same inputs,
their order alternating; `--repeats` rounds, interleaved. Reported: both perplexities
(equal to 1e-4), each mixing step's seconds per round and their paired median ratio
(scatter / ours, over rounds), the whole eval's seconds per round for each way (forward +
retrieval + mixing) and their ratio, and the peak extra resident memory of one mixing call
(VmHWM rise over VmRSS, high-water mark reset via /proc/self/clear_refs, as
benchmarks/naive_scorer.py measures it; with MALLOC_MMAP_THRESHOLD_ so freed buffers leave
the resident set; on a GPU: torch.cuda.max_memory_allocated rise).
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # only effective if set before the process starts

import numpy as np  # noqa: E402
import torch  # noqa: E402


def scatter_log_probs(lm_lprobs, neighbors, targets, lmbda, temperature):
    """knn-transformers' way: (N, V) kNN distribution by scatter_add, log, logsumexp with the LM's."""
    scores = -neighbors.distances.float() / temperature
    scores = scores.masked_fill(~neighbors.valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    knn = torch.zeros(lm_lprobs.shape, dtype=torch.float32, device=lm_lprobs.device)
    knn = knn.scatter_add(-1, neighbors.values, probs).log()
    knn = torch.nan_to_num(knn, nan=None, neginf=-10000.0)  # as knn-transformers does
    mixed = torch.logsumexp(torch.stack([lm_lprobs + math.log(1 - lmbda), knn + math.log(lmbda)]), dim=0)
    return mixed.gather(-1, targets[:, None])[:, 0]


def ours_log_probs(knn, lp_lm, neighbors, targets):
    """What knn.score does after retrieval: p_kNN of the target only, then the mix."""
    return knn.mix(lp_lm, knn.knn_log_prob(neighbors, targets), neighbors.retrieved)


def peak_measure(device):
    if device.type == "cuda":
        def run(fn):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn()
            torch.cuda.synchronize()
            return out, time.perf_counter() - t0, torch.cuda.max_memory_allocated() - base
        return run
    from benchmarks.common import can_reset_peak, measured

    memory = can_reset_peak()

    def run(fn):
        return measured(fn, memory=memory)
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dstore-tokens", type=int, default=16384)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward")
    p.add_argument("--k", type=int, default=1024)
    p.add_argument("--lmbda", type=float, default=0.25)
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    a = p.parse_args(argv)
    import faiss
    from transformers import GPT2Config, GPT2LMHeadModel

    from knnlm import KNNLM, DumpSession, FaissRetriever, ModelIdentity, open_datastore
    from knnlm.hf import break_into
    from knnlm.hf.windows import run_windows, windows

    device = torch.device(a.device)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=a.vocab, n_positions=a.max_length, n_embd=a.dim, n_layer=2,
                                       n_head=2)).eval().to(device)
    # Zipf-like token ids so that neighbors often carry the target, as in real text.
    rng = np.random.default_rng(0)
    draw = lambda n: torch.from_numpy(np.minimum(rng.zipf(1.2, n), a.vocab) - 1).long()  # noqa: E731
    train, test = draw(a.dstore_tokens + 1), draw(a.eval_tokens + 1)
    L = a.max_length
    tmp = tempfile.mkdtemp(prefix="hf_vs_scatter_")
    prefix = os.path.join(tmp, "ds")
    session = DumpSession(prefix, keytype="last_ffn_input").start(
        ModelIdentity(dim=a.dim, dict_size=a.vocab, dict_fingerprint="bench"))
    with break_into(model) as capture:
        for r in run_windows(model, train, windows(len(train), L, L), capture, batch_size=a.batch_size, device=device):
            session.add(r["keys"].float(), r["targets"])
    session.finish()
    store = open_datastore(prefix, in_memory=True)
    index = faiss.IndexFlatL2(a.dim)
    index.add(np.ascontiguousarray(np.asarray(store.keys, dtype=np.float32)))
    knn = KNNLM(FaissRetriever(index, store, k=a.k), lmbda=a.lmbda, temperature=a.temperature)
    measure = peak_measure(device)
    wins = windows(len(test), L, L)
    rounds = []
    for rep in range(a.repeats):
        sec = {"forward": 0.0, "retrieve": 0.0, "ours": 0.0, "scatter": 0.0}
        peak = {"ours": 0, "scatter": 0}
        sums = {"lm": 0.0, "ours": 0.0, "scatter": 0.0}
        n, maxdiff = 0, 0.0
        with break_into(model) as capture:
            it = run_windows(model, test, wins, capture, batch_size=a.batch_size, device=device, with_logits=True)
            b = 0
            while True:
                t0 = time.perf_counter()
                r = next(it, None)
                if r is None:
                    break
                t1 = time.perf_counter()
                neighbors = knn.retriever.retrieve(r["keys"], nearest_first=False)
                t2 = time.perf_counter()
                sec["forward"] += t1 - t0
                sec["retrieve"] += t2 - t1
                targets, lm = r["targets"], r["lm_log_probs"]
                r.pop("lm_log_probs")
                order = [("ours", lambda: ours_log_probs(knn, r["lp_lm"], neighbors, targets)),
                         ("scatter", lambda: scatter_log_probs(lm, neighbors, targets, a.lmbda, a.temperature))]
                got = {}
                for name, fn in (order if (b + rep) % 2 == 0 else order[::-1]):
                    got[name], s, extra = measure(fn)
                    sec[name] += s
                    peak[name] = max(peak[name], extra or 0)
                maxdiff = max(maxdiff, float((got["ours"] - got["scatter"]).abs().max()))
                sums["lm"] += float(r["lp_lm"].sum())
                sums["ours"] += float(got["ours"].sum())
                sums["scatter"] += float(got["scatter"].sum())
                n += len(targets)
                b += 1
                del lm, got
        ppl = {k: math.exp(-v / n) for k, v in sums.items()}
        rounds.append({"seconds": sec, "peak_bytes": peak, "ppl": ppl, "tokens": n, "max_abs_logprob_diff": maxdiff})
        print(f"round {rep + 1}/{a.repeats}: mixing ours {sec['ours']:.3f} s, scatter {sec['scatter']:.3f} s; "
              f"forward {sec['forward']:.2f} s, retrieval {sec['retrieve']:.2f} s; ppl {ppl['ours']:.4f} / "
              f"{ppl['scatter']:.4f} (LM {ppl['lm']:.4f})", flush=True)
    ppl = rounds[-1]["ppl"]
    assert abs(ppl["ours"] / ppl["scatter"] - 1) < 1e-4, ppl
    mix_ratio = statistics.median(r["seconds"]["scatter"] / r["seconds"]["ours"] for r in rounds)
    total = lambda r, name: r["seconds"]["forward"] + r["seconds"]["retrieve"] + r["seconds"][name]  # noqa: E731
    total_ratio = statistics.median(total(r, "scatter") / total(r, "ours") for r in rounds)
    peak_ours = max(r["peak_bytes"]["ours"] for r in rounds)
    peak_scatter = max(r["peak_bytes"]["scatter"] for r in rounds)
    summary = {
        "device": str(device), "vocab": a.vocab, "dim": a.dim, "k": a.k, "datastore": store.size,
        "tokens": rounds[-1]["tokens"], "tokens_per_batch": a.batch_size * L, "repeats": a.repeats,
        "ppl_lm": ppl["lm"], "ppl_ours": ppl["ours"], "ppl_scatter": ppl["scatter"],
        "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rounds),
        "mixing_seconds_median": {k: statistics.median(r["seconds"][k] for r in rounds) for k in ("ours", "scatter")},
        "eval_seconds_median": {k: statistics.median(total(r, k) for r in rounds) for k in ("ours", "scatter")},
        "mixing_time_ratio_scatter_over_ours": mix_ratio, "eval_time_ratio_scatter_over_ours": total_ratio,
        "peak_bytes": {"ours": peak_ours, "scatter": peak_scatter},
        "peak_ratio_scatter_over_ours": peak_scatter / max(peak_ours, 1),
        "rounds": rounds, "torch_threads": torch.get_num_threads(),
    }
    print(f"perplexity: ours {ppl['ours']:.6f}, scatter {ppl['scatter']:.6f} (base LM {ppl['lm']:.4f}); "
          f"{summary['tokens']:,} tokens, V = {a.vocab:,}, k = {a.k}, datastore {store.size:,}")
    print(f"mixing step: scatter / ours = {mix_ratio:.1f}x (paired median over {a.repeats} rounds: "
          f"{summary['mixing_seconds_median']['scatter']:.3f} s vs {summary['mixing_seconds_median']['ours']:.3f} s)")
    print(f"whole eval (forward + retrieval + mixing): scatter / ours = {total_ratio:.2f}x")
    print(f"peak extra memory of one mixing call ({a.batch_size * L} tokens): ours {peak_ours / 2**20:.1f} MiB, "
          f"scatter {peak_scatter / 2**20:.1f} MiB ({summary['peak_ratio_scatter_over_ours']:.0f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
