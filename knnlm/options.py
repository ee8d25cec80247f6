"""Every kNN-LM option, defined once: the front-ends' flags are generated from these dataclasses.

    opts = RetrievalOptions(dstore_filename="dstore/train", indexfile="dstore/knn.index", k=1024)
    validate(opts)                  # impossible combinations refused by name, before anything loads
    knn = knnlm.build(opts)         # the KNNLM: strategy from the registry, wrappers over it

A field is one flag on every front-end that takes it (`--knn-sim-func dot` from `knn_sim_func`):
fairseq's task config turns the dataclasses into its own (`ChoiceEnum` choices, one `--help`
group each; `fairseq_plugins/config.py`), `knnlm-hf` into argparse arguments (`add_arguments`).
A field's metadata: `help`; `choices` (a tuple, or a function returning one: the registered
strategies); `frontends` (default both; "fairseq" for the original code's raw datastore format).
Fields with `flag=False` are read from the front-end's own options of the same name (a fairseq
dump's `--dstore-fp16` also says how a raw datastore is stored) and generate no flag.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from .errors import ConfigError
from .scoring import SIM_FUNCS, check_lambda, check_temperature

FRONTENDS = ("fairseq", "hf")
EXACT_DTYPES = ("auto", "fp32", "fp16", "bf16")


def option(default, help, *, choices=None, frontends=FRONTENDS, flag=True, metavar=None):
    """A dataclass field carrying its flag's help text, choices and the front-ends that offer it."""
    return field(default=default, metadata={"help": help, "choices": choices, "frontends": tuple(frontends),
                                            "flag": flag, "metavar": metavar})


def _strategies():
    from .retrieval.registry import strategy_names

    return tuple(strategy_names())


@dataclass
class RetrievalOptions:
    """Scoring with a datastore: where it is, how it is searched, how p_kNN is mixed in."""

    knnlm: bool = option(False, "interpolate the LM with p_kNN from the datastore")
    dstore_filename: Optional[str] = option(None, "datastore prefix to read (or a shard manifest .json)")
    indexfile: Optional[str] = option(None, "FAISS index built by knnlm-build-index")
    knn_search: str = option("faiss", "retrieval strategy: faiss (search --indexfile), exact (exact search by matrix "
                                      "products over every key, the keys resident on the queries' device, no index "
                                      "file), or one registered by --knn-user-module / a knnlm.retrievers entry point",
                             choices=_strategies)
    knn_user_module: Optional[str] = option(None, "a Python file or package to import first: its "
                                                  "@register_strategy classes become --knn-search choices",
                                            metavar="PATH")
    k: int = option(1024, "neighbors to retrieve")
    probe: int = option(32, "IVF lists to visit (nprobe)")
    knn_k_factor: float = option(1.0, "ask FAISS for k x this many candidates and keep the k nearest by exact "
                                      "distance (needs --knn-sim-func l2 or dot); for fast but coarse indexes such "
                                      "as IVF...,PQ128x4fs")
    lmbda: float = option(0.25, "weight of p_kNN in the interpolation, in [0, 1]")
    knn_temp: float = option(1.0, "softmax temperature over neighbor distances")
    knn_sim_func: str = option("l2", "l2 (exact recomputed squared L2), do_not_recomp_l2 (FAISS distances) or dot",
                               choices=SIM_FUNCS)
    no_load_keys: bool = option(False, "do not open the keys: only FAISS distances (needs --knn-sim-func "
                                       "do_not_recomp_l2)")
    move_dstore_to_mem: bool = option(False, "load datastore keys and values into RAM")
    knn_gpu: bool = option(False, "search the index on the GPU")
    knn_exact_dtype: str = option("auto", "--knn-search exact: dtype of the resident keys for the search pass "
                                          "(auto: fp16 on CUDA, fp32 on the CPU); the k kept are always re-scored "
                                          "in fp32 from the full-precision keys", choices=EXACT_DTYPES)
    knn_exact_devices: Optional[str] = option(None, "--knn-search exact: where the keys live: the queries' device "
                                                    "(default), 'all' visible GPUs, or a comma list "
                                                    "(cuda:0,cuda:1); rows are split across them and the results "
                                                    "merged")
    knn_executor: Optional[str] = option(None, "search an index kept in parts (knnlm-build-index merge=none) with "
                                               "one searcher per shard: local (threads of this process) or ray "
                                               "(one Ray actor per shard, on the node holding it; RAY_ADDRESS or a "
                                               "local instance); default: ray when RAY_ADDRESS is set, else local",
                                         choices=("local", "ray"))
    knn_allow_model_mismatch: bool = option(False, "score even though the datastore was dumped by different "
                                                   "model weights")
    knn_allow_same_split: bool = option(False, "score the very split (or text) the datastore was dumped from (a "
                                               "memorisation experiment; otherwise refused as a leak)")
    knn_allow_index_without_fingerprint: bool = option(False, "use an index whose metadata does not record the "
                                                              "datastore it was built from")
    dimension: Optional[int] = option(None, "key dimension of a datastore in the original code's raw format (with "
                                            "--dstore-size, and --dstore-fp16 if so dumped)", frontends=("fairseq",))
    dstore_size: Optional[int] = option(None, "", flag=False)
    dstore_fp16: bool = option(False, "", flag=False)

    # fewer searches
    retomaton: bool = option(False, "follow pointers from the neighbors that carried the previous token to their "
                                    "next entries, and search only when fewer than --retomaton-min-pointers survive "
                                    "(needs --knn-sim-func l2 or dot)")
    retomaton_min_pointers: int = option(1, "search when fewer pointer candidates than this survive")
    retomaton_max_pointers: Optional[int] = option(None, "pointer candidates kept per token (default: --k)")
    retomaton_cluster: Optional[str] = option(None, "--retomaton with the paper's states: a knnlm-retomaton-cluster "
                                                    "file (k-means cluster of every entry); a token that follows "
                                                    "pointers is also scored against the other members of their "
                                                    "clusters")
    adaptive_retrieval: Optional[str] = option(None, "adaptive retrieval (He et al. 2021): a predictor from "
                                                     "knnlm-adaptive train reads the LM's features of each token "
                                                     "(entropy, top log-probabilities) and the tokens with the "
                                                     "lowest predicted lambda are not searched (they get p_LM alone)",
                                               metavar="PREDICTOR")
    adaptive_skip: Optional[float] = option(None, "--adaptive-retrieval: target fraction of tokens not searched, in "
                                                  "[0, 1) (default 0; from the predictor's calibration quantiles)")
    adaptive_threshold: Optional[float] = option(None, "--adaptive-retrieval: instead of --adaptive-skip, skip the "
                                                       "tokens whose predicted lambda is below this")
    adaptive_lambda: bool = option(False, "--adaptive-retrieval: mix each searched token with the predictor's own "
                                          "lambda for it instead of the constant --lmbda (a predictor trained with "
                                          "--objective lambda); tokens not searched still get p_LM alone")

    GROUPS = {"kNN-LM: scoring with a datastore": ("knnlm", "dimension"),
              "kNN-LM: fewer searches": ("retomaton", "adaptive_lambda")}


@dataclass
class ExportOptions:
    """A per-token export of a kNN-LM evaluation (the input of knnlm-tune, the sweeps, knnlm-explain)."""

    knnlm_dump_probs: Optional[str] = option(None, "directory for per-token log p_LM, log p_kNN and neighbor "
                                                   "distances (input of knnlm-tune)", metavar="DIR")
    knnlm_dump_neighbors: int = option(-1, "neighbors per token kept in the export (-1: all k)")
    knnlm_dump_ids: bool = option(False, "also export neighbor ids")

    GROUPS = {"kNN-LM: per-token export": ("knnlm_dump_probs", "knnlm_dump_ids")}


@dataclass
class CacheOptions:
    """The continuous cache (Grave et al., 2017), additive with the kNN-LM."""

    continuous_cache: bool = option(False, "interpolate a cache of earlier positions in the same sample (fairseq) "
                                           "or window (knnlm-hf)")
    cache_lmbda: float = option(0.1, "weight of the cache distribution")
    cache_theta: float = option(0.05, "cache inverse temperature on dot products of keys")
    cache_size: Optional[int] = option(None, "positions remembered (default: the whole sample)")
    cache_keytype: Optional[str] = option(None, "the state the cache remembers and compares (a --knn-keytype name; "
                                                "default: --knn-keytype). Grave et al. used the output state")
    cache_include_context: bool = option(False, "also remember the positions before the scored ones (fairseq: "
                                                "the --context-window; knnlm-hf: the window's overlap), with the "
                                                "tokens that followed them")
    cache_grid_json: Optional[str] = option(None, "tune the cache: write the perplexity at every (lambda, theta) "
                                                  "of --cache-grid-lambdas x --cache-grid-thetas, over the LM and "
                                                  "over the kNN-LM (with --knnlm), to this JSON file")
    cache_grid_lambdas: str = option("0:0.5:0.02", "--cache-grid-json: cache weights, START:STOP:STEP or a comma list")
    cache_grid_thetas: str = option("0.0001,0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1",
                                    "--cache-grid-json: inverse temperatures, a comma list")

    GROUPS = {"continuous cache": ("continuous_cache", "cache_grid_thetas")}


def fields(cls, frontend=None, flags_only=True):
    """The dataclass fields of `cls` a front-end offers as flags."""
    out = []
    for f in dataclasses.fields(cls):
        if flags_only and not f.metadata.get("flag", True):
            continue
        if frontend is not None and frontend not in f.metadata.get("frontends", FRONTENDS):
            continue
        out.append(f)
    return out


def groups(cls, frontend=None):
    """[(title, [fields])] in order: the `--help` groups of `cls` (its GROUPS: first and last field)."""
    names = [f.name for f in dataclasses.fields(cls)]
    offered = {f.name: f for f in fields(cls, frontend)}
    out = []
    for title, (first, last) in cls.GROUPS.items():
        span = names[names.index(first):names.index(last) + 1]
        out.append((title, [offered[n] for n in span if n in offered]))
    return out


def choices_of(f):
    c = f.metadata.get("choices")
    return tuple(c()) if callable(c) else c


def flag_name(name):
    return "--" + name.replace("_", "-")


def base_type(f):
    """int, float, str or bool of a field (Optional[...] unwrapped)."""
    t = f.type
    if isinstance(t, str):  # postponed annotations
        t = {"int": int, "float": float, "str": str, "bool": bool}.get(t.replace("Optional[", "").rstrip("]"), str)
    return next((x for x in getattr(t, "__args__", (t,)) if x is not type(None)), t)


def add_arguments(parser, cls, frontend="hf", skip=()):
    """Add `cls`'s flags to an argparse parser, one argument group per GROUPS entry."""
    for title, fs in groups(cls, frontend):
        group = parser.add_argument_group(title)
        for f in fs:
            if f.name in skip:
                continue
            kind, help_ = base_type(f), f.metadata["help"]
            if kind is bool:
                group.add_argument(flag_name(f.name), action="store_true", help=help_)
                continue
            kw = {"type": kind, "default": f.default, "help": help_}
            if f.metadata.get("metavar"):
                kw["metavar"] = f.metadata["metavar"]
            choices = choices_of(f)
            if choices:  # checked by validate(), which names the flag and the choices in one line
                kw["metavar"] = "{" + ",".join(choices) + "}"
            group.add_argument(flag_name(f.name), **kw)
    return parser


def from_namespace(cls, namespace):
    """The options a front-end's parsed flags (argparse namespace or fairseq config) hold; enum
    choices become plain strings, a field the front-end does not have keeps its default."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(namespace, f.name):
            v = getattr(namespace, f.name)
            if v is not None and choices_of(f) is not None and not isinstance(v, str):
                v = str(v)  # fairseq's ChoiceEnum members
            values[f.name] = v
    return cls(**values)


def changed(opts, names=None):
    """Names of the fields of `opts` set away from their defaults (optionally among `names`)."""
    out = []
    for f in dataclasses.fields(opts):
        if names is not None and f.name not in names:
            continue
        if not f.metadata.get("flag", True):
            continue
        if getattr(opts, f.name) != f.default:
            out.append(f.name)
    return out


# ----------------------------------------------------------------------------- validation
def validate(opts, export=None, cache=None):
    """Refuse impossible combinations before any model or data is loaded: common checks, then
    the chosen strategy's and each wrapper's own (`validate_options` of the registered classes)."""
    from .retrieval.registry import get_strategy, wrappers

    if opts.knn_user_module:
        from .retrieval.registry import load_user_module

        load_user_module(opts.knn_user_module)
    if not opts.knnlm:
        # Every retrieval flag set without --knnlm would be ignored: refuse it by name.
        ignored = [n for n in changed(opts) if n not in ("knnlm", "knn_user_module", "knn_allow_same_split")]
        if export is not None and export.knnlm_dump_probs:
            raise ConfigError("--knnlm-dump-probs exports a kNN-LM evaluation: add --knnlm")
        if ignored:
            flags = ", ".join(flag_name(n) for n in ignored)
            raise ConfigError(f"{flags} {'is an option' if len(ignored) == 1 else 'are options'} of kNN-LM "
                              f"scoring, ignored without --knnlm: add --knnlm (or drop {flags})")
        return
    check_lambda(opts.lmbda)
    check_temperature(opts.knn_temp)
    if opts.k < 1:
        raise ConfigError(f"--k must be at least 1, got {opts.k}")
    if int(opts.k) != opts.k:
        raise ConfigError(f"--k must be a whole number, got {opts.k}")
    if opts.probe < 1:
        raise ConfigError(f"--probe must be at least 1, got {opts.probe}")
    if opts.knn_exact_dtype not in EXACT_DTYPES:
        raise ConfigError(f"--knn-exact-dtype must be one of {', '.join(EXACT_DTYPES)}, got {opts.knn_exact_dtype!r}")
    if opts.knn_sim_func not in SIM_FUNCS:
        raise ConfigError(f"--knn-sim-func must be one of {', '.join(SIM_FUNCS)}, got {opts.knn_sim_func!r}")
    if not math.isfinite(opts.knn_k_factor) or opts.knn_k_factor < 1:
        raise ConfigError(f"--knn-k-factor must be a finite number >= 1, got {opts.knn_k_factor}")
    get_strategy(opts.knn_search, opts).validate_options(opts)
    if opts.no_load_keys and opts.knn_sim_func != "do_not_recomp_l2":
        raise ConfigError("--no-load-keys leaves no keys to recompute distances from: add --knn-sim-func "
                          "do_not_recomp_l2")
    for cls in wrappers():
        cls.validate_options(opts, export=export)


# ----------------------------------------------------------------------------- the datastore
def open_datastore(opts):
    """The datastore the options name: a prefix, a shard manifest, or the original code's raw format."""
    from .store import open_datastore as open_store

    kwargs = {"in_memory": opts.move_dstore_to_mem}
    if opts.dstore_size is not None:
        kwargs["dstore_size"] = opts.dstore_size
    if opts.dimension is not None:
        kwargs["dim"] = opts.dimension
    if opts.dstore_fp16:
        kwargs["fp16"] = True
    if opts.no_load_keys:
        kwargs["load_keys"] = False
    return open_store(opts.dstore_filename, **kwargs)
