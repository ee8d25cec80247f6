"""Reading a per-token export (`--knnlm-dump-probs DIR`): its format and `load_export`.

The files and what they hold are listed in `knnlm.offline.export` (the writer); this module
checks a directory against that format and memory-maps its arrays read-only.
"""

import dataclasses
import math
import os
from typing import Optional

import numpy as np

from ..artefacts import check_schema, read_json
from ..errors import ConfigError, CorruptError, IncompleteError, KNNLMError
from ..scoring import SIM_FUNCS

FORMAT = "knnlm-export"
FORMAT_VERSION = 1
META = "meta.json"
# name -> (dtype, per-neighbor?); the order is the order of the files in meta["files"].
FILES = {
    "lp_lm": (np.float32, False),
    "lp_knn": (np.float32, False),
    "targets": (np.int64, False),
    "dists": (np.float32, True),
    "match": (np.bool_, True),
    "ids": (np.int64, True),
    "vals": (np.int64, True),
    "features": (np.float32, False),  # (N, F): F = len(meta["feature_names"])
    "context": (np.int64, False),  # (N, C): the C = meta["context_order"] tokens each prediction read last, -1: none
    "searched": (np.bool_, False),  # (N,): with meta["unsearched"]
}
UNSEARCHED = ("lm_only", "pointers")
_RESERVED = {"format", "format_version", "complete", "count", "sim_func", "k", "k_kept",
             "temperature", "lmbda", "files", "started", "finished", "versions", "feature_names", "context_order", "unsearched"}
# What an export's meta.json must hold: field -> (types, required).
META_SCHEMA = {
    "format": (str, True), "format_version": (int, True), "complete": (bool, True), "count": (int, True),
    "k_kept": (int, True), "files": (list, True), "sim_func": (str, True), "temperature": (float, True),
    "lmbda": (float, True), "k": ((int, type(None)), False), "feature_names": (list, False),
    "context_order": (int, False), "unsearched": (str, False),
}
@dataclasses.dataclass
class Export:
    """A complete export, arrays memory-mapped read-only. dists/match/ids/vals may be None."""

    path: str
    meta: dict
    lp_lm: np.ndarray
    lp_knn: np.ndarray
    targets: np.ndarray
    dists: Optional[np.ndarray] = None
    match: Optional[np.ndarray] = None
    ids: Optional[np.ndarray] = None
    vals: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None
    context: Optional[np.ndarray] = None
    searched: Optional[np.ndarray] = None
    _warned: bool = dataclasses.field(default=False, repr=False)

    @property
    def count(self):
        return len(self.lp_lm)

    @property
    def k(self):
        return self.meta.get("k")

    @property
    def k_kept(self):
        return None if self.dists is None else self.dists.shape[1]

    @property
    def has_neighbors(self):
        return self.dists is not None

    @property
    def has_context(self):
        return self.context is not None

    @property
    def has_features(self):
        return self.features is not None

    @property
    def feature_names(self):
        return self.meta.get("feature_names")

    @property
    def truncated(self):
        """Fewer neighbors kept than the run used: re-scored p_kNN is then approximate."""
        return self.has_neighbors and self.k_kept < self.k


def _loads(path):
    """Whether the export at PATH opens whole (a corrupt one holds nothing worth keeping)."""
    try:
        load_export(path, partial_search=True)
        return True
    except KNNLMError:
        return False


def load_export(path, *, partial_search=False):
    """Open the export directory PATH, checking that it is complete and its files are whole.

    An export of a run that searched only some tokens (searched.npy) opens only with
    partial_search=True: re-scoring (tune, sweeps, adaptive training) assumes every token's
    p_kNN comes from a search."""
    if not os.path.isdir(path):
        raise KNNLMError(f"no export directory at {path} (written by --knnlm-dump-probs)")
    meta = read_json(os.path.join(path, META), f"export {path}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        meta = meta if isinstance(meta, dict) else {}
        raise CorruptError(f"{path}/{META} is not the metadata of a kNN-LM export (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CorruptError(f"export {path} has format version {meta.get('format_version')}; "
                           f"this code reads version {FORMAT_VERSION}")
    check_schema(meta, META_SCHEMA, f"export {path}", os.path.join(path, META))
    t, lam = meta.get("temperature", 1.0), meta.get("lmbda", 0.0)
    if (meta.get("sim_func", "l2") not in SIM_FUNCS or not (math.isfinite(t) and t > 0) or not 0 <= lam <= 1
            or (meta.get("k") is not None and meta["k_kept"] > meta["k"])):
        raise CorruptError(f"export {path}: its metadata holds impossible settings (sim_func "
                           f"{meta.get('sim_func')!r}, temperature {t!r}, lmbda {lam!r}, k {meta.get('k')!r}, "
                           f"k_kept {meta['k_kept']!r}); it is damaged. Export again")
    if not meta.get("complete"):
        raise IncompleteError(
            f"export {path} is incomplete: the evaluation that wrote it did not finish "
            f"({meta.get('count', 0)} tokens recorded). Run the evaluation again."
        )
    names = meta.get("files", [])
    if not all(isinstance(n, str) for n in names):
        raise CorruptError(f"export {path}: its metadata lists files {names!r}, expected names; it is damaged")
    if "dists" in names and not isinstance(meta.get("k"), int):
        raise CorruptError(f"export {path}: its metadata lists neighbor distances but no run k ({meta.get('k')!r}); it is damaged")
    if not {"lp_lm", "lp_knn", "targets"} <= set(names) or ("dists" in names) != ("match" in names):
        raise CorruptError(f"export {path}: its metadata lists an impossible set of files {names}")
    fnames = meta.get("feature_names")
    if ("features" in names) != (fnames is not None) or (fnames is not None and (
            not fnames or not all(isinstance(f, str) for f in fnames))):
        raise CorruptError(f"export {path}: its metadata lists features.npy and feature names "
                           f"{fnames!r} that do not go together; it is damaged")
    if ("context" in names) != isinstance(meta.get("context_order"), int) or meta.get("context_order", 1) < 1:
        raise CorruptError(f"export {path}: its metadata lists context.npy and a context order "
                           f"{meta.get('context_order')!r} that do not go together; it is damaged")
    if ("searched" in names) != (meta.get("unsearched") in UNSEARCHED) or (
            "unsearched" in meta and meta["unsearched"] not in UNSEARCHED):
        raise CorruptError(f"export {path}: its metadata lists searched.npy and unsearched "
                           f"{meta.get('unsearched')!r} that do not go together; it is damaged")
    arrays = {}
    for name in names:
        if name not in FILES:
            raise CorruptError(f"export {path}: unknown file {name}.npy in its metadata")
        file = os.path.join(path, f"{name}.npy")
        if not os.path.exists(file):
            raise CorruptError(f"export {path}: {file} is missing")
        try:
            a = np.load(file, mmap_mode="r")
        except Exception as e:  # noqa: BLE001 - numpy parses a damaged header many ways (ValueError, SyntaxError, tokenize.TokenError, ...)
            raise CorruptError(f"export {path}: cannot read {file} ({e}); it is truncated or damaged") from None
        if not a.flags.c_contiguous:
            raise CorruptError(f"export {path}: {file} is not the C-order array an export writes; it was damaged")
        dtype = FILES[name][0]
        shape = (meta["count"], *_row_shape(name, meta))
        if a.shape != shape or a.dtype != dtype:
            raise CorruptError(
                f"export {path}: {file} holds {a.dtype} {a.shape}, but its metadata says "
                f"{np.dtype(dtype).name} {shape}; the file was truncated or replaced"
            )
        arrays[name] = a
    if "searched" in arrays and not partial_search and not bool(np.all(arrays["searched"])):
        raise ConfigError(
            f"export {path} is of a run that searched only some tokens ({meta['unsearched']}: "
            f"{int((~np.asarray(arrays['searched'])).sum()):,} of {meta['count']:,} were not searched); re-scoring "
            f"and tuning need every token searched: export a plain --knnlm run (knnlm-explain shows this one)")
    return Export(path=path, meta=meta, **arrays)


def _row_shape(name, meta):
    """The shape of one token's row of file `name`: (), (K,) or (F,)."""
    if name == "features":
        return (len(meta["feature_names"]),)
    if name == "context":
        return (meta["context_order"],)
    return (meta["k_kept"],) if FILES[name][1] else ()
