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
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CORPUS = Path("demo_runs/austen/corpus")


def log(msg):
    print(f"[hf_austen] {msg}", flush=True)


def cpu_seconds():
    """User + system CPU time of this process and its finished subprocesses (the steps' commands)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Steps:
    """Wall and CPU seconds per step, for the results table."""

    def __init__(self):
        self.wall, self.cpu, self.start = {}, {}, (time.time(), cpu_seconds())

    @contextlib.contextmanager
    def timed(self, name):
        t, c = time.time(), cpu_seconds()
        yield
        self.wall[name], self.cpu[name] = time.time() - t, cpu_seconds() - c
        log(f"{name}: {self.wall[name]:.0f} s wall, {self.cpu[name]:.0f} s CPU (load {os.getloadavg()[0]:.1f})")

    def line(self):
        wall, cpu = time.time() - self.start[0], cpu_seconds() - self.start[1]
        return (f"Wall time {fmt_s(wall)}, CPU time (user + system) {fmt_s(cpu)}, load average at the end "
                f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; per step (wall / CPU s): "
                + ", ".join(f"{k} {self.wall[k]:.0f} / {self.cpu[k]:.0f}" for k in self.wall))


def fmt_s(seconds):
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


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
    text = (corpus / "train.txt").read_text()
    ids = torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.long)
    # No dropout: the model sees under one epoch, so dropout would only slow its learning.
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=a.positions, n_embd=a.dim, n_layer=a.layers,
                        n_head=a.heads, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
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
    p.add_argument("--workdir", type=Path, help="default demo_runs/hf_austen (--quick: demo_runs/hf_austen_quick)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder with train/valid/test.txt")
    p.add_argument("--quick", action="store_true", help="smoke size: 30K words, vocabulary 2,000, 60 steps, k 32")
    p.add_argument("--limit-words", type=int, default=0, help="use only the first N words of train (N/5 of valid, test)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--stride", type=int, default=256,
                   help="windows of --positions tokens every STRIDE tokens, dump and eval (128: more context per token, 2x the forwards)")
    p.add_argument("--k", type=int, default=128)
    p.add_argument("--ncentroids", type=int, default=1024)
    p.add_argument("--code-size", type=int, default=32)
    p.add_argument("--probe", type=int, default=8, help="IVF lists searched per query")
    p.add_argument("--train-keys", type=int, default=100000, help="keys the index is trained on")
    p.add_argument("--threads", type=int, help="torch and FAISS threads, here and in the steps' commands "
                                                 "(default: all cores; 1 on a busy shared host)")
    a = p.parse_args(argv)
    index_threads = []
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)  # the commands inherit it
        index_threads = [f"threads={a.threads}"]
    if a.quick:
        a.limit_words, a.vocab, a.steps, a.k, a.ncentroids = a.limit_words or 30000, 2000, 60, 32, 64
    steps = Steps()
    w = a.workdir or Path("demo_runs/hf_austen_quick" if a.quick else "demo_runs/hf_austen")
    w.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(a.corpus, w, a.limit_words)
    model_dir = w / "model"
    if not (model_dir / "config.json").is_file():
        with steps.timed("tokenizer"):
            tok = make_tokenizer(corpus, model_dir, a.vocab)
        with steps.timed("train"):
            train_model(corpus, tok, model_dir, a)
    window = ["--max-length", a.positions, "--stride", a.stride, "--batch-size", 8]
    dstore, index = w / "dstore" / "train", w / "dstore" / "knn.index"
    if not Path(f"{dstore}_meta.json").is_file() or not summary(f"{dstore}_meta.json").get("complete"):
        with steps.timed("dump"):
            tool("knnlm.hf.cli", "dump", "--model", model_dir, "--text", corpus / "train.txt", *window,
                 "--dstore-mmap", dstore, "--overwrite")
    if not Path(f"{index}.meta.json").is_file():
        with steps.timed("index"):
            tool("knnlm.index.builder", f"dstore_mmap={dstore}", f"faiss_index={index}", f"ncentroids={a.ncentroids}",
                 f"code_size={a.code_size}", f"probe={a.probe}", f"num_keys_to_train={a.train_keys}", "seed=1",
                 "overwrite=true", *index_threads)
    knn = ["--knnlm", "--dstore-filename", dstore, "--indexfile", index, "--k", a.k, "--probe", a.probe,
           "--move-dstore-to-mem"]
    runs = w / "runs"
    runs.mkdir(exist_ok=True)
    with steps.timed("export"):
        tool("knnlm.hf.cli", "eval", "--model", model_dir, "--text", corpus / "valid.txt", *window, *knn,
             "--knnlm-dump-probs", runs / "valid_export", "--overwrite", "--json", runs / "valid_export.json")
    with steps.timed("tune"):
        tool("knnlm.offline.tune", runs / "valid_export", "--lambdas", "0:1:0.01", "--json", runs / "best.json")
    best = summary(runs / "best.json")
    lam, temp = best["best_lambda"], best["best_temperature"]
    # valid at the tuned setting: knnlm-tune's own perplexity (exact: the export keeps all k neighbors).
    valid = summary(runs / "valid_export.json")
    results = {"valid": {"tokens": valid["tokens"], "base_ppl": valid["base_ppl"], "ppl": best["best_ppl"]}}
    with steps.timed("score test"):
        out = tool("knnlm.hf.cli", "eval", "--model", model_dir, "--text", corpus / "test.txt", *window, *knn,
                   "--lmbda", lam, "--knn-temp", temp, "--json", runs / "test.json")
    results["test"] = summary(runs / "test.json")
    log(out.strip().splitlines()[-1])
    size = summary(f"{dstore}_meta.json")["size"]
    lines = [
        f"# kNN-LM with the Hugging Face front-end on Jane Austen{' (--quick)' if a.quick else ''}",
        "",
        f"GPT-2 architecture, {a.layers} layers x {a.dim}, BPE vocabulary {a.vocab}, {a.steps} training steps of "
        f"{a.batch} x {a.positions} tokens; datastore {size:,} entries (train.txt, windows of {a.positions} every "
        f"{a.stride}); IVF{a.ncentroids},PQ{a.code_size}, probe {a.probe}, k = {a.k}; lambda = {lam:g}, T = {temp:g} "
        f"tuned on valid.",
        "",
        "| split | tokens | base LM ppl | kNN-LM ppl | change |",
        "|---|---|---|---|---|",
    ]
    for split, r in results.items():
        lines.append(f"| {split} | {r['tokens']:,} | {r['base_ppl']:.2f} | {r['ppl']:.2f} | "
                     f"{100 * (r['ppl'] / r['base_ppl'] - 1):+.1f}% |")
    lines += ["", steps.line() + f" ({os.cpu_count()} CPUs, {a.threads or os.cpu_count()} thread(s))"]
    table = "\n".join(lines) + "\n"
    (w / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
