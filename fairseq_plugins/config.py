"""The `knnlm` task's options: fairseq's language-modeling config plus one dataclass per job.

Each field is both a command-line flag (`--knn-sim-func dot`) and a hydra field
(`task.knn_sim_func=dot`); choice flags are fairseq `ChoiceEnum`s, so argparse itself rejects a
value outside them. Flag names are the original kNN-LM code's. `--help` lists them in one
group per job (see `KNNLanguageModelingTask.add_args`).
"""

from dataclasses import dataclass, field
from typing import Optional

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.tasks.language_modeling import LanguageModelingConfig

from knnlm.scoring import SIM_FUNCS

from .hooks import KEYTYPES

KEYTYPE_CHOICES = ChoiceEnum(KEYTYPES)
SIM_FUNC_CHOICES = ChoiceEnum(SIM_FUNCS)
KNN_SEARCH_CHOICES = ChoiceEnum(["faiss", "exact"])
EXACT_DTYPE_CHOICES = ChoiceEnum(["auto", "fp32", "fp16", "bf16"])  # knnlm.retrieval.exact.EXACT_DTYPES


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


@dataclass
class ScoringConfig(FairseqDataclass):
    """Scoring (and generating) with a datastore and its index."""

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
    knn_sim_func: SIM_FUNC_CHOICES = field(default="l2", metadata={"help": "l2 (exact recomputed squared L2), do_not_recomp_l2 (FAISS distances) or dot"})
    no_load_keys: bool = field(default=False, metadata={"help": "do not open the keys: only FAISS distances (needs --knn-sim-func do_not_recomp_l2)"})
    move_dstore_to_mem: bool = field(default=False, metadata={"help": "load datastore keys and values into RAM"})
    knn_gpu: bool = field(default=False, metadata={"help": "search the index on the GPU"})
    knn_search: KNN_SEARCH_CHOICES = field(default="faiss", metadata={
        "help": "faiss: search --indexfile; exact: exact search by matrix products over every key, the keys "
                "resident on the queries' device (no index file)"})
    knn_exact_dtype: EXACT_DTYPE_CHOICES = field(default="auto", metadata={
        "help": "--knn-search exact: dtype of the resident keys for the search pass (auto: fp16 on CUDA, fp32 on "
                "the CPU); the k kept are always re-scored in fp32 from the full-precision keys"})
    knn_exact_devices: Optional[str] = field(default=None, metadata={
        "help": "--knn-search exact: where the keys live: the queries' device (default), 'all' visible GPUs, or a "
                "comma list (cuda:0,cuda:1); rows are split across them and the results merged"})
    knn_allow_model_mismatch: bool = field(default=False, metadata={"help": "score even though the datastore was dumped by different model weights"})
    knn_allow_same_split: bool = field(default=False, metadata={"help": "score the very split the datastore was dumped from (a memorisation experiment; otherwise refused as a leak)"})
    knn_allow_index_without_fingerprint: bool = field(default=False, metadata={"help": "use an index whose metadata does not record the datastore it was built from"})
    dimension: Optional[int] = field(default=None, metadata={"help": "key dimension of a datastore in the original code's raw format (with --dstore-size, and --dstore-fp16 if so dumped)"})


@dataclass
class EfficientConfig(FairseqDataclass):
    """Fewer searches (RetoMaton, Alon et al. 2022; adaptive retrieval, He et al. 2021)."""

    retomaton: bool = field(default=False, metadata={
        "help": "follow pointers from the neighbors that carried the previous token to their next entries, and "
                "search only when fewer than --retomaton-min-pointers survive (needs --knn-sim-func l2 or dot)"})
    retomaton_min_pointers: int = field(default=1, metadata={"help": "search when fewer pointer candidates than this survive"})
    retomaton_max_pointers: Optional[int] = field(default=None, metadata={"help": "pointer candidates kept per token (default: --k)"})
    retomaton_cluster: Optional[str] = field(default=None, metadata={
        "help": "--retomaton with the paper's states: a knnlm-retomaton-cluster file (k-means cluster of every "
                "entry); a token that follows pointers is also scored against the other members of their clusters"})
    adaptive_retrieval: Optional[str] = field(default=None, metadata={
        "help": "adaptive retrieval (He et al. 2021): a predictor from knnlm-adaptive train reads the LM's features "
                "of each token (entropy, top log-probabilities) and the tokens with the lowest predicted lambda are "
                "not searched (they get p_LM alone)"})
    adaptive_skip: Optional[float] = field(default=None, metadata={
        "help": "--adaptive-retrieval: target fraction of tokens not searched, in [0, 1) (default 0; from the "
                "predictor's calibration quantiles)"})
    adaptive_threshold: Optional[float] = field(default=None, metadata={
        "help": "--adaptive-retrieval: instead of --adaptive-skip, skip the tokens whose predicted lambda is below this"})


@dataclass
class ExportConfig(FairseqDataclass):
    """A per-token export of a kNN-LM evaluation (the input of knnlm-tune and the sweeps)."""

    knnlm_dump_probs: Optional[str] = field(default=None, metadata={"help": "directory for per-token log p_LM, log p_kNN and neighbor distances (input of knnlm-tune)"})
    knnlm_dump_neighbors: int = field(default=-1, metadata={"help": "neighbors per token kept in the export (-1: all k)"})
    knnlm_dump_ids: bool = field(default=False, metadata={"help": "also export neighbor ids"})


@dataclass
class CacheConfig(FairseqDataclass):
    """The continuous cache (Grave et al., 2017), additive with the kNN-LM."""

    continuous_cache: bool = field(default=False, metadata={"help": "interpolate a cache of earlier positions in the same sample"})
    cache_lmbda: float = field(default=0.1, metadata={"help": "weight of the cache distribution"})
    cache_theta: float = field(default=0.05, metadata={"help": "cache inverse temperature on dot products of keys"})
    cache_size: Optional[int] = field(default=None, metadata={"help": "positions remembered (default: the whole sample)"})
    cache_keytype: Optional[str] = field(default=None, metadata={
        "help": "the state the cache remembers and compares (a --knn-keytype name; default: --knn-keytype). "
                "Grave et al. used the output state: decoder_output_ln where the model has a final LayerNorm, "
                "else decoder_output (python -m fairseq_plugins.keytypes CKPT --output-state)"})
    cache_include_context: bool = field(default=False, metadata={
        "help": "also remember the --context-window positions before the scored block, with the tokens that "
                "followed them (default: only earlier scored positions of the same block)"})
    cache_grid_json: Optional[str] = field(default=None, metadata={
        "help": "tune the cache: write the perplexity at every (lambda, theta) of --cache-grid-lambdas x "
                "--cache-grid-thetas, over the LM and over the kNN-LM (with --knnlm), to this JSON file"})
    cache_grid_lambdas: str = field(default="0:0.5:0.02", metadata={"help": "--cache-grid-json: cache weights, START:STOP:STEP or a comma list"})
    cache_grid_thetas: str = field(default="0.0001,0.0003,0.001,0.003,0.01,0.03,0.1,0.3,1", metadata={
        "help": "--cache-grid-json: inverse temperatures, a comma list"})


# The groups of --help, in order: (title, dataclass).
OPTION_GROUPS = (
    ("kNN-LM: dumping a datastore", DumpConfig),
    ("kNN-LM: scoring with a datastore", ScoringConfig),
    ("kNN-LM: fewer searches", EfficientConfig),
    ("kNN-LM: per-token export", ExportConfig),
    ("continuous cache", CacheConfig),
)


@dataclass
class KNNLMConfig(CacheConfig, ExportConfig, EfficientConfig, ScoringConfig, DumpConfig, LanguageModelingConfig):
    """Every option of the `knnlm` task, flat (fairseq's tasks take one dataclass)."""
