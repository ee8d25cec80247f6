"""The `knnlm` task's options: fairseq's language-modeling config plus one dataclass per job.

Each field is both a command-line flag (`--knn-sim-func dot`) and a hydra field
(`task.knn_sim_func=dot`); choice flags are fairseq `ChoiceEnum`s, so argparse itself rejects a
value outside them. Flag names are the original kNN-LM code's. `--help` lists them in one
group per job (see `KNNLanguageModelingTask.add_args`). The scoring, export and cache options
are generated from `knnlm.options` (the same fields `knnlm-hf` offers); the dump's are here.
"""

import sys
from dataclasses import dataclass, field, make_dataclass
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks.language_modeling import LanguageModelingConfig

from knnlm import options
from knnlm.retrieval.registry import load_from_argv

from .hooks import KEYTYPES

KEYTYPE_CHOICES = ChoiceEnum(KEYTYPES)


@dataclass
class DumpConfig(FairseqDataclass):
    """Writing a datastore: one entry per token eval_lm scores."""

    save_knnlm_dstore: bool = field(default=False, metadata={"help": "dump keys and values of every scored token"})
    dstore_mmap: Optional[str] = field(default=None, metadata={"help": "datastore prefix to write: PREFIX_keys.npy, PREFIX_vals.npy, PREFIX_meta.json"})
    dstore_fp16: bool = field(default=False, metadata={"help": "store keys as float16"})
    dstore_size: Optional[int] = field(default=None, metadata={"help": "expected number of entries (optional; checked, not required)"})
    knn_keytype: KEYTYPE_CHOICES = field(default="last_ffn_input", metadata={"help": "which state is the key"})
    legacy_datastore: bool = field(default=False, metadata={
        "help": "leave out the tokens of every block with no prior context (with --sample-break-mode none: "
                "exactly the first block), as the original code's dump did: its WikiText-103 datastore of "
                "103,225,485 entries instead of 103,227,021 (needs --context-window > 0)"})
    overwrite: bool = field(default=False, metadata={"help": "replace a complete datastore or export at the same path"})


def _fairseq_dataclass(name, options_cls, doc, only=None, registered=False):
    """A FairseqDataclass with `options_cls`'s flags for fairseq (help, defaults, and a
    `ChoiceEnum` for each field with choices): the options are defined once, in knnlm.options.

    Choices that depend on the registry (--knn-search) are a `ChoiceEnum` only in the parser
    built at run time (`registered=True`, after --knn-user-module was imported); the config
    registered with the task keeps them a plain string, checked by `knnlm.options.validate`."""
    specs = []
    for f in options.fields(options_cls, "fairseq"):
        if only is not None and f.name not in only:
            continue
        choices = options.choices_of(f)
        if callable(f.metadata.get("choices")) and not registered:
            choices = None
        kind = ChoiceEnum(list(choices)) if choices else f.type
        if choices and f.default is None:  # a choice that may be left out (--knn-executor)
            kind = Optional[kind]
        specs.append((f.name, kind, field(default=f.default, metadata={"help": f.metadata["help"]})))
    cls = make_dataclass(name, specs, bases=(FairseqDataclass,))
    cls.__doc__ = doc
    cls.__module__ = __name__
    return cls


def _groups(options_cls):
    """(title, FairseqDataclass) per --help group of `options_cls`, with the registry's choices as they are now."""
    return [(title, _fairseq_dataclass(f"{options_cls.__name__}Group{i}", options_cls, title,
                                       only={f.name for f in fs}, registered=True))
            for i, (title, fs) in enumerate(options.groups(options_cls, "fairseq"))]


def option_groups(argv=None):
    """The groups of --help, in order: (title, dataclass). --knn-user-module is imported first,
    so its strategies are --knn-search choices (fairseq imports --user-dir the same way)."""
    load_from_argv(sys.argv[1:] if argv is None else argv)
    return ((("kNN-LM: dumping a datastore", DumpConfig),)
            + tuple(_groups(options.RetrievalOptions)) + tuple(_groups(options.ExportOptions))
            + tuple(_groups(options.CacheOptions)))


ScoringConfig = _fairseq_dataclass("ScoringConfig", options.RetrievalOptions,
                                   "Scoring (and generating) with a datastore and its index; fewer searches.")
ExportConfig = _fairseq_dataclass("ExportConfig", options.ExportOptions, options.ExportOptions.__doc__)
CacheConfig = _fairseq_dataclass("CacheConfig", options.CacheOptions, options.CacheOptions.__doc__)


@dataclass
class KNNLMConfig(CacheConfig, ExportConfig, ScoringConfig, DumpConfig, LanguageModelingConfig):
    """Every option of the `knnlm` task, flat (fairseq's tasks take one dataclass)."""
