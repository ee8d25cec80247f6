"""Per-token export of a kNN-LM evaluation (`--knnlm-dump-probs PATH`), for offline tuning.

PATH is a directory:
    lp_lm.npy    (N,)   float32  natural-log p_LM(target)
    lp_knn.npy   (N,)   float32  log p_kNN(target) at the run's temperature (all k neighbors)
    targets.npy  (N,)   int64    target token ids
    dists.npy    (N, K) float32  the first K neighbor distances exactly as scored (exact squared
                                 L2 / inner products, or FAISS's); NaN where no neighbor was found
    match.npy    (N, K) bool     neighbor value == target (False where no neighbor was found)
    ids.npy      (N, K) int64    datastore rows, -1 where missing   } only with with_ids=True
    vals.npy     (N, K) int64    neighbor values, -1 where missing  }
    features.npy (N, F) float32  the LM's own features of each token (`knnlm.features`: entropy,
                                 top log-probabilities), named by meta feature_names; for
                                 adaptive retrieval (knnlm-adaptive). Exports before it lack it.
    searched.npy (N,)   bool     whether the token was searched, for a strategy that searches only
                                 some tokens (meta "unsearched": "lm_only": adaptive retrieval, the
                                 others got p_LM alone; "pointers": RetoMaton, the others were scored
                                 against the pointers' entries). Read only by callers that ask for
                                 it (load_export(..., partial_search=True): knnlm-explain); re-scoring
                                 assumes every token was searched and refuses such an export.
    meta.json    sim_func, k (the run's), k_kept (K), temperature, lmbda, count, the files,
                 feature_names (with features.npy), any caller metadata; `complete: true` is
                 written last.

dists.npy and match.npy are what re-scoring at another temperature needs (`lp_knn_at`); they
are present whenever the writer was given neighbor distances.
"""

import dataclasses
import glob
import logging
import math
import os
import shutil
import time
from typing import Optional

import numpy as np
import torch

from .. import provenance
from ..artefacts import WriteLock, check_schema, is_complete, read_json, read_json_or_none, refuse_to_replace, write_json_atomic
from ..errors import ConfigError, CorruptError, IncompleteError, KNNLMError
from ..scoring import SIM_FUNCS, check_lambda, check_temperature, knn_log_prob, neighbor_scores
from ..store.npy import GrowingNpy

logger = logging.getLogger(__name__)

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
# Elements of (rows, K) per re-scoring chunk: 4 MB of fp32 per temporary, about cache-sized.
CHUNK_ELEMENTS = 1 << 20
# log-probabilities above this are impossible (not float rounding of a probability of 1).
_LP_MAX = 1e-4


def _numpy(x):
    if x is None:
        return None
    if torch.is_tensor(x):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


class ExportWriter:
    """Append per-token rows with `add()`; `finalize()` marks the export complete.

    k_kept: how many nearest neighbors to keep per token (the first k_kept of the k given, which
    arrive sorted nearest-first); 0 keeps none (then only lambda can be tuned offline). Fewer
    kept than the run's k makes re-scoring at another temperature an approximation (see
    `lp_knn_grid`); the stored lp_knn is always exact.
    with_ids: also store the neighbors' datastore rows and values (ids.npy, vals.npy); `add()`
    must then be given both.
    feature_names: also store each token's LM features (features.npy, one column per name);
    `add()` must then be given `features` (n, F).
    context_order: also store the last C tokens of each token's context (context.npy, for the
    n-gram features of adaptive retrieval); `add()` must then be given `context` (n, C).
    unsearched: the run searched only some tokens ("lm_only" or "pointers", see the module's
    doc): store which (searched.npy); `add()` must then be given `searched` (n,).
    """

    def __init__(self, path, k_kept, *, sim_func, temperature, lmbda, with_ids=False,
                 overwrite=False, meta=None, feature_names=None, context_order=None, unsearched=None):
        if sim_func not in SIM_FUNCS:
            raise ConfigError(f"sim_func must be one of {', '.join(SIM_FUNCS)}, got {sim_func!r}")
        check_temperature(temperature)
        check_lambda(lmbda)
        if unsearched not in (None, *UNSEARCHED):
            raise ConfigError(f"unsearched must be one of {', '.join(UNSEARCHED)} or None, got {unsearched!r}")
        if isinstance(k_kept, bool) or not isinstance(k_kept, (int, np.integer)) or k_kept < 0:
            raise ConfigError(f"the number of neighbors to export must be an integer >= 0, got {k_kept!r}")
        clash = _RESERVED & set(meta or {})
        if clash:
            raise ConfigError(f"export metadata keys {sorted(clash)} are reserved for the export itself")
        self.path = path
        self.with_ids = bool(with_ids)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"export path {path} exists and is not a directory")
        # One writer per export directory: a second one at once is refused by name.
        self.lock = WriteLock(os.path.normpath(path), f"export {path}").acquire()
        try:
            self._prepare(overwrite)
        except BaseException:
            self.lock.release()
            raise
        self.meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "complete": False,
            "count": 0,
            "sim_func": sim_func,
            "k": None,  # the run's k: known from the first add() with distances
            "k_kept": int(k_kept),
            "temperature": float(temperature),
            "lmbda": float(lmbda),
            "files": [],
            **({"feature_names": list(feature_names)} if feature_names else {}),
            **({"context_order": int(context_order)} if context_order else {}),
            **({"unsearched": unsearched} if unsearched else {}),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": provenance.versions(),
            **(meta or {}),
        }
        try:
            if not self.replacing:
                # "Incomplete" first, then drop the old arrays: a reader never mixes old and new files.
                write_json_atomic(os.path.join(path, META), self.meta)
                for name in FILES:
                    try:
                        os.remove(os.path.join(path, f"{name}.npy"))
                    except FileNotFoundError:
                        pass
        except BaseException:
            self.lock.release()
            raise
        self._files = None  # name -> GrowingNpy, created by the first add()
        self._done = False

    def _prepare(self, overwrite):
        """Refuse to touch data that is not our own unfinished export (unless overwrite); decide
        where the arrays are written: in place, or beside a whole old export that they replace
        only once complete."""
        path = self.path
        meta_path = os.path.join(path, META)
        refuse_to_replace(meta_path, overwrite, lambda old: (
            f"a complete export already exists at {path} ({old.get('count', '?')} tokens); "
            f"pass --overwrite to replace it or choose another --knnlm-dump-probs path"))
        for p in glob.glob(f"{glob.escape(os.path.normpath(path))}.tmp[0-9]*"):  # a killed replacement's
            shutil.rmtree(p, ignore_errors=True)
        old = read_json_or_none(meta_path)
        entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
        ours = {f"{n}.npy" for n in FILES} | {META}
        foreign = [e for e in entries if e not in ours]
        unfinished = isinstance(old, dict) and old.get("format") == FORMAT and old.get("complete") is False
        if not overwrite:
            if foreign:
                raise KNNLMError(
                    f"export directory {path} holds files that are not this export's "
                    f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): --knnlm-dump-probs "
                    f"needs a directory of its own; choose another path, or pass --overwrite (only the "
                    f"export's own files are replaced, never the others)")
            present = [e for e in entries if e in ours]
            if present and not unfinished:
                raise KNNLMError(
                    f"export directory {path} already holds {', '.join(present[:3])} without the "
                    f"metadata of an unfinished export (another export's files?); pass --overwrite to "
                    f"replace them or choose another --knnlm-dump-probs path")
        self.replacing = is_complete(old) and _loads(path)
        self.write_dir = f"{os.path.normpath(path)}.tmp{os.getpid()}" if self.replacing else path
        os.makedirs(self.write_dir, exist_ok=True)

    @property
    def count(self):
        return self.meta["count"]

    def _open(self, names, k):
        self.meta["files"] = list(names)
        if k is not None:
            self.meta["k"] = int(k)
            self.meta["k_kept"] = min(self.meta["k_kept"], int(k))
        if "feature_names" in self.meta:
            names = list(names) + ["features"]
        if "context_order" in self.meta:
            names = list(names) + ["context"]
        if "unsearched" in self.meta:
            names = list(names) + ["searched"]
        self.meta["files"] = list(names)
        self._files = {
            name: GrowingNpy(os.path.join(self.write_dir, f"{name}.npy"), FILES[name][0],
                             _row_shape(name, self.meta))
            for name in names
        }
        if not self.replacing:
            write_json_atomic(os.path.join(self.path, META), self.meta)

    def add(self, lp_lm, lp_knn, targets, dists=None, match=None, ids=None, vals=None, valid=None,
            features=None, context=None, searched=None):
        """Append n tokens: lp_lm, lp_knn, targets (n,); dists, match, ids, vals, valid (n, k);
        features (n, F) when the writer was given feature_names.

        Tensors or arrays. dists must come with match or vals (match is then vals == target).
        Missing neighbors are those with valid False, ids < 0 or NaN distance: they are stored
        as NaN distance, match False, id and value -1. Whether distances are given is fixed by
        the first call.
        """
        if self._done:
            raise RuntimeError(f"export {self.path} is already finalized or abandoned")
        lp_lm, lp_knn, targets, dists, match, ids, vals, valid, features, context, searched = (
            _numpy(x) for x in (lp_lm, lp_knn, targets, dists, match, ids, vals, valid, features, context, searched))
        n = len(targets)
        for name, a in (("lp_lm", lp_lm), ("lp_knn", lp_knn), ("targets", targets)):
            if a.ndim != 1 or len(a) != n:
                raise ValueError(f"export add(): {name} has shape {a.shape}, expected ({n},)")
        row = {"lp_lm": lp_lm.astype(np.float32), "lp_knn": lp_knn.astype(np.float32),
               "targets": targets.astype(np.int64)}
        for name in ("lp_lm", "lp_knn"):
            bad = np.isnan(row[name]) | (row[name] > _LP_MAX)
            if bad.any():
                i = int(np.argmax(bad))
                raise CorruptError(f"export {self.path}: {name} = {row[name][i]} at token {self.count + i} "
                                   f"is not a log-probability")
        if self._files is None:
            names = ["lp_lm", "lp_knn", "targets"]
            if dists is not None:
                if dists.ndim != 2:
                    raise ValueError(f"export add(): dists has shape {dists.shape}, expected (n, k)")
                if self.meta["k_kept"] > 0:
                    names += ["dists", "match"] + (["ids", "vals"] if self.with_ids else [])
            self._open(names, None if dists is None else dists.shape[1])
        if "dists" in self._files:
            row.update(self._neighbors(n, targets, dists, match, ids, vals, valid))
        if "features" in self._files:
            shape = (n, len(self.meta["feature_names"]))
            if features is None or features.shape != shape:
                raise ValueError(f"export add(): features of shape {None if features is None else features.shape}, "
                                 f"expected {shape}")
            row["features"] = features.astype(np.float32)
        if "context" in self._files:
            shape = (n, self.meta["context_order"])
            if context is None or context.shape != shape:
                raise ValueError(f"export add(): context of shape {None if context is None else context.shape}, "
                                 f"expected {shape}")
            row["context"] = context.astype(np.int64)
        if "searched" in self._files:
            if searched is None or searched.shape != (n,):
                raise ValueError(f"export add(): searched of shape {None if searched is None else searched.shape}, "
                                 f"expected ({n},)")
            row["searched"] = searched.astype(np.bool_)
        elif dists is not None and self.meta["k"] is None:
            raise ValueError("export add(): distances given, but the first add() had none")
        for name, f in self._files.items():
            f.append(row[name])
        self.meta["count"] += n

    def _neighbors(self, n, targets, dists, match, ids, vals, valid):
        k, K = self.meta["k"], self.meta["k_kept"]
        if dists is None:
            raise ValueError("export add(): the first add() had neighbor distances, this one has none")
        if self.with_ids and (ids is None or vals is None):
            raise ValueError("export add(): with_ids=True needs ids and vals")
        if match is None and vals is None:
            raise ValueError("export add(): dists need match or vals to say which neighbors carry the target")
        for name, a in (("dists", dists), ("match", match), ("ids", ids), ("vals", vals), ("valid", valid)):
            if a is not None and a.shape != (n, k):
                raise ValueError(f"export add(): {name} has shape {a.shape}, expected ({n}, {k})")
        # Neighbors arrive nearest-first, so the first K are the K nearest.
        dists = dists[:, :K].astype(np.float32)  # a copy: NaNs are written into it below
        missing = np.isnan(dists)
        if valid is not None:
            missing |= ~valid[:, :K].astype(bool)
        if ids is not None:
            missing |= ids[:, :K] < 0
        same = vals[:, :K] == targets[:, None] if vals is not None else None
        if match is None:
            match = same
        else:
            match = match[:, :K].astype(bool)
            if same is not None and (match != same)[~missing].any():
                raise ValueError("export add(): match disagrees with vals == targets")
        dists[missing] = np.nan
        out = {"dists": dists, "match": match & ~missing}
        if self.with_ids:
            out["ids"] = np.where(missing, -1, ids[:, :K]).astype(np.int64)
            out["vals"] = np.where(missing, -1, vals[:, :K]).astype(np.int64)
        return out

    def finalize(self, extra_meta=None):
        """Close the arrays, then write meta.json with `complete: true`; returns the metadata."""
        if self._done:
            raise RuntimeError(f"export {self.path} is already finalized or abandoned")
        clash = _RESERVED & set(extra_meta or {})
        if clash:
            raise ConfigError(f"export metadata keys {sorted(clash)} are reserved for the export itself")
        if self._files is None:  # nothing was added: an empty export, still a valid one
            self._open(["lp_lm", "lp_knn", "targets"], None)
        for f in self._files.values():
            f.close()
        self._done = True
        self.meta.update(extra_meta or {})
        self.meta.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta_path = os.path.join(self.path, META)
        if self.replacing:
            # The old export stayed whole until now: mark it incomplete, move the new arrays in
            # (dropping old arrays the new export lacks), then the new metadata.
            old = read_json_or_none(meta_path) or {}
            write_json_atomic(meta_path, {**old, "complete": False, "being_replaced": self.meta["finished"]})
            for name in FILES:
                src, dst = os.path.join(self.write_dir, f"{name}.npy"), os.path.join(self.path, f"{name}.npy")
                if name in self._files:
                    os.replace(src, dst)
                elif os.path.exists(dst):
                    os.remove(dst)
            shutil.rmtree(self.write_dir, ignore_errors=True)
        write_json_atomic(meta_path, self.meta)
        self.lock.release()
        return self.meta

    def abandon(self):
        """Close the files and leave the export marked incomplete (e.g. the run failed); an old
        export being replaced is left as it was."""
        if not self._done and self._files is not None:
            for f in self._files.values():
                f.abandon()
        if not self._done and self.replacing:
            shutil.rmtree(self.write_dir, ignore_errors=True)
        self._done = True
        self.lock.release()


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


def _chunk_rows(k):
    return max(1, CHUNK_ELEMENTS // max(k, 1))


def _lp_knn_exact(d, m, valid, sim_func, temperature):
    # knn_log_prob compares neighbor values with targets; `match` already is that comparison.
    ones = torch.ones(len(m), dtype=torch.bool)
    return knn_log_prob(neighbor_scores(d, sim_func, temperature), m, ones, valid)


def _lp_knn_chunk(dists, match, sim_func, temperatures):
    """log p_kNN for one (rows, K) chunk at each temperature.

    knn_log_prob costs ~10 passes over the (rows, K) scores per temperature; here the scores
    are shifted by their row maximum once, after which each temperature is one exp pass and
    two sums: log p_kNN = log sum_match e^(x/T) - log sum_all e^(x/T), x = s - max s <= 0, so
    the normalizer lies in [1, K] and cannot over- or underflow. Only the matched sum can
    underflow (every matching neighbor far from the nearest at a low T): those rows, and any
    non-finite one, are redone with knn_log_prob itself. Tests hold this equal to it.
    """
    # Copies: the memory map is read-only, torch wants writable memory.
    d = torch.from_numpy(np.array(dists, dtype=np.float32))
    m = torch.from_numpy(np.array(match, dtype=np.bool_))
    valid = ~torch.isnan(d)
    if valid.all():
        valid = None  # nothing to mask
    else:
        d = d.nan_to_num(0.0)
        m = m & valid
    s = neighbor_scores(d, sim_func, 1.0)  # scoring's sign convention; s / T is its score at T
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    top = s.amax(dim=-1, keepdim=True)
    x = s - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    mf = m.float()
    has_match = mf.amax(dim=-1) > 0
    buf = torch.empty_like(x)
    out = []
    for t in temperatures:
        torch.div(x, t, out=buf)
        buf.exp_()  # missing neighbors: exp(-inf) = 0
        matched = torch.linalg.vecdot(buf, mf)
        lp = matched.log() - buf.sum(dim=-1).log()
        lp = lp.masked_fill(~has_match, float("-inf"))  # also rows with no neighbor at all
        redo = has_match & ~(matched >= 1e-30) | torch.isnan(lp)  # NaN compares False: redone
        if redo.any():
            lp[redo] = _lp_knn_exact(d[redo], m[redo], None if valid is None else valid[redo], sim_func, t)
        out.append(lp.numpy())
    return out


def lp_knn_grid(export, temperatures, rows=slice(None)):
    """log p_kNN(target) at each temperature: (len(temperatures), n) float32.

    Re-scores from the stored distances and matches in chunks (memory is bounded whatever N
    and K); each chunk is read once for all temperatures. When the export kept fewer
    neighbors than the run used (K < k), this is the softmax over the K nearest only: an
    approximation of what a run at that temperature would give (a warning says so).
    """
    if not export.has_neighbors:
        raise ConfigError(
            f"export {export.path} has no neighbor distances, so p_kNN cannot be re-scored at "
            f"another temperature; only the run's own (T = {export.meta['temperature']}) is available"
        )
    temperatures = [float(t) for t in temperatures]
    for t in temperatures:
        check_temperature(t, "temperature")
    if export.truncated and not export._warned:
        logger.warning(
            "export %s kept %d of the run's %d neighbors: p_kNN re-scored at a new temperature "
            "uses only those %d, an approximation (the stored lp_knn, at T = %g, is exact)",
            export.path, export.k_kept, export.k, export.k_kept, export.meta["temperature"])
        export._warned = True
    sel = np.arange(export.count)[rows]
    contiguous = isinstance(rows, slice) and rows.step in (None, 1)
    out = np.empty((len(temperatures), len(sel)), dtype=np.float32)
    step = _chunk_rows(export.k_kept)
    for s in range(0, len(sel), step):
        part = sel[s:s + step]
        if contiguous:  # a plain slice of the memory map: no fancy-index copy
            lo, hi = int(part[0]), int(part[-1]) + 1
            d, m = export.dists[lo:hi], export.match[lo:hi]
        else:
            d, m = export.dists[part], export.match[part]
        for i, lp in enumerate(_lp_knn_chunk(d, m, export.meta["sim_func"], temperatures)):
            out[i, s:s + len(part)] = lp
    return out


def lp_knn_at(export, temperature, rows=slice(None)):
    """log p_kNN(target) re-scored at `temperature` for `rows` (a slice, index or mask): (n,) float32.

    Exact when the export kept all the run's neighbors; with K kept < k an approximation
    (see `lp_knn_grid`).
    """
    return lp_knn_grid(export, [temperature], rows)[0]


def same_temperature(a, b):
    return math.isclose(a, b, rel_tol=1e-9)


def unsearched_kind(retriever):
    """What an export of a run with `retriever` records for its tokens not searched (the
    ExportWriter's `unsearched`): "lm_only" for adaptive retrieval, "pointers" for RetoMaton,
    None for a strategy that searches every token."""
    from ..retrieval.adaptive import AdaptiveRetriever
    from ..retrieval.retomaton import RetoMatonRetriever

    if isinstance(retriever, AdaptiveRetriever):
        return "lm_only"
    if isinstance(retriever, RetoMatonRetriever):
        return "pointers"
    return None


def searched_mask(retriever, neighbors):
    """(n,) bool: which queries of the retriever's last `retrieve()` were searched (the
    `searched` of ExportWriter.add), or None when every one was. RetoMaton knows it only for a
    call with streams (`Streams`), the way a front-end scores."""
    kind = unsearched_kind(retriever)
    if kind == "lm_only":
        r = neighbors.retrieved
        return None if r is None else r.detach().cpu().bool()
    if kind == "pointers":
        return retriever.last_searched.detach().cpu().bool()
    return None
