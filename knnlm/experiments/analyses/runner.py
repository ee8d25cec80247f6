"""Running the tools an analysis step needs: as a separate process with its log, or in the
analyses' own process (fairseq-eval-lm, knnlm-tune, knnlm.subset, knnlm.sweeps, binarizing)."""

import contextlib
import io
import logging
import shlex
import shutil
import sys
from pathlib import Path

from .. import demo as demo_mod
from ..demo import PLUGIN_DIR, SHOW_EVAL, Demo, DemoError, run_tool, tool
from .settings import log


class ToolRunner:
    """The tool-running half of `Analyses`: needs `cfg`, `dcfg`, `env` and `logs_dir`."""

    def log_path(self, name):
        return self.logs_dir / f"{name}.log"

    def tool(self, name, prog, *args, show=demo_mod.SHOW_ALL, env=None):
        return run_tool([*tool(prog), *args], self.log_path(name), show=show, env={**self.env, **(env or {})})

    def python(self, name, module, *args, show=demo_mod.SHOW_ALL):
        return run_tool([sys.executable, "-m", module, *args], self.log_path(name), show=show, env=self.env)

    def inprocess(self, name, prog, main, argv, log_path=None):
        """A console tool's main(argv) in this process (no interpreter start-up), output to the log."""
        argv = [str(a) for a in argv]
        log.info("$ %s %s", prog, shlex.join(argv))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            rc = main(argv)
        log_path = log_path or self.log_path(name)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(f"\n$ {prog} {shlex.join(argv)}\n{buf.getvalue()}")
        if rc:
            raise DemoError(f"{prog} exited with status {rc}:\n{buf.getvalue()[-2000:]}\n"
                            f"full output: {log_path}")
        return buf.getvalue().splitlines()

    def eval_lm(self, name, data, ckpt, split, keytype, *args, dcfg=None):
        """fairseq-eval-lm with the demo's evaluation settings (as knnlm.demo's eval_lm); in this
        process unless eval.in_process is false."""
        c = dcfg or self.dcfg
        argv = [data, "--path", ckpt, "--user-dir", PLUGIN_DIR, "--task", "knnlm",
                "--gen-subset", split, "--tokens-per-sample", c.model.tokens_per_sample,
                "--context-window", c.context_window, "--max-tokens", c.eval_max_tokens,
                # "simple", not tqdm: no progress bars to untangle from the log lines we parse (the
                # plugin's kNN-LM summary is logged while tqdm's bar line is still open).
                "--knn-keytype", keytype, "--cpu", "--num-workers", 0, "--log-format", "simple", *args]
        if self.cfg.eval.in_process:
            return self.eval_lm_inprocess(name, argv)
        return self.tool(name, "fairseq-eval-lm", *argv, show=SHOW_EVAL)

    def eval_lm_inprocess(self, name, argv, show=SHOW_EVAL, log_path=None):
        """fairseq-eval-lm's own cli_main, run in this process: the same code and log lines as
        the tool, without its interpreter and fairseq start-up (~5 s of CPU, most of a small
        step). Its log records go to the step's log (those matching `show` to the console too);
        what it changes in the process (the plugin's scorer hook, excepthook, threads, the
        logging level) is put back afterwards."""
        import gc
        import re
        import traceback
        import warnings

        argv = [str(a) for a in argv]
        log_path = log_path or self.log_path(name)
        log.info("$ fairseq-eval-lm %s  (in this process)", shlex.join(argv))
        lines, show_re = [], re.compile(show)
        root = logging.getLogger()
        with open(log_path, "a", encoding="utf-8") as out:
            out.write(f"\n$ fairseq-eval-lm {shlex.join(argv)}  (in this process)\n")
            capture = _CaptureHandler(out, lines, show_re)
            quiet = _OnlyOurs()
            consoles = list(root.handlers)
            for h in consoles:
                h.addFilter(quiet)
            if not consoles:  # else fairseq_cli.eval_lm's import-time basicConfig would add one for good
                root.addHandler(placeholder := logging.NullHandler())
            root.addHandler(capture)
            level, hook = root.level, sys.excepthook
            root.setLevel(min(level or logging.INFO, logging.INFO))
            threads = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    import torch
                    from fairseq import distributed_utils, options
                    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
                    import fairseq_cli.eval_lm as fairseq_eval_lm

                    scorer = fairseq_eval_lm.SequenceScorer
                    if self.dcfg.threads:  # what OMP_NUM_THREADS does for the tool
                        threads = torch.get_num_threads()
                        torch.set_num_threads(int(self.dcfg.threads))
                    try:
                        args = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=argv)
                        distributed_utils.call_main(convert_namespace_to_omegaconf(args), fairseq_eval_lm.main)
                    finally:
                        fairseq_eval_lm.SequenceScorer = scorer  # the plugin's hook holds its task alive
            except (Exception, SystemExit) as e:
                if isinstance(e, SystemExit) and not e.code:
                    pass
                else:
                    out.write(traceback.format_exc())
                    tail = "\n".join(f"    {line}" for line in [*lines[-20:], f"{type(e).__name__}: {e}"])
                    raise DemoError(f"fairseq-eval-lm (in this process) failed; its last lines:\n{tail}\n"
                                    f"full output: {log_path}") from None
            finally:
                root.removeHandler(capture)
                if not consoles:
                    root.removeHandler(placeholder)
                for h in consoles:
                    h.removeFilter(quiet)
                root.setLevel(level)
                sys.excepthook = hook
                if threads:
                    torch.set_num_threads(threads)
                gc.collect()
        return lines


    def binarize(self, name, srcdict, dest, **splits):
        """Binarize tokenized text files with an existing dictionary into `dest` (split name ->
        text), as `fairseq-preprocess --only-source --srcdict` does (byte-identical output: the
        same Dictionary.encode_line and mmap builder), in this process: no tool start-up."""
        from fairseq.data import Dictionary, indexed_dataset

        dest = Path(dest)
        tmp = Path(f"{dest}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        d = Dictionary.load(str(srcdict))
        shutil.copyfile(srcdict, tmp / "dict.txt")
        with open(self.log_path(name), "a", encoding="utf-8") as out:
            for split, text in splits.items():
                builder = indexed_dataset.make_builder(str(tmp / f"{split}.bin"), impl="mmap", vocab_size=len(d))
                n_lines = n_tok = n_unk = 0
                with open(text, encoding="utf-8") as f:
                    for line in f:
                        ids = d.encode_line(line, add_if_not_exist=False, append_eos=True).long()
                        builder.add_item(ids)
                        n_lines += 1
                        n_tok += len(ids)
                        n_unk += int((ids == d.unk()).sum())
                builder.finalize(str(tmp / f"{split}.idx"))
                msg = (f"binarized {text} -> {dest / split}.bin: {n_lines:,} lines, {n_tok:,} tokens, "
                       f"{n_unk:,} <unk> (dictionary {srcdict}, {len(d):,} types)")
                out.write(msg + "\n")
                log.info("    %s", msg)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)


class InProcessDemo(Demo):
    """knnlm.demo's steps, their fairseq-eval-lm and knnlm-tune runs (the demo's datastore, export
    and tuning) in the analyses' process when eval.in_process: the same argv and log, no tool
    start-up. Training and fairseq-preprocess stay separate processes."""

    def __init__(self, cfg, analyses):
        self.analyses = analyses
        super().__init__(cfg)

    def tool(self, step, name, *args, show=demo_mod.SHOW_ALL):
        if name == "fairseq-eval-lm" and self.analyses.cfg.eval.in_process:
            return self.analyses.eval_lm_inprocess(step, args, show=show, log_path=self.logs_dir / f"{step}.log")
        if name == "knnlm-tune" and self.analyses.cfg.eval.in_process:
            from ...offline.tune import main as tune_main

            return self.analyses.inprocess(step, name, tune_main, args, log_path=self.logs_dir / f"{step}.log")
        return super().tool(step, name, *args, show=show)


class _CaptureHandler(logging.Handler):
    """fairseq-eval-lm's log records, formatted as the tool prints them, into its step's log and
    `lines`; those matching `show` also to the console."""

    def __init__(self, out, lines, show_re):
        super().__init__(logging.INFO)
        self.out, self.lines, self.show_re = out, lines, show_re
        self.setFormatter(logging.Formatter("%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                                            datefmt="%Y-%m-%d %H:%M:%S"))

    def emit(self, record):
        line = self.format(record)
        self.lines.append(line)
        self.out.write(line + "\n")
        if self.show_re.search(line):
            print(f"    {line[:200]}", flush=True)


class _OnlyOurs(logging.Filter):
    """Keeps the console to this module's and the demo's records while fairseq runs in-process."""

    def filter(self, record):
        return record.name.startswith(("knnlm.analyses", "knnlm.demo"))
