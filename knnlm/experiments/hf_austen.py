"""The Hugging Face front-end end to end, offline, on Jane Austen (`make demo`'s corpus).

    python -m knnlm.experiments.hf_austen [--workdir demo_runs/hf_austen] [--quick]

1. corpus      demo_runs/austen/corpus/{train,valid,test}.txt (built with knnlm.experiments.corpora.austen
               if `make demo` has not made it)
2. tokenizer   a byte-level BPE trained from scratch on train.txt (`tokenizers`)
3. model       a small GPT-2-architecture LM trained from scratch on the CPU, saved with save_pretrained
4. dump        knnlm-hf dump (train.txt, the guide's sliding windows)
5. index       knnlm-build-index
6. export      knnlm-hf eval --knnlm on valid.txt with --knnlm-dump-probs
7. tune        knnlm-tune: lambda and T on valid (its perplexity there is the table's valid row)
8. score       knnlm-hf eval on test with the tuned lambda and T

Every step after 3 is the command line a user types (run here as subprocesses), so the README's
commands with `--model gpt2` are the same ones with a hub model. Prints the perplexity table and
writes it to WORKDIR/results.md. `--quick` is a smoke-size run (a slice of the text, a few
training steps, a small k): it checks the pipeline, not the method. Steps whose outputs exist
are not redone (delete WORKDIR to start over).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CORPUS = Path("demo_runs/austen/corpus")


def log(msg):
    print(f"[hf_austen] {msg}", flush=True)


def sh(*cmd):
    cmd = [str(c) for c in cmd]
    log("$ " + " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stdout[-3000:] + r.stderr[-3000:])
        raise SystemExit(f"hf_austen: `{' '.join(cmd[:4])} ...` failed with exit code {r.returncode}")
    return r.stdout


def tool(module, *args):
    return sh(sys.executable, "-m", module, *args)


def make_corpus(corpus, workdir, limit):
    if not all((corpus / f"{s}.txt").is_file() for s in ("train", "valid", "test")):
        from .corpora.austen import build_austen_corpus

        log(f"building the Austen corpus in {corpus}")
        build_austen_corpus(corpus)
    if not limit:
        return corpus
    small = workdir / "corpus"
    small.mkdir(parents=True, exist_ok=True)
    for split, words in (("train", limit), ("valid", limit // 5), ("test", limit // 5)):
        text = (corpus / f"{split}.txt").read_text().split(" ")
        (small / f"{split}.txt").write_text(" ".join(text[:words]))
    return small


def make_tokenizer(corpus, out, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(corpus / "train.txt")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.save_pretrained(out)
    return fast


def train_model(corpus, tokenizer, out, a):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(a.seed)
    ids = torch.tensor(tokenizer((corpus / "train.txt").read_text())["input_ids"], dtype=torch.long)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=a.positions, n_embd=a.dim, n_layer=a.layers,
                        n_head=a.heads, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.01)
    warmup = max(1, a.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    log(f"training GPT-2 ({a.layers} layers, {a.dim} wide, {sum(p.numel() for p in model.parameters()):,} "
        f"parameters) on {len(ids):,} tokens for {a.steps} steps of {a.batch} x {a.positions}")
    model.train()
    start = time.time()
    for step in range(a.steps):
        begin = torch.randint(0, len(ids) - a.positions - 1, (a.batch,))
        batch = torch.stack([ids[b:b + a.positions] for b in begin.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % max(1, a.steps // 10) == 0 or step == a.steps - 1:
            log(f"  step {step + 1}/{a.steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)")
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def summary(path):
    return json.loads(Path(path).read_text())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m knnlm.experiments.hf_austen", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, default=Path("demo_runs/hf_austen"))
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder with train/valid/test.txt")
    p.add_argument("--quick", action="store_true", help="smoke size: 30K words, 40 steps, k 64")
    p.add_argument("--limit-words", type=int, default=0, help="use only the first N words of train (N/5 of valid, test)")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stride", type=int, default=256,
                   help="windows of --positions tokens every STRIDE tokens, dump and eval (128: more context per token, 2x the forwards)")
    p.add_argument("--k", type=int, default=256)
    p.add_argument("--ncentroids", type=int, default=1024)
    p.add_argument("--code-size", type=int, default=64)
    a = p.parse_args(argv)
    if a.quick:
        a.limit_words, a.vocab, a.steps, a.k, a.ncentroids = a.limit_words or 30000, 2000, 40, 64, 64
    total = time.time()
    times = {}
    w = a.workdir
    w.mkdir(parents=True, exist_ok=True)
    t = time.time()
    corpus = make_corpus(a.corpus, w, a.limit_words)
    model_dir = w / "model"
    if not (model_dir / "config.json").is_file():
        tok = make_tokenizer(corpus, model_dir, a.vocab)
        times["tokenizer"] = time.time() - t
        t = time.time()
        train_model(corpus, tok, model_dir, a)
        times["train"] = time.time() - t
    window = ["--max-length", a.positions, "--stride", a.stride, "--batch-size", 8]
    dstore, index = w / "dstore" / "train", w / "dstore" / "knn.index"
    if not Path(f"{dstore}_meta.json").is_file() or not summary(f"{dstore}_meta.json").get("complete"):
        t = time.time()
        tool("knnlm.hf.cli", "dump", "--model", model_dir, "--text", corpus / "train.txt", *window,
             "--dstore-mmap", dstore, "--overwrite")
        times["dump"] = time.time() - t
    if not Path(f"{index}.meta.json").is_file():
        t = time.time()
        tool("knnlm.index.builder", f"dstore_mmap={dstore}", f"faiss_index={index}", f"ncentroids={a.ncentroids}",
             f"code_size={a.code_size}", "probe=32", "num_keys_to_train=200000", "seed=1", "overwrite=true")
        times["index"] = time.time() - t
    knn = ["--knnlm", "--dstore-filename", dstore, "--indexfile", index, "--k", a.k, "--probe", 32,
           "--move-dstore-to-mem"]
    runs = w / "runs"
    runs.mkdir(exist_ok=True)
    t = time.time()
    tool("knnlm.hf.cli", "eval", "--model", model_dir, "--text", corpus / "valid.txt", *window, *knn,
         "--knnlm-dump-probs", runs / "valid_export", "--overwrite", "--json", runs / "valid_export.json")
    times["export"] = time.time() - t
    t = time.time()
    tool("knnlm.offline.tune", runs / "valid_export", "--lambdas", "0:1:0.01", "--json", runs / "best.json")
    best = summary(runs / "best.json")
    times["tune"] = time.time() - t
    lam, temp = best["best_lambda"], best["best_temperature"]
    # valid at the tuned setting: knnlm-tune's own perplexity (exact: the export keeps all k neighbors).
    valid = summary(runs / "valid_export.json")
    results = {"valid": {"tokens": valid["tokens"], "base_ppl": valid["base_ppl"], "ppl": best["best_ppl"]}}
    t = time.time()
    out = tool("knnlm.hf.cli", "eval", "--model", model_dir, "--text", corpus / "test.txt", *window, *knn,
               "--lmbda", lam, "--knn-temp", temp, "--json", runs / "test.json")
    times["score test"] = time.time() - t
    results["test"] = summary(runs / "test.json")
    log(out.strip().splitlines()[-1])
    size = summary(f"{dstore}_meta.json")["size"]
    lines = [
        f"# kNN-LM with the Hugging Face front-end on Jane Austen{' (--quick)' if a.quick else ''}",
        "",
        f"GPT-2 architecture, {a.layers} layers x {a.dim}, BPE vocabulary {a.vocab}, {a.steps} training steps; "
        f"datastore {size:,} entries (train.txt, windows of {a.positions} every {a.stride}); k = {a.k}; "
        f"lambda = {lam:g}, T = {temp:g} tuned on valid.",
        "",
        "| split | tokens | base LM ppl | kNN-LM ppl | change |",
        "|---|---|---|---|---|",
    ]
    for split, r in results.items():
        lines.append(f"| {split} | {r['tokens']:,} | {r['base_ppl']:.2f} | {r['ppl']:.2f} | "
                     f"{100 * (r['ppl'] / r['base_ppl'] - 1):+.1f}% |")
    lines += ["", "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
              + f"; total {time.time() - total:.0f} s"]
    table = "\n".join(lines) + "\n"
    (w / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
