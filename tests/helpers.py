"""Helpers for the dump and kNN-LM eval tests (tests/test_dump.py, tests/test_knnlm_eval.py).

* `EvalLM`: runs fairseq's own `fairseq-eval-lm` entry point (`fairseq_cli.eval_lm.cli_main`,
  exactly what the console script calls) in a fresh forked process per run. The parent has
  imported fairseq once, so a run costs what eval_lm itself costs, not ~5 s of imports; each run
  still gets its own process (nothing one run patches leaks into the next), its own argv, exit
  status, stdout and stderr, and `--user-dir` is imported by fairseq in the child as on the
  command line. `pre` injects Python code before `cli_main` (fault injection).
* References computed without the plugin: the targets eval_lm scores (from the binarized split
  and fairseq's block/batching rules) and the decoder states each key type names (from
  `inner_states` and the final layer's submodules, applied by hand).
* `build_index`: a FAISS index plus the metadata `knnlm.index` expects.
"""

import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN = str(REPO / "fairseq_plugins")
KEYTYPES = ("last_ffn_input", "last_ffn_input_before_ln", "last_attn_input",
            "last_attn_input_before_ln", "decoder_output", "decoder_output_ln")


# ----------------------------------------------------------------------------- fork server
@dataclass
class Result:
    argv: list
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self):
        return self.stdout + self.stderr

    def __str__(self):
        return (f"fairseq-eval-lm {' '.join(self.argv)} -> {self.returncode}\n"
                f"--- stdout (tail) ---\n{self.stdout[-3000:]}\n--- stderr (tail) ---\n{self.stderr[-3000:]}")


def _serve(parallel):
    """Server loop (runs in its own process): read a JSON list of jobs per line, answer one line."""
    import warnings

    warnings.simplefilter("ignore")
    import torch  # noqa: F401
    import fairseq_cli.eval_lm as eval_lm_module  # the import cost paid once

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing but answers on the pipe
    print("ready", file=out, flush=True)
    for line in sys.stdin:
        jobs = json.loads(line)
        rcs = [None] * len(jobs)
        running = {}  # pid -> (job index, deadline)
        todo = list(range(len(jobs)))
        while todo or running:
            while todo and len(running) < parallel:
                i = todo.pop(0)
                pid = os.fork()
                if pid == 0:
                    _child(jobs[i], eval_lm_module)  # never returns
                running[pid] = (i, time.monotonic() + jobs[i]["timeout"])
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                now = time.monotonic()
                for p, (i, deadline) in running.items():
                    if now > deadline:
                        os.kill(p, signal.SIGKILL)
                time.sleep(0.02)
                continue
            i, _ = running.pop(pid)
            rcs[i] = os.waitstatus_to_exitcode(status)
        print(json.dumps(rcs), file=out, flush=True)


def _child(job, eval_lm_module):
    code = 1
    try:
        import torch

        torch.set_num_threads(1)
        fo = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        fe = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fo, 1)
        os.dup2(fe, 2)
        sys.stdin = open(os.devnull)
        sys.argv = ["fairseq-eval-lm", *job["argv"]]
        try:
            exec(job.get("pre") or "", {"__name__": "__pre__"})
            code = eval_lm_module.cli_main()  # what the console script passes to sys.exit
            code = 0 if code is None else code
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            sys.excepthook(*sys.exc_info())  # what the interpreter does with an uncaught error
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else 1)


class EvalLM:
    """A pre-imported fairseq-eval-lm; `run(...)`/`run_many(...)` fork one process per run."""

    def __init__(self, workdir, parallel=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.parallel = parallel or min(2, os.cpu_count() or 1)
        env = dict(os.environ, PYTHONWARNINGS="ignore")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.parallel)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO),
        )
        self._ready = False
        self._lock = threading.Lock()
        self._n = 0

    def _readline(self, timeout):
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise AssertionError(f"eval_lm server gave no answer within {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"eval_lm server died (exit {self.proc.poll()})")
        return line

    def run_many(self, runs, timeout=300):
        """runs: list of dicts {argv: [...], pre: optional code} -> list of Result."""
        with self._lock:
            if not self._ready:
                assert self._readline(120).strip() == "ready"
                self._ready = True
            jobs = []
            for r in runs:
                self._n += 1
                base = self.workdir / f"run{self._n:03d}"
                jobs.append({"argv": [str(a) for a in r["argv"]], "pre": r.get("pre"), "timeout": timeout,
                             "stdout": f"{base}.out", "stderr": f"{base}.err"})
            self.proc.stdin.write(json.dumps(jobs) + "\n")
            self.proc.stdin.flush()
            rcs = json.loads(self._readline(timeout * len(jobs) + 60))
        return [Result(j["argv"], rc, Path(j["stdout"]).read_text(errors="replace"),
                       Path(j["stderr"]).read_text(errors="replace")) for j, rc in zip(jobs, rcs)]

    def run(self, argv, pre=None, check=True, timeout=300):
        res = self.run_many([{"argv": argv, "pre": pre}], timeout=timeout)[0]
        if check:
            assert res.returncode == 0, str(res)
        return res

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def knn_argv(data, ckpt, *args):
    """argv of `fairseq-eval-lm DATA --path CKPT --user-dir fairseq_plugins --task knnlm ...` (as conftest.eval_lm)."""
    return [data, "--path", ckpt, "--user-dir", PLUGIN, "--task", "knnlm", "--cpu", "--num-workers", "0",
            "--no-progress-bar", *args]


def stock_argv(data, ckpt, *args):
    """argv of stock `fairseq-eval-lm DATA --path CKPT --task language_modeling ...` (no plugin)."""
    return [data, "--path", ckpt, "--task", "language_modeling", "--cpu", "--num-workers", "0",
            "--no-progress-bar", *args]


# ----------------------------------------------------------------------------- parsing eval_lm output
def evaluated_tokens(output):
    m = re.findall(r"Evaluated ([0-9,]+) tokens", output)
    assert m, output[-2000:]
    return int(m[-1].replace(",", ""))


def loss_line(output):
    m = re.findall(r"Loss \(base 2\): -?[0-9.]+, Perplexity: (?:[0-9.]+|inf)", output)
    assert m, output[-2000:]
    return m[-1]


def word_probs(output):
    """--output-word-probs lines in the order eval_lm printed them: [(sample id, [(word, logp), ...])]."""
    rows = []
    for sid, rest in re.findall(r"fairseq_cli\.eval_lm:(\d+) (.*)", output):
        rows.append((int(sid), [(w, float(p)) for w, p in re.findall(r"(\S+) \[(-?[0-9.]+|-?inf)\]", rest)]))
    assert rows, output[-2000:]
    return rows


# ----------------------------------------------------------------------------- references
def load_split(data, split="test"):
    """The binarized split as a list of 1-D LongTensors (one per line, each ending in </s>) and its dictionary."""
    from fairseq.data import Dictionary, data_utils

    d = Dictionary.load(os.path.join(data, "dict.txt"))
    ds = data_utils.load_indexed_dataset(os.path.join(data, split), d)
    return [ds[i].long() for i in range(len(ds))], d


def scored_blocks(lines, tokens_per_sample, break_mode="none"):
    """The blocks eval_lm scores, by sample id: [(start, end)] spans of the token stream.

    fairseq's rules, written out independently: the stream (lines concatenated, each with its
    </s>) is cut into blocks of `tokens_per_sample` (with --context-window C eval_lm has already
    subtracted C) -- contiguous for break mode `none`, whole lines packed greedily for
    `complete`; every token of the split, the first included, is a target exactly once. The
    order in which eval_lm batches the blocks is fairseq's (seeded shuffle among equal sizes
    without a context window): take it from the sample ids eval_lm prints (`word_probs`).
    """
    sizes = [len(x) for x in lines]
    total = sum(sizes)
    if break_mode == "none":
        return [(s, min(s + tokens_per_sample, total)) for s in range(0, total, tokens_per_sample)]
    if break_mode != "complete":
        raise ValueError(break_mode)
    spans, start, cur = [], 0, 0
    for n in sizes:
        if cur and cur + n > tokens_per_sample:
            spans.append((start, start + cur))
            start, cur = start + cur, 0
        cur += n
    if cur:
        spans.append((start, start + cur))
    return spans


def model_inputs(stream, span, context_window, eos):
    """(input tokens, number of scored positions at its end) for one block.

    The input at position t is the token before target t (</s> before the first), plus up to
    `context_window` earlier inputs as unscored context.
    """
    import torch

    src = torch.cat([torch.tensor([eos]), stream])
    s, e = span
    return src[max(0, s - context_window):e], e - s


def load_model(ckpt):
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([ckpt])
    model = models[0].eval()
    return model, task


def hand_states(model, tokens):
    """Every key type's state for `tokens` (B, T), computed without any hook: dict name -> (B, T, C).

    The final layer's input and output come from the decoder's `inner_states`; what happens in
    between is recomputed from the layer's submodules (and checked to reproduce its output).
    """
    import torch

    dec = model.decoder
    layer = dec.layers[-1]
    for extra in ("attn_ln", "ffn_layernorm", "w_resid", "c_attn"):
        assert getattr(layer, extra, None) is None, f"hand computation does not cover {extra}"
    with torch.no_grad():
        _, extra = dec(tokens, features_only=True)
        inner = extra["inner_states"]
        x, out = inner[-2], inner[-1]  # (T, B, C): the final layer's input and output
        pad = tokens.eq(dec.padding_idx)
        pad = pad if pad.any() else None
        mask = torch.triu(torch.full((x.size(0), x.size(0)), float("-inf")), 1)
        pre = layer.normalize_before
        attn_in = layer.self_attn_layer_norm(x) if pre else x
        a, _ = layer.self_attn(query=attn_in, key=attn_in, value=attn_in, key_padding_mask=pad,
                               need_weights=False, attn_mask=mask)
        h = x + a
        ffn_in = layer.final_layer_norm(h) if pre else layer.self_attn_layer_norm(h)
        y = layer.fc2(layer.activation_fn(layer.fc1(ffn_in)))
        y = h + y if pre else layer.final_layer_norm(ffn_in + y)
        keep = (~pad).T.unsqueeze(-1) if pad is not None else torch.ones_like(y, dtype=torch.bool)
        diff = ((y - out).abs() * keep).max().item()
        assert diff < 1e-5, f"hand-computed final layer output differs from inner_states[-1] by {diff}"
        if dec.layer_norm is not None:
            out_ln = dec.layer_norm(out)
        elif not pre:
            out_ln = out
        else:
            out_ln = None
    states = {
        "last_ffn_input": ffn_in,
        "last_ffn_input_before_ln": h,
        "last_attn_input": attn_in,
        "last_attn_input_before_ln": x,
        "decoder_output": out,
        "decoder_output_ln": out_ln,
    }
    return {k: (v.transpose(0, 1).contiguous() if v is not None else None) for k, v in states.items()}


def reference_dump(model, lines, dictionary, keytypes, order, tokens_per_sample, break_mode="none",
                   context_window=0):
    """The (keys per key type, values) eval_lm should dump, for the blocks in `order` (sample ids).

    All blocks go through the decoder as one right-padded batch (padding cannot reach earlier
    positions through the causal mask).
    """
    import numpy as np
    import torch

    stream = torch.cat(lines)
    spans = scored_blocks(lines, tokens_per_sample, break_mode)
    inputs = [model_inputs(stream, spans[i], context_window, dictionary.eos()) for i in order]
    tokens = torch.full((len(inputs), max(len(x) for x, _ in inputs)), dictionary.pad(), dtype=torch.long)
    for row, (x, _) in enumerate(inputs):
        tokens[row, :len(x)] = x
    st = hand_states(model, tokens)
    keys = {k: np.concatenate([st[k][row, len(x) - n:len(x)].numpy() for row, (x, n) in enumerate(inputs)])
            for k in keytypes}
    vals = np.concatenate([stream[spans[i][0]:spans[i][1]].numpy() for i in order])
    return keys, vals


# ----------------------------------------------------------------------------- indexes
def build_index(dstore_prefix, index_path, factory="Flat"):
    """FAISS index over a complete datastore's keys (ids = rows) and its `complete` metadata."""
    import faiss
    import numpy as np

    from knnlm.artefacts import write_json_atomic
    from knnlm.store.datastore import Datastore

    ds = Datastore.open(dstore_prefix)
    keys = np.ascontiguousarray(np.asarray(ds.keys, dtype=np.float32))
    index = faiss.index_factory(ds.dim, factory)
    if not index.is_trained:
        index.train(keys)
    index.add(keys)
    faiss.write_index(index, str(index_path))
    write_json_atomic(f"{index_path}.meta.json", {"complete": True, "datastore_fingerprint": ds.fingerprint,
                                                  "datastore": ds.prefix, "factory": factory})
    return index.ntotal


if __name__ == "__main__" and len(sys.argv) >= 2 and sys.argv[1] == "--serve":
    _serve(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
