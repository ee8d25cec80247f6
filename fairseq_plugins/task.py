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
from dataclasses import dataclass, field
from typing import Optional

from fairseq.sequence_scorer import SequenceScorer
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from knnlm import provenance, shards
from knnlm.datastore import DatastoreWriter
from knnlm.errors import ConfigError, KNNLMError
from knnlm.retrieval import Retriever
from knnlm.scoring import SIM_FUNCS, check_lambda, check_temperature

from .hooks import KEYTYPES, key_dim
from .sequence_scorer import KNNSequenceScorer

logger = logging.getLogger("fairseq_plugins.knnlm")


@dataclass
class KNNLMConfig(LanguageModelingConfig):
    # --- dumping a datastore (flag names of the original kNN-LM code) ---
    save_knnlm_dstore: bool = field(default=False, metadata={"help": "dump keys and values of every scored token"})
    dstore_mmap: Optional[str] = field(default=None, metadata={"help": "datastore prefix to write: PREFIX_keys.npy, PREFIX_vals.npy, PREFIX_meta.json"})
    dstore_fp16: bool = field(default=False, metadata={"help": "store keys as float16"})
    dstore_size: Optional[int] = field(default=None, metadata={"help": "expected number of entries (optional; checked, not required)"})
    knn_keytype: str = field(default="last_ffn_input", metadata={"help": "which state is the key: " + ", ".join(KEYTYPES)})
    overwrite: bool = field(default=False, metadata={"help": "replace a complete datastore or export at the same path"})
    # --- scoring with a datastore ---
    knnlm: bool = field(default=False, metadata={"help": "interpolate the LM with p_kNN from the datastore"})
    dstore_filename: Optional[str] = field(default=None, metadata={"help": "datastore prefix to read (or a shard manifest .json)"})
    indexfile: Optional[str] = field(default=None, metadata={"help": "FAISS index built by knnlm-build-index"})
    k: int = field(default=1024, metadata={"help": "neighbors to retrieve"})
    probe: int = field(default=32, metadata={"help": "IVF lists to visit (nprobe)"})
    knn_k_factor: float = field(default=1.0, metadata={
        "help": "ask FAISS for k x this many candidates and keep the k nearest by exact distance "
                "(needs --knn-sim-func l2 or dot); for fast but coarse indexes such as IVF...,PQ128x4fs"})
    lmbda: float = field(default=0.25, metadata={"help": "weight of p_kNN in the interpolation, in [0, 1]"})
    knn_temp: float = field(default=1.0, metadata={"help": "softmax temperature over neighbor distances"})
    knn_sim_func: str = field(default="l2", metadata={"help": "l2 (exact recomputed squared L2), do_not_recomp_l2 (FAISS distances) or dot"})
    no_load_keys: bool = field(default=False, metadata={"help": "do not open the keys: only FAISS distances (needs --knn-sim-func do_not_recomp_l2)"})
    move_dstore_to_mem: bool = field(default=False, metadata={"help": "load datastore keys and values into RAM"})
    knn_gpu: bool = field(default=False, metadata={"help": "search the index on the GPU"})
    knn_allow_model_mismatch: bool = field(default=False, metadata={"help": "score even though the datastore was dumped by different model weights"})
    knnlm_dump_probs: Optional[str] = field(default=None, metadata={"help": "directory for per-token log p_LM, log p_kNN and neighbor distances (input of knnlm-tune)"})
    knnlm_dump_neighbors: int = field(default=-1, metadata={"help": "neighbors per token kept in the export (-1: all k)"})
    knnlm_dump_ids: bool = field(default=False, metadata={"help": "also export neighbor ids"})
    # --- continuous cache (Grave et al., 2017), additive with the kNN-LM ---
    continuous_cache: bool = field(default=False, metadata={"help": "interpolate a cache of earlier positions in the same sample"})
    cache_lmbda: float = field(default=0.1, metadata={"help": "weight of the cache distribution"})
    cache_theta: float = field(default=0.05, metadata={"help": "cache inverse temperature on dot products of keys"})
    cache_size: Optional[int] = field(default=None, metadata={"help": "positions remembered (default: the whole sample)"})


def _checkpoint_path():
    """The --path eval_lm was given (recorded in metadata only; weights are fingerprinted)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--path")
    return p.parse_known_args(sys.argv[1:])[0].path


def _excepthook(kind, value, tb, _default=sys.excepthook):
    if isinstance(value, KNNLMError):
        sys.stderr.write(f"{value.__class__.__name__}: {value}\n")
    else:
        _default(kind, value, tb)


@register_task("knnlm", dataclass=KNNLMConfig)
class KNNLanguageModelingTask(LanguageModelingTask):
    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets=targets)
        sys.excepthook = _excepthook  # our errors are messages for the user, not tracebacks
        validate(args)
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
            self._scorer = KNNSequenceScorer(tgt_dict, softmax_batch, dump=True, on_first_batch=self._open_writer, **common)
        else:
            datastore, retriever = self._open_retriever() if a.knnlm else (None, None)
            cache = ({"lmbda": a.cache_lmbda, "theta": a.cache_theta, "size": a.cache_size}
                     if a.continuous_cache else None)
            self._scorer = KNNSequenceScorer(
                tgt_dict, softmax_batch, retriever=retriever, lmbda=a.lmbda, temperature=a.knn_temp,
                sim_func=a.knn_sim_func, cache=cache,
                on_first_batch=(lambda model: self._check_model(model, datastore)) if a.knnlm else None,
                **common,
            )
        return self._scorer

    def _open_retriever(self):
        a = self.args
        datastore = open_datastore(a)
        return datastore, Retriever(a.indexfile, datastore, k=a.k, nprobe=a.probe,
                                    sim_func=a.knn_sim_func, gpu=a.knn_gpu, k_factor=a.knn_k_factor)

    def build_generator(self, models, args, **kwargs):
        """fairseq-generate / fairseq-interactive: sample or search from the kNN-LM distribution."""
        if self.args.knnlm:
            from .generation import KNNLMForGeneration

            if len(models) != 1:
                raise ConfigError("kNN-LM generation takes one model (pass one checkpoint to --path)")
            datastore, retriever = self._open_retriever()
            datastore.check_compatible(keytype=self.args.knn_keytype,
                                       allow_model_mismatch=self.args.knn_allow_model_mismatch,
                                       **self._model_identity(models[0]))
            models = [KNNLMForGeneration(models[0], retriever, lmbda=self.args.lmbda,
                                         temperature=self.args.knn_temp, sim_func=self.args.knn_sim_func,
                                         keytype=self.args.knn_keytype)]
        return super().build_generator(models, args, **kwargs)

    def _model_identity(self, model):
        dictionary = self.target_dictionary
        return {
            "dim": key_dim(model),
            "dict_size": len(dictionary),
            "dict_fingerprint": provenance.dictionary_fingerprint(dictionary.symbols),
            "model_fingerprint": provenance.model_fingerprint(model.named_parameters()),
        }

    def _open_writer(self, model):
        a = self.args
        ident = self._model_identity(model)
        self._scorer.dstore_writer = DatastoreWriter(
            a.dstore_mmap, ident["dim"], keytype=a.knn_keytype, fp16=a.dstore_fp16,
            dict_size=ident["dict_size"], dict_fingerprint=ident["dict_fingerprint"],
            model_fingerprint=ident["model_fingerprint"], expected_size=a.dstore_size,
            overwrite=a.overwrite,
            extra={
                "checkpoint": _checkpoint_path(), "data": a.data, "split": self._split,
                "context_window": self._context_window,
                "tokens_per_sample": a.tokens_per_sample + self._context_window,
                "sample_break_mode": str(a.sample_break_mode), "add_bos_token": a.add_bos_token,
            },
        )
        logger.info(f"dumping {a.knn_keytype} keys (dim {ident['dim']}) to {a.dstore_mmap}_{{keys,vals}}.npy")

    def _check_model(self, model, datastore):
        a = self.args
        ident = self._model_identity(model)
        datastore.check_compatible(keytype=a.knn_keytype, allow_model_mismatch=a.knn_allow_model_mismatch, **ident)
        if a.knnlm_dump_probs:
            from knnlm.export import ExportWriter

            kept = a.k if a.knnlm_dump_neighbors < 0 else min(a.knnlm_dump_neighbors, a.k)
            self._scorer.export = ExportWriter(
                a.knnlm_dump_probs, kept, sim_func=a.knn_sim_func, temperature=a.knn_temp,
                lmbda=a.lmbda, with_ids=a.knnlm_dump_ids, overwrite=a.overwrite,
                meta={"split": self._split, "datastore": datastore.prefix,
                      "datastore_fingerprint": datastore.fingerprint, "index": a.indexfile,
                      "context_window": self._context_window, **ident},
            )

    def finish(self):
        """Runs once every batch has been scored: only now is a dump or export complete."""
        for module in _eval_lm_modules():
            module.SequenceScorer = SequenceScorer  # leave eval_lm as we found it
        s = self._scorer
        if s is None:
            return
        if s.dstore_writer is not None:
            meta = s.dstore_writer.finalize()
            logger.info(
                f"datastore complete: {meta['size']:,} entries of dimension {meta['dim']} "
                f"({meta['keys_dtype']} keys, {meta['vals_dtype']} values), {meta['bytes'] / 2**20:.1f} MiB "
                f"in {s.dstore_writer.files['keys']}, {s.dstore_writer.files['vals']}, {s.dstore_writer.files['meta']}"
            )
        if s.export is not None:
            s.export.finalize()
            logger.info(f"per-token export written to {self.args.knnlm_dump_probs}")
        summary = s.summary()
        if summary and (s.retriever is not None or s.cache is not None):
            note = ""
            if summary["inf_tokens"]:
                note = (f"; {summary['inf_tokens']:,} tokens have probability 0 (no neighbor carries the "
                        f"target and lambda = 1), so the perplexity is infinite; eval_lm's line below skips them")
            a = self.args
            setting = (f"k={a.k}, lambda={a.lmbda}, T={a.knn_temp}, {a.knn_sim_func}" if a.knnlm
                       else "no datastore")
            if a.continuous_cache:
                setting += f"; continuous cache lambda={a.cache_lmbda}, theta={a.cache_theta}"
            # One fixed wording, so scripts can parse it: "base LM perplexity X, kNN-LM perplexity Y".
            logger.info(
                f"kNN-LM: {summary['tokens']:,} tokens, base LM perplexity {summary['base_ppl']:.4f}, "
                f"kNN-LM perplexity {summary['ppl']:.4f} ({setting}){note}"
            )
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
    if a.knn_keytype not in KEYTYPES:
        raise ConfigError(f"--knn-keytype must be one of {', '.join(KEYTYPES)}, got {a.knn_keytype!r}")
    if a.save_knnlm_dstore and not a.dstore_mmap:
        raise ConfigError("--save-knnlm-dstore needs --dstore-mmap PREFIX (where to write the datastore)")
    if a.knnlm:
        if not a.dstore_filename or not a.indexfile:
            raise ConfigError("--knnlm needs both --dstore-filename PREFIX and --indexfile INDEX")
        check_lambda(a.lmbda)
        check_temperature(a.knn_temp)
        if a.k < 1:
            raise ConfigError(f"--k must be at least 1, got {a.k}")
        if a.probe < 1:
            raise ConfigError(f"--probe must be at least 1, got {a.probe}")
        if a.knn_sim_func not in SIM_FUNCS:
            raise ConfigError(f"--knn-sim-func must be one of {', '.join(SIM_FUNCS)}, got {a.knn_sim_func!r}")
        if a.no_load_keys and a.knn_sim_func != "do_not_recomp_l2":
            raise ConfigError("--no-load-keys leaves no keys to recompute distances from: add --knn-sim-func do_not_recomp_l2")


    if a.continuous_cache:
        if a.save_knnlm_dstore:
            raise ConfigError("--continuous-cache scores; --save-knnlm-dstore dumps: pick one per run")
        check_lambda(a.cache_lmbda, "--cache-lmbda")
        if not math.isfinite(a.cache_theta):
            raise ConfigError(f"--cache-theta must be finite, got {a.cache_theta}")
        if a.cache_size is not None and a.cache_size < 1:
            raise ConfigError(f"--cache-size must be at least 1, got {a.cache_size}")


def open_datastore(a):
    """A datastore prefix, or a manifest of shards dumped with --num-shards/--shard-id."""
    kwargs = {"in_memory": a.move_dstore_to_mem}
    if a.dstore_size is not None:
        kwargs["dstore_size"] = a.dstore_size
    return shards.open_datastore(a.dstore_filename, **kwargs)
