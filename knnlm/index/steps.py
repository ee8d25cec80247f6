"""The steps of an index build, shared by the single build (knnlm.index.builder) and the
sharded one (knnlm.index.sharded_build): sample and train, add rows, checkpoint, finalize."""

import glob
import json
import logging
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from .. import provenance
from ..artefacts import (AtomicOutput, check_names, file_checksum, read_json_or_none, refuse_to_replace, write_error,
                         write_json_atomic)
from ..errors import ConfigError, CorruptError, DiskSpaceError, KNNLMError
from ..store.npy import free_bytes
from .faiss_utils import TrainingProgress, maybe_to_gpu, save_index, to_cpu
from .load import meta_path

logger = logging.getLogger(__name__)

PROG = "knnlm-build-index"
INDEX_FORMAT_VERSION = 1
# Rows of training keys read from the datastore at a time.
SAMPLE_CHUNK = 1 << 16


def new_index(plan):
    """An untrained index from the factory string; ids are datastore rows, so non-IVF gets an IDMap."""
    import faiss

    metric = faiss.METRIC_L2 if plan.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    d = plan.datastore.dim
    try:
        index = faiss.index_factory(d, plan.factory, metric)
        try:
            ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        except RuntimeError:
            return faiss.index_factory(d, "IDMap," + plan.factory, metric)
    except RuntimeError as e:
        raise ConfigError(f"FAISS cannot make an index of dimension {d} from factory {plan.factory!r}: "
                          f"{str(e).strip().splitlines()[-1]}") from None
    if getattr(ivf, "do_polysemous_training", False):
        # index_factory turns it on for PQ; it only serves polysemous (Hamming) search, which
        # Retriever never uses, and the original kNN-LM code did not do it. It costs train time.
        ivf.do_polysemous_training = False
    return index


def _add_chunk(index, keys, ids):
    """One add; a seam for tests that simulate a crash part-way through."""
    index.add_with_ids(keys, ids)


def check_finite(x, first_row, where):
    """Refuse a chunk of keys holding NaN or inf (one vectorised pass), naming the first bad row."""
    finite = np.isfinite(x)
    if not finite.all():
        bad = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise CorruptError(f"{where}: the key of row {first_row + bad:,} is not finite "
                           f"({x[bad][~finite[bad]][0]}); FAISS would index it silently. Dump the "
                           f"datastore again (check the model for NaN/inf states)")


def add_rows(index, keys, start, end, *, id_offset=0, chunk, desc="adding keys", bar_start=None,
             on_chunk=None, position=None, where="datastore"):
    """Add keys[start:end] as float32 with ids id_offset + row, `chunk` rows at a time; every
    chunk is checked for non-finite keys first."""
    bar_start = start if bar_start is None else bar_start
    with tqdm(total=end - bar_start, initial=start - bar_start, unit="key", unit_scale=True,
              desc=desc, position=position, dynamic_ncols=True) as bar:
        for s in range(start, end, chunk):
            e = min(end, s + chunk)
            x = np.array(keys[s:e], dtype=np.float32)  # a copy: fp16 keys become fp32, memmaps are read
            check_finite(x, s, where)
            _add_chunk(index, x, np.arange(s + id_offset, e + id_offset, dtype=np.int64))
            bar.update(e - s)
            if on_chunk is not None:
                on_chunk(e)


def training_rows(size, n, seed, sampler="default"):
    """The rows of the training sample: n of range(size) without replacement.

    default: np.random.default_rng(seed).choice, sorted (the keys are read in ascending order);
    legacy: the original build_dstore.py's np.random.seed(seed); np.random.choice(size, n,
    replace=False), in the order drawn (FAISS's k-means sees the keys in that order)."""
    if sampler == "legacy":
        np.random.seed(seed)
        return np.random.choice(size, size=n, replace=False)
    return np.sort(np.random.default_rng(seed).choice(size, size=n, replace=False))


def sample_training_keys(plan):
    """min(num_keys_to_train, size) keys at seeded random rows (`training_rows`), as float32."""
    ds = plan.datastore
    rows = training_rows(ds.size, plan.n_train, plan.seed, getattr(plan, "sampler", "default"))
    x = np.empty((plan.n_train, ds.dim), dtype=np.float32)
    with tqdm(total=plan.n_train, unit="key", unit_scale=True, desc="reading training keys", dynamic_ncols=True) as bar:
        for s in range(0, plan.n_train, SAMPLE_CHUNK):
            x[s:s + SAMPLE_CHUNK] = ds.gather_keys(rows[s:s + SAMPLE_CHUNK])
            finite = np.isfinite(x[s:s + SAMPLE_CHUNK]).all(axis=1)
            if not finite.all():
                row = int(rows[s + int(np.argmin(finite))])
                raise CorruptError(f"datastore {ds.prefix}: the key of row {row:,} is not finite; "
                                   f"FAISS cannot train on it. Dump the datastore again")
            bar.update(min(SAMPLE_CHUNK, plan.n_train - s))
    return x


# --------------------------------------------------------------------------- build steps

def _write_progress(plan, **fields):
    state = read_json_or_none(plan.progress_path) or {}
    state.update(identity=plan.identity(), datastore=plan.datastore.prefix,
                 size=plan.datastore.size, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields)
    write_json_atomic(plan.progress_path, state)


def _stale_temporaries(index_path):
    """Temporary files (NAME.tmpPID) that a killed build of this index left behind."""
    names = [index_path] + [f"{index_path}{x}" for x in (".trained", ".partial", ".progress.json", ".meta.json", ".ivfdata")]
    return sorted(p for n in names for p in glob.glob(f"{glob.escape(n)}.tmp[0-9]*"))


def _leftovers(index_path):
    found = [p for p in (f"{index_path}.trained", f"{index_path}.partial", f"{index_path}.progress.json")
             if os.path.exists(p)]
    return found + sorted(glob.glob(f"{glob.escape(index_path)}.shard[0-9]*")) + _stale_temporaries(index_path)


def check_target(plan):
    """Refuse to replace a complete index (or a foreign file) at INDEX unless overwrite=true."""
    path = plan.index_path
    mpath = meta_path(path)
    # The longest names derived from INDEX (INDEX.progress.json.tmpPID) must fit: found now,
    # not after training.
    check_names([path], f"index {path}", derived=".progress.json.tmp9999999")
    meta = refuse_to_replace(mpath, plan.overwrite, lambda meta: (
        f"a complete index already exists at {path} (built {meta.get('built', '?')} from "
        f"{meta.get('datastore', '?')}); pass overwrite=true (--overwrite) to replace it, "
        f"or choose another faiss_index"), is_existing=lambda meta: bool(meta.get("complete")) and os.path.exists(path))
    if meta and meta.get("complete") and os.path.exists(path):
        logger.info("overwrite=true: the complete index at %s is replaced when this build finishes", path)
    elif os.path.exists(path) and meta is None and not os.path.exists(plan.progress_path) and not plan.overwrite:
        raise KNNLMError(
            f"{path} exists but has no knnlm metadata ({mpath}); it may be an index built by the "
            f"original build_dstore.py. Pass overwrite=true (--overwrite) to replace it"
        )


def load_state(plan):
    """The progress record of an interrupted build with the same parameters, or None.

    Leftovers of a build for other parameters or another datastore are removed, loudly.
    """
    state = read_json_or_none(plan.progress_path)
    if state and state.get("identity") == plan.identity() and os.path.exists(plan.trained_path):
        for p in _stale_temporaries(plan.index_path):
            os.remove(p)
        return state
    found = _leftovers(plan.index_path)
    if found:
        if state and state.get("identity"):
            old, new = state["identity"], plan.identity()
            why = "it differs in " + ", ".join(
                f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in new if old.get(k) != new.get(k))
            if old == new:
                why = f"{plan.trained_path} is missing"
        else:
            why = "it left no readable progress record"
        logger.warning("found an unfinished build of %s that cannot be resumed (%s): starting over",
                       plan.index_path, why)
        for p in found:
            os.remove(p)
    return None


def train_or_reuse(plan, state, sample=None):
    """Train a new index on the sample and save it to INDEX.trained, or reuse an earlier run's.

    sample(plan) -> the training keys (default: sample_training_keys; the Ray build reads them
    on the shards' nodes)."""
    if state is not None and state.get("train_seconds") is not None:
        logger.info("reusing the trained index %s from an earlier run of this build", plan.trained_path)
        return state["train_seconds"]
    t0 = time.perf_counter()
    x = (sample or sample_training_keys)(plan)
    index = new_index(plan)
    index, on_gpu = maybe_to_gpu(index, plan.gpu, "training")
    logger.info("training %s on %s keys of dimension %d%s", plan.factory, f"{len(x):,}", x.shape[1],
                " on the GPU" if on_gpu else f" with {plan.threads} threads")
    try:
        with TrainingProgress(index):
            index.train(x)
    except RuntimeError as e:
        raise ConfigError(f"FAISS could not train {plan.factory} on {len(x):,} keys: "
                          f"{str(e).strip().splitlines()[-1]}") from None
    del x
    index = to_cpu(index)
    _check_disk(plan, index)
    save_index(index, plan.trained_path)
    seconds = time.perf_counter() - t0
    _write_progress(plan, rows_added=plan.starting_point, train_seconds=seconds)
    logger.info("trained in %.1f s; saved %s", seconds, plan.trained_path)
    return seconds


def _check_disk(plan, index):
    """The index is written about twice over (last checkpoint + final file); refuse early if that won't fit."""
    import faiss

    try:
        per_key = faiss.extract_index_ivf(index).code_size + 8  # code + int64 id
    except RuntimeError:
        per_key = index.sa_code_size() + 8 if hasattr(index, "sa_code_size") else plan.datastore.dim * 4 + 8
    need = 2 * (plan.datastore.size - plan.starting_point) * per_key
    have = free_bytes(plan.index_path)
    if need > have:
        raise DiskSpaceError(
            f"index {plan.index_path} needs about {need / 2**30:.2f} GiB while building (the "
            f"index and its last checkpoint) but only {have / 2**30:.2f} GiB are free there"
        )


def retire_old_index(index_path):
    """Mark a complete index about to be replaced as incomplete, so no reader trusts a half-replaced one."""
    mpath = meta_path(index_path)
    meta = read_json_or_none(mpath) or {}
    if meta.get("complete"):
        meta.update(complete=False, being_replaced=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json_atomic(mpath, meta)


def faiss_write_error(e, path):
    """FAISS reports a failed write (a full disk, a file-size limit) as a RuntimeError."""
    detail = str(e).strip().splitlines()[-1] if str(e).strip() else e.__class__.__name__
    return DiskSpaceError(f"index {path}: FAISS could not write it ({detail}): the disk is full, a file-size "
                          f"limit was reached or the place is not writable; the old index is unchanged. Free "
                          f"space or write elsewhere, then run the same command again (it resumes)")


def _index_meta(plan, index, checksum, train_seconds, add_seconds, extra_meta, out):
    ds = plan.datastore
    meta = {
        "format_version": INDEX_FORMAT_VERSION,
        "complete": True,
        "factory": plan.factory,
        "factory_template": plan.template,
        "ncentroids": plan.ncentroids,
        "code_size": plan.code_size,
        "pq_nbits": plan.pq_nbits,
        "metric": plan.metric,
        "n_train": plan.n_train,
        "seed": plan.seed,
        "sampler": getattr(plan, "sampler", "default"),
        "nprobe": plan.probe,
        "datastore": ds.prefix,
        "datastore_fingerprint": ds.fingerprint,
        "datastore_size": ds.size,
        "dim": ds.dim,
        "ntotal": int(index.ntotal),
        "starting_point": plan.starting_point,
        "train_seconds": round(train_seconds, 3),
        "add_seconds": round(add_seconds, 3),
        "build_seconds": round(train_seconds + add_seconds, 3),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": provenance.versions(),
        "ondisk": False,
        "checksum": checksum,
        **extra_meta,
    }
    if meta["ondisk"] and meta.get("ivfdata"):
        meta["ivfdata_checksum"] = file_checksum(
            out.path(os.path.join(os.path.dirname(plan.index_path), meta["ivfdata"])))
    return meta


def finalize(plan, index, *, train_seconds, add_seconds, rows_added, extra_meta, leftovers=(),
             resumed_from=None, t_start=None, moves=()):
    """Write INDEX then INDEX.meta.json (complete), remove leftovers, print and return the summary.

    The new index is written whole under a temporary name first: a build failing here leaves
    the old index as it was."""
    import faiss

    mpath = meta_path(plan.index_path)
    # check_target refused what may not be replaced; every new file is written under a
    # temporary name and renamed into place only once all are whole (AtomicOutput).
    out = AtomicOutput([dst for _, dst in moves] + [plan.index_path, mpath], what=f"index {plan.index_path}",
                       overwrite=True).begin()
    try:
        try:
            faiss.write_index(to_cpu(index), out.path(plan.index_path))
        except RuntimeError as e:
            raise faiss_write_error(e, plan.index_path) from None
        checksum = file_checksum(out.path(plan.index_path))
        for src, dst in moves:  # e.g. the new .ivfdata of an on-disk index
            os.replace(src, out.path(dst))
        meta = _index_meta(plan, index, checksum, train_seconds, add_seconds, extra_meta, out)
        with open(out.path(mpath), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)
        out.commit(before=lambda: retire_old_index(plan.index_path))
    except OSError as e:
        out.abort()
        raise e if isinstance(e, KNNLMError) else write_error(e, plan.index_path, f"index {plan.index_path}",
                                                               kept="the old index is unchanged") from None
    finally:
        out.abort()  # after a commit: nothing left to remove
        for src, _ in moves:
            if os.path.exists(src):
                os.remove(src)
    for p in [plan.trained_path, plan.partial_path, plan.progress_path, *leftovers]:
        if os.path.exists(p):
            os.remove(p)
    files = {"index_bytes": os.path.getsize(plan.index_path)}
    if meta["ondisk"]:
        files["ivfdata_bytes"] = os.path.getsize(os.path.join(os.path.dirname(os.path.abspath(plan.index_path)), meta["ivfdata"]))
    summary = {
        "index": plan.index_path,
        "meta": meta,
        "train_seconds": train_seconds,
        "add_seconds": add_seconds,
        "rows_added": rows_added,
        "keys_per_second": rows_added / add_seconds if add_seconds > 0 else float("inf"),
        "resumed_from_row": resumed_from,
        "wall_seconds": time.perf_counter() - t_start if t_start is not None else None,
        **files,
    }
    print_summary(summary)
    return summary


def _human_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def print_summary(s, file=None):
    m = s["meta"]
    bits = "" if m["pq_nbits"] == 8 else f" ({m['pq_nbits']}-bit codes)"
    rows = [
        ("index", s["index"] + ("  (inverted lists on disk)" if m["ondisk"] else "")),
        ("datastore", f"{m['datastore']}  ({m['datastore_size']:,} keys x {m['dim']})"),
        ("factory", f"{m['factory']}  (from {m['factory_template']})"),
        ("ncentroids", f"{m['ncentroids']}"),
        ("code_size", f"{m['code_size']}{bits}"),
        ("metric / nprobe", f"{m['metric']} / {m['nprobe']}"),
        ("training keys", f"{m['n_train']:,}  (seed {m['seed']})"),
        ("train time", f"{s['train_seconds']:.1f} s"),
        ("add time", f"{s['add_seconds']:.1f} s  ({s['rows_added']:,} keys, {s['keys_per_second']:,.0f} keys/s)"),
    ]
    if s["resumed_from_row"]:
        rows.append(("resumed from row", f"{s['resumed_from_row']:,}"))
    if m.get("shards_reused"):
        rows.append(("shards reused", ", ".join(map(str, m["shards_reused"])) + "  (added by an interrupted run)"))
    rows.append(("index file", _human_bytes(s["index_bytes"])))
    if "ivfdata_bytes" in s:
        rows.append(("ivfdata file", _human_bytes(s["ivfdata_bytes"])))
    width = max(len(k) for k, _ in rows)
    out = file or sys.stdout
    print(f"{PROG}: built {s['index']}", file=out)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)


def setup_logging():
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked: noise
