"""The `knnlm` task: fairseq's language-modeling task plus every kNN-LM option.

Stock `fairseq-eval-lm` builds a `SequenceScorer`; when this task is asked to dump or to
score with a datastore it hands eval_lm a `KNNSequenceScorer` instead (eval_lm looks the
class up in its own module at call time), and closes the datastore or export when the
batch iterator runs out, i.e. only after every batch was scored. Without those flags the
task is fairseq's language-modeling task, unchanged.
"""

import argparse
import logging
import math
import os
import sys

from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.sequence_scorer import SequenceScorer
from fairseq.tasks import register_task
from fairseq.data import LMContextWindowDataset
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from knnlm.dump import DumpSession
from knnlm.errors import ConfigError, KNNLMError
from knnlm.lifecycle import end_process
from knnlm.memorisation import check_memorisation

from .memorisation import split_tokens
from knnlm.model import KNNLM, summary_line
from knnlm.retrieval import AdaptiveRetriever, ExactRetriever, FaissRetriever, RetoMatonRetriever
from knnlm.retrieval.exact import parse_devices
from knnlm.scoring import SIM_FUNCS, check_lambda, check_temperature
from knnlm.store import open_datastore as open_store

from .config import OPTION_GROUPS, KNNLMConfig
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
        for title, group in OPTION_GROUPS:
            gen_parser_from_dataclass(parser.add_argument_group(title), group())

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets=targets)
        sys.excepthook = _excepthook  # our errors are messages for the user, not tracebacks
        # ChoiceEnum members: plain strings from here on
        for name in ("knn_keytype", "knn_sim_func", "knn_search", "knn_exact_dtype"):
            if hasattr(args, name):
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
            knn = self._knnlm() if a.knnlm else None
            cache = None
            if a.continuous_cache:
                from .cache_grid import CacheGrid

                cache = {"lmbda": a.cache_lmbda, "theta": a.cache_theta, "size": a.cache_size,
                         "keytype": getattr(a, "cache_keytype", None) or a.knn_keytype,
                         "context": getattr(a, "cache_include_context", False),
                         "grid": (CacheGrid(a.cache_grid_lambdas, a.cache_grid_thetas, with_knn=a.knnlm)
                                  if getattr(a, "cache_grid_json", None) else None)}
            self._scorer = KNNSequenceScorer(
                tgt_dict, softmax_batch, knn=knn, cache=cache,
                on_first_batch=(lambda model: self._check_model(model, knn.retriever.datastore)) if a.knnlm else None,
                **common,
            )
        return self._scorer

    def _knnlm(self):
        """The method object: a retriever over the datastore (FAISS, or exact search), lambda and the temperature."""
        a = self.args
        if getattr(a, "knn_search", "faiss") == "exact":
            retriever = ExactRetriever(open_datastore(a), k=a.k, sim_func=a.knn_sim_func, dtype=a.knn_exact_dtype,
                                       devices=parse_devices(a.knn_exact_devices))
        else:
            retriever = FaissRetriever(a.indexfile, open_datastore(a), k=a.k, nprobe=a.probe,
                                       sim_func=a.knn_sim_func, gpu=a.knn_gpu, k_factor=a.knn_k_factor,
                                       allow_index_without_fingerprint=a.knn_allow_index_without_fingerprint)
        if a.retomaton:
            retriever = RetoMatonRetriever(retriever, min_pointers=a.retomaton_min_pointers,
                                           max_pointers=a.retomaton_max_pointers,
                                           clusters=getattr(a, "retomaton_cluster", None))
        if getattr(a, "adaptive_retrieval", None):
            retriever = AdaptiveRetriever(retriever, a.adaptive_retrieval, skip=a.adaptive_skip,
                                          threshold=a.adaptive_threshold)
        return KNNLM(retriever, lmbda=a.lmbda, temperature=a.knn_temp)

    def build_generator(self, models, args, **kwargs):
        """fairseq-generate / fairseq-interactive: sample or search from the kNN-LM distribution."""
        if self.args.knnlm:
            from .generation import KNNLMForGeneration

            if len(models) != 1:
                raise ConfigError("kNN-LM generation takes one model (pass one checkpoint to --path)")
            if getattr(self.args, "adaptive_retrieval", None):
                raise ConfigError("--adaptive-retrieval is not wired into generation in this version: it "
                                  "scores with fairseq-eval-lm (and knnlm.AdaptiveRetriever in Python)")
            knn = self._knnlm()
            knn.retriever.datastore.check_compatible(keytype=self.args.knn_keytype,
                                                     allow_model_mismatch=self.args.knn_allow_model_mismatch,
                                                     **self._identity(models[0]).as_dict())
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

    def _check_model(self, model, datastore):
        """At the first batch: refuse a datastore of another model; open the export if asked."""
        a = self.args
        identity = self._identity(model)
        datastore.check_compatible(keytype=a.knn_keytype, allow_model_mismatch=a.knn_allow_model_mismatch,
                                   **identity.as_dict())
        datastore.check_split(self._split, a.data, allow_same_split=getattr(a, "knn_allow_same_split", False))
        check_memorisation(datastore, split_tokens(self, self._split), allow=getattr(a, "knn_allow_same_split", False),
                           what=f"split '{self._split}' of {a.data}")
        predictor = getattr(self._scorer.knn.retriever, "predictor", None)
        if predictor is not None:
            predictor.check_compatible(identity=identity, allow_model_mismatch=a.knn_allow_model_mismatch)
        if a.knnlm_dump_probs:
            from knnlm.features import feature_names
            from knnlm.ngrams import MAX_ORDER
            from knnlm.offline.export import ExportWriter

            kept = a.k if a.knnlm_dump_neighbors < 0 else min(a.knnlm_dump_neighbors, a.k)
            self._scorer.export = ExportWriter(
                a.knnlm_dump_probs, kept, sim_func=a.knn_sim_func, temperature=a.knn_temp,
                lmbda=a.lmbda, with_ids=a.knnlm_dump_ids, overwrite=a.overwrite,
                feature_names=feature_names(self._scorer.feature_top_k), context_order=MAX_ORDER,
                meta={"split": self._split, "datastore": datastore.prefix,
                      "datastore_fingerprint": datastore.fingerprint, "index": a.indexfile,
                      "context_window": self._context_window, **identity.as_dict()},
            )
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
        if s.export is not None:
            s.export.finalize()
            logger.info(f"per-token export written to {self.args.knnlm_dump_probs}")
        summary = s.summary()
        if summary and (s.knn is not None or s.cache is not None):
            a = self.args
            setting = s.knn.describe() if s.knn is not None else "no datastore"
            if a.continuous_cache:
                setting += f"; continuous cache lambda={a.cache_lmbda}, theta={a.cache_theta}"
                if getattr(a, "cache_keytype", None) or getattr(a, "cache_include_context", False):
                    setting += (f", {s.cache['keytype']} states, memory {a.cache_size or 'the whole sample'}"
                                f"{' including the context window' if s.cache['context'] else ''}")
            logger.info(summary_line(summary, setting, inf_note="; eval_lm's line below skips them"))
        if s.cache is not None and s.cache.get("grid") is not None:
            for line in s.cache["grid"].write(a.cache_grid_json, overwrite=a.overwrite, meta={
                    "split": self._split, "keytype": s.cache["keytype"], "cache_size": a.cache_size,
                    "include_context": s.cache["context"], "context_window": self._context_window,
                    "knn_lmbda": a.lmbda if a.knnlm else None}):
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
    """Refuse impossible option combinations before any model or data is loaded."""
    if a.knnlm and a.save_knnlm_dstore:
        raise ConfigError("--knnlm scores with a datastore and --save-knnlm-dstore writes one: pick one per run")
    if str(a.knn_keytype) not in KEYTYPES:
        raise ConfigError(f"--knn-keytype must be one of {', '.join(KEYTYPES)}, got {a.knn_keytype!r}")
    if a.save_knnlm_dstore and not a.dstore_mmap:
        raise ConfigError("--save-knnlm-dstore needs --dstore-mmap PREFIX (where to write the datastore)")
    if a.knnlm:
        exact = str(getattr(a, "knn_search", "faiss")) == "exact"
        if exact:
            if not a.dstore_filename:
                raise ConfigError("--knnlm --knn-search exact needs --dstore-filename PREFIX (no index file)")
            if str(a.knn_sim_func) == "do_not_recomp_l2":
                raise ConfigError("--knn-search exact computes exact distances and has no index distances to keep: "
                                  "--knn-sim-func do_not_recomp_l2 needs --knn-search faiss; use l2 (or dot)")
            if a.no_load_keys:
                raise ConfigError("--knn-search exact searches the keys themselves: drop --no-load-keys")
            if a.knn_k_factor != 1:
                raise ConfigError("--knn-k-factor re-ranks FAISS's candidates; --knn-search exact has no index to "
                                  "re-rank: drop it")
        elif not a.dstore_filename or not a.indexfile:
            raise ConfigError("--knnlm needs both --dstore-filename PREFIX and --indexfile INDEX")
        check_lambda(a.lmbda)
        check_temperature(a.knn_temp)
        if a.k < 1:
            raise ConfigError(f"--k must be at least 1, got {a.k}")
        if a.probe < 1:
            raise ConfigError(f"--probe must be at least 1, got {a.probe}")
        if str(a.knn_sim_func) not in SIM_FUNCS:
            raise ConfigError(f"--knn-sim-func must be one of {', '.join(SIM_FUNCS)}, got {a.knn_sim_func!r}")
        if a.no_load_keys and a.knn_sim_func != "do_not_recomp_l2":
            raise ConfigError("--no-load-keys leaves no keys to recompute distances from: add --knn-sim-func do_not_recomp_l2")


    if a.retomaton:
        if not a.knnlm:
            raise ConfigError("--retomaton changes how --knnlm retrieves: add --knnlm")
        if a.knnlm_dump_probs:
            raise ConfigError("--retomaton scores pointer candidates, not the k nearest neighbors an export "
                              "records for re-scoring: drop --knnlm-dump-probs (export a plain --knnlm run)")
        if a.retomaton_min_pointers < 1:
            raise ConfigError(f"--retomaton-min-pointers must be at least 1, got {a.retomaton_min_pointers}")
    elif getattr(a, "retomaton_cluster", None):
        raise ConfigError("--retomaton-cluster is an option of RetoMaton: add --retomaton")
    _validate_adaptive(a)
    if a.continuous_cache:
        if a.save_knnlm_dstore:
            raise ConfigError("--continuous-cache scores; --save-knnlm-dstore dumps: pick one per run")
        check_lambda(a.cache_lmbda, "--cache-lmbda")
        if not math.isfinite(a.cache_theta):
            raise ConfigError(f"--cache-theta must be finite, got {a.cache_theta}")
        if a.cache_size is not None and a.cache_size < 1:
            raise ConfigError(f"--cache-size must be at least 1, got {a.cache_size}")
    _validate_cache_extras(a)
    if getattr(a, "legacy_datastore", False) and not a.save_knnlm_dstore:
        raise ConfigError("--legacy-datastore shapes a dump: it needs --save-knnlm-dstore")


def _validate_adaptive(a):
    """--adaptive-retrieval, --adaptive-skip, --adaptive-threshold."""
    from knnlm.retrieval.adaptive import check_skip

    path = getattr(a, "adaptive_retrieval", None)
    skip, threshold = getattr(a, "adaptive_skip", None), getattr(a, "adaptive_threshold", None)
    if not path:
        if skip is not None or threshold is not None:
            flag = "--adaptive-skip" if skip is not None else "--adaptive-threshold"
            raise ConfigError(f"{flag} is an option of adaptive retrieval: add --adaptive-retrieval PREDICTOR")
        return
    if not a.knnlm:
        raise ConfigError("--adaptive-retrieval changes how --knnlm retrieves: add --knnlm")
    if a.retomaton:
        raise ConfigError("--adaptive-retrieval and --retomaton both decide which tokens are searched; this "
                          "version takes one of them per run")
    if a.knnlm_dump_probs:
        raise ConfigError("--adaptive-retrieval leaves tokens unsearched, but an export records every token's "
                          "neighbors for re-scoring: drop --knnlm-dump-probs (export a plain --knnlm run)")
    if skip is not None and threshold is not None:
        raise ConfigError("adaptive retrieval takes a target skip fraction or a threshold, not both: "
                          "drop --adaptive-skip or --adaptive-threshold")
    if skip is not None:
        check_skip(skip)
    if threshold is not None and not math.isfinite(threshold):
        raise ConfigError(f"--adaptive-threshold must be a finite number, got {threshold}")
    # (its range depends on the predictor's objective, checked when the predictor is read)


def _validate_cache_extras(a):
    """--cache-keytype, --cache-include-context and the --cache-grid-* options (fairseq_plugins/cache_grid.py)."""
    kt = getattr(a, "cache_keytype", None)
    uses = [f for f in ("cache_keytype", "cache_grid_json") if getattr(a, f, None)]
    if getattr(a, "cache_include_context", False):
        uses.append("cache_include_context")
    if uses and not a.continuous_cache:
        raise ConfigError(f"--{uses[0].replace('_', '-')} is an option of the continuous cache: add --continuous-cache")
    if kt is not None and kt not in KEYTYPES:
        raise ConfigError(f"--cache-keytype must be one of {', '.join(KEYTYPES)}, got {kt!r}")
    if getattr(a, "cache_grid_json", None):
        from .cache_grid import parse_grid

        parse_grid(a.cache_grid_lambdas, a.cache_grid_thetas)


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


def open_datastore(a):
    """A datastore prefix, or a manifest of shards dumped with --num-shards/--shard-id."""
    kwargs = {"in_memory": a.move_dstore_to_mem}
    if a.dstore_size is not None:
        kwargs["dstore_size"] = a.dstore_size
    if getattr(a, "dimension", None) is not None:  # an original-format raw datastore's
        kwargs["dim"] = a.dimension
    if a.dstore_fp16:
        kwargs["fp16"] = True
    if a.no_load_keys:
        kwargs["load_keys"] = False
    return open_store(a.dstore_filename, **kwargs)
