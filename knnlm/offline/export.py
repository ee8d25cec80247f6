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
    features.npy (N, F) float32  the LM's own features of each token (`knnlm.retrieval.adaptive.features`: entropy,
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

dists.npy and match.npy are what re-scoring at another temperature needs
(`knnlm.offline.rescoring.lp_knn_at`); they are present whenever the writer was given neighbor
distances. This module writes; `knnlm.offline.export_reader` reads (`load_export`).
"""

import glob
import logging
import os
import shutil
import time

import numpy as np
import torch

from .. import provenance
from ..artefacts import (AtomicOutput, WriteLock, is_complete, read_json_or_none, refuse_to_replace,
                         register_cleanup, unregister_cleanup, write_error, write_json_atomic)
from ..errors import ConfigError, CorruptError, KNNLMError
from ..scoring import SIM_FUNCS, check_lambda, check_temperature
from ..store.npy import GrowingNpy

from .export_reader import (FILES, FORMAT, FORMAT_VERSION, META, META_SCHEMA, UNSEARCHED, Export, _RESERVED, _loads,  # noqa: F401
                            _row_shape, load_export)

logger = logging.getLogger(__name__)

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
        # An interrupt or an uncaught error abandons the export (its temporaries and lock go).
        register_cleanup(("export", id(self)), self.abandon)

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
        if dists is not None and self.meta["k"] is None:
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
        try:
            for f in self._files.values():
                f.close()
        except BaseException as e:
            self.abandon()
            if isinstance(e, OSError) and not isinstance(e, KNNLMError):
                raise write_error(e, self.path, f"export {self.path}") from None
            raise
        self._done = True
        self.meta.update(extra_meta or {})
        self.meta.update(complete=True, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        meta_path = os.path.join(self.path, META)
        try:
            if self.replacing:
                # The old export stayed whole until now. The new metadata is written whole
                # beside the new arrays first; then (AtomicOutput.commit) the old is marked
                # incomplete, old arrays the new export lacks are dropped, the new arrays move
                # in and the metadata last: renames only, which a full disk cannot stop.
                write_json_atomic(os.path.join(self.write_dir, META), self.meta)
                targets = [os.path.join(self.path, f"{name}.npy") for name in self._files] + [meta_path]
                output = AtomicOutput(targets, what=f"export {self.path}", overwrite=True).begin()
                output.temps = {t: os.path.join(self.write_dir, os.path.basename(t)) for t in targets}

                def retire_old():
                    old = read_json_or_none(meta_path) or {}
                    write_json_atomic(meta_path, {**old, "complete": False, "being_replaced": self.meta["finished"]})
                    for name in FILES:
                        dst = os.path.join(self.path, f"{name}.npy")
                        if name not in self._files and os.path.exists(dst):
                            os.remove(dst)

                output.commit(before=retire_old)
                shutil.rmtree(self.write_dir, ignore_errors=True)
            else:
                write_json_atomic(meta_path, self.meta)
        except OSError as e:
            self._done = False
            self.abandon()
            raise e if isinstance(e, KNNLMError) else write_error(e, self.path, f"export {self.path}") from None
        except BaseException:
            self._done = False
            self.abandon()
            raise
        unregister_cleanup(("export", id(self)))
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
        unregister_cleanup(("export", id(self)))
        self.lock.release()
