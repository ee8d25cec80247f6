"""The `knnlm` task: fairseq's language-modeling task plus every kNN-LM option.

Stock `fairseq-eval-lm` builds a `SequenceScorer`; when this task is asked to dump or to
score with a datastore it hands eval_lm a `KNNSequenceScorer` instead (eval_lm looks the
class up in its own module at call time), and closes the datastore or export when the
batch iterator runs out, i.e. only after every batch was scored. Without those flags the
task is fairseq's language-modeling task, unchanged.
"""

import argparse
import logging
import os
import sys

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.sequence_scorer import SequenceScorer
from fairseq.tasks import register_task
from fairseq.data import LMContextWindowDataset
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from knnlm import options
from knnlm.cache import check_cache_options
from knnlm.dump import DumpSession
from knnlm.errors import ConfigError, KNNLMError
from knnlm.evaluation import Evaluation, check_model
from knnlm.lifecycle import end_process
from knnlm.memorisation import check_memorisation

from .memorisation import split_tokens

from .config import KNNLMConfig, option_groups
from .hooks import KEYTYPES
from .identity import model_identity
from .sequence_scorer import KNNSequenceScorer

logger = logging.getLogger("fairseq_plugins.knnlm")


def _command_line(name):
    """A flag of the eval_lm command line the task is not given (--path, --context-window)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(name)
    return p.parse_known_args(sys.argv[1:])[0].__dict__[name.lstrip("-").replace("-", "_")]


def _checkpoint_path():
    """The --path eval_lm was given (recorded in metadata only; weights are fingerprinted)."""
    return _command_line("--path")


def _excepthook(kind, value, tb, _default=sys.excepthook):
    # Our errors and SIGINT/SIGTERM: one line, unfinished files removed, exit at once (knnlm.lifecycle).
    end_process(value, "fairseq-eval-lm")
    _default(kind, value, tb)


class _InfScoresFilter(logging.Filter):
    """fairseq's eval_lm logs 'skipping tokens with inf scores:' with an argument but no %s, so
    every such record is a logging TypeError traceback (dozens at lambda = 1). Fix the first
    one's format and drop the rest: our kNN-LM line reports the infinite tokens."""

    MSG = "skipping tokens with inf scores:"

    def __init__(self):
        super().__init__()
        self.seen = 0

    def filter(self, record):
        if record.msg != self.MSG:
            return True
        self.seen += 1
        if self.seen > 1:
            return False
        record.msg = self.MSG + " %s (eval_lm leaves such tokens out of its perplexity; the kNN-LM line counts them; further such lines are not shown)"
        return True


_INF_FILTER = _InfScoresFilter()


@register_task("knnlm", dataclass=KNNLMConfig)
class KNNLanguageModelingTask(LanguageModelingTask):
    @classmethod
    def add_args(cls, parser):
        """fairseq's language-modeling flags, then ours in one group per job (see --help)."""
        gen_parser_from_dataclass(parser, LanguageModelingConfig())
        for title, group in option_groups():
            gen_parser_from_dataclass(parser.add_argument_group(title), group())

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets=targets)
        sys.excepthook = _excepthook  # our errors are messages for the user, not tracebacks
        # ChoiceEnum members: plain strings from here on
        for name in ("knn_keytype", "knn_sim_func", "knn_search", "knn_exact_dtype"):
            if getattr(args, name, None) is not None:
                setattr(args, name, str(getattr(args, name)))
        check_block_size(args)
        validate(args)
        if _INF_FILTER not in logging.getLogger("fairseq_cli.eval_lm").filters:
            logging.getLogger("fairseq_cli.eval_lm").addFilter(_INF_FILTER)
        self._scorer = None
        self._split = None
        self._context_window = 0
        if self._custom_scoring:
            for module in _eval_lm_modules():
                module.SequenceScorer = self.build_knn_scorer

    # ---- fairseq hooks ----
    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        self._split = split
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    def eval_lm_dataloader(self, dataset, **kwargs):
        self._context_window = kwargs.get("context_window", 0)
        if getattr(self.args, "legacy_datastore", False) and self._context_window <= 0:
            raise ConfigError("--legacy-datastore leaves out the blocks with no prior context, which without "
                              "--context-window is every block: pass --context-window (the original dump: 1536)")
        if self._context_window > 0 and kwargs.get("num_shards", 1) > 1:
            # fairseq pads a shard with empty batches, which its LMContextWindowDataset cannot
            # collate (KeyError: 'net_input'); ours returns them empty, and eval_lm skips them.
            dataset = _ShardSafeContextWindowDataset(
                dataset=dataset, tokens_per_sample=self.args.tokens_per_sample,
                context_window=self._context_window, pad_idx=self.source_dictionary.pad())
            kwargs["context_window"] = 0
        itr = super().eval_lm_dataloader(dataset, **kwargs)
        return _FinishOnExhaust(itr, self.finish) if self._custom_scoring else itr

    @property
    def _custom_scoring(self):
        a = self.args
        return a.knnlm or a.save_knnlm_dstore or a.continuous_cache

    # ---- kNN-LM ----
    def _options(self):
        """The run's options as the core's dataclasses (the same fields knnlm-hf has)."""
        a = self.args
        return (options.from_namespace(options.RetrievalOptions, a), options.from_namespace(options.ExportOptions, a),
                options.from_namespace(options.CacheOptions, a))

    def build_knn_scorer(self, tgt_dict, softmax_batch=None, **kwargs):
        """What eval_lm gets instead of SequenceScorer(tgt_dict, softmax_batch)."""
        if tgt_dict is not self.target_dictionary:
            # A later eval_lm run in the same process, with another task: not ours to change.
            return SequenceScorer(tgt_dict, softmax_batch, **kwargs)
        a = self.args
        common = dict(keytype=a.knn_keytype, remove_bos=a.add_bos_token, **kwargs)
        if a.save_knnlm_dstore:
            self._scorer = KNNSequenceScorer(tgt_dict, softmax_batch, dump=self._dump_session(),
                                             on_first_batch=self._identity,
                                             drop_first_block=getattr(a, "legacy_datastore", False), **common)
        else:
            retrieval, export, cache = self._options()
            evaluation = Evaluation.from_options(retrieval, export, cache, keytype=a.knn_keytype, overwrite=a.overwrite)
            self._scorer = KNNSequenceScorer(
                tgt_dict, softmax_batch, evaluation=evaluation,
                on_first_batch=self._check_model if evaluation.knn is not None else None, **common)
        return self._scorer

    def _knnlm(self):
        """The method object, from the registry (generation)."""
        from knnlm.retrieval.factory import build

        return build(self._options()[0])

    def build_generator(self, models, args, **kwargs):
        """fairseq-generate / fairseq-interactive: sample or search from the kNN-LM distribution."""
        if self.args.knnlm:
            from .generation import KNNLMForGeneration

            if len(models) != 1:
                raise ConfigError("kNN-LM generation takes one model (pass one checkpoint to --path)")
            knn = self._knnlm()
            check_model(knn, self._identity(models[0]), keytype=self.args.knn_keytype,
                        allow_model_mismatch=self.args.knn_allow_model_mismatch)
            models = [KNNLMForGeneration(models[0], knn, keytype=self.args.knn_keytype)]
        return super().build_generator(models, args, **kwargs)

    def _identity(self, model):
        return model_identity(model, self.target_dictionary)

    def _dump_session(self):
        """The datastore this run writes; its files are created at the first batch (DumpSession.start)."""
        a = self.args
        return DumpSession(
            a.dstore_mmap, keytype=a.knn_keytype, fp16=a.dstore_fp16, expected_size=a.dstore_size,
            overwrite=a.overwrite,
            extra={
                "checkpoint": _checkpoint_path(), "data": _absolute_data(a.data), "split": self._split,
                "context_window": self._context_window,
                "tokens_per_sample": a.tokens_per_sample + self._context_window,
                "sample_break_mode": str(a.sample_break_mode), "add_bos_token": a.add_bos_token,
                "legacy_datastore": bool(getattr(a, "legacy_datastore", False)),
            },
        )

    def _check_model(self, model):
        """At the first batch: refuse a datastore of another model or of the very split scored; open the export."""
        a = self.args
        identity = self._identity(model)
        ev = self._scorer.evaluation
        datastore = ev.knn.retriever.datastore
        datastore.check_split(self._split, a.data, allow_same_split=a.knn_allow_same_split)
        check_memorisation(datastore, split_tokens(self, self._split), allow=a.knn_allow_same_split,
                           what=f"split '{self._split}' of {a.data}")
        ev.start(identity, meta={"split": self._split, "context_window": self._context_window})
        return identity

    def finish(self):
        """Runs once every batch has been scored: only now is a dump or export complete."""
        for module in _eval_lm_modules():
            module.SequenceScorer = SequenceScorer  # leave eval_lm as we found it
        s = self._scorer
        if s is None:
            return
        if s.dump is not None and not s.dump.started:
            shards = _command_line("--num-shards")
            where = f"shard {_command_line('--shard-id') or 0} of {shards}" if shards and int(shards) > 1 else "the run"
            raise KNNLMError(
                f"nothing was dumped to {self.args.dstore_mmap}: {where} of split {self._split} "
                f"received no batch (the split has fewer batches than shards). Use fewer "
                f"--num-shards or a smaller --max-tokens")
        if s.dump is not None:
            s.dump.finish()
        if s.evaluation is not None:
            for line in s.evaluation.finish(inf_note="; eval_lm's line below skips them",
                                            grid_meta={"split": self._split, "context_window": self._context_window}):
                logger.info(line)
        s.close()


def _eval_lm_modules():
    """fairseq's eval_lm module, imported (fairseq-eval-lm) or run as `python -m fairseq_cli.eval_lm`."""
    modules = [sys.modules.get("fairseq_cli.eval_lm")]
    main = sys.modules.get("__main__")
    run_as = getattr(getattr(main, "__spec__", None), "name", None)
    path = os.path.normpath(getattr(main, "__file__", None) or "")
    if run_as == "fairseq_cli.eval_lm" or path.endswith(os.path.join("fairseq_cli", "eval_lm.py")):
        modules.append(main)
    return [m for m in modules if m is not None]


class _FinishOnExhaust:
    """Wraps eval_lm's batch iterator; calls `finish` after the consumer took the last batch."""

    def __init__(self, itr, finish):
        self._itr, self._finish = itr, finish

    def __len__(self):
        return len(self._itr)

    def __getattr__(self, name):
        return getattr(self._itr, name)

    def __iter__(self):
        yield from self._itr
        self._finish()


def validate(a):
    """Refuse impossible option combinations before any model or data is loaded: the dump's
    here, the scoring, export and cache options in the core (the same checks as knnlm-hf)."""
    if a.knnlm and a.save_knnlm_dstore:
        raise ConfigError("--knnlm scores with a datastore and --save-knnlm-dstore writes one: pick one per run")
    if str(a.knn_keytype) not in KEYTYPES:
        raise ConfigError(f"--knn-keytype must be one of {', '.join(KEYTYPES)}, got {a.knn_keytype!r}")
    if a.save_knnlm_dstore and not a.dstore_mmap:
        raise ConfigError("--save-knnlm-dstore needs --dstore-mmap PREFIX (where to write the datastore)")
    if a.continuous_cache and a.save_knnlm_dstore:
        raise ConfigError("--continuous-cache scores; --save-knnlm-dstore dumps: pick one per run")
    if getattr(a, "legacy_datastore", False) and not a.save_knnlm_dstore:
        raise ConfigError("--legacy-datastore shapes a dump: it needs --save-knnlm-dstore")
    retrieval = options.from_namespace(options.RetrievalOptions, a)
    options.validate(retrieval, export=options.from_namespace(options.ExportOptions, a))
    cache = options.from_namespace(options.CacheOptions, a)
    check_cache_options(cache)
    if cache.cache_keytype is not None and cache.cache_keytype not in KEYTYPES:
        raise ConfigError(f"--cache-keytype must be one of {', '.join(KEYTYPES)}, got {cache.cache_keytype!r}")


def check_block_size(a):
    """fairseq-eval-lm subtracts --context-window from --tokens-per-sample before the task sees it;
    the original kNN-LM README's `--tokens-per-sample 1536 --context-window 1536` leaves no token
    to score (its eval_lm used the checkpoint's 3072) and fairseq dies on a division by zero."""
    if a.tokens_per_sample > 0:
        return
    try:
        window = int(_command_line("--context-window") or 0)
    except ValueError:
        window = 0
    given = a.tokens_per_sample + window
    raise ConfigError(
        f"--tokens-per-sample {given} leaves no token to score with --context-window {window}: "
        f"fairseq-eval-lm scores blocks of tokens-per-sample minus context-window new tokens. The "
        f"original kNN-LM code's eval_lm used the checkpoint's tokens-per-sample instead; for its "
        f"blocks of {given} new tokens with {window} of context pass "
        f"--tokens-per-sample {given + window} --context-window {window}"
    )


def _absolute_data(data):
    """The data directory as recorded in a datastore's metadata: absolute, so that knnlm-check and
    the same-split check find it from any working directory (fairseq's `a:b` lists stay as given)."""
    return os.path.abspath(data) if data and os.pathsep not in data else data


class _ShardSafeContextWindowDataset(LMContextWindowDataset):
    def collater(self, samples):
        return {} if len(samples) == 0 else super().collater(samples)
