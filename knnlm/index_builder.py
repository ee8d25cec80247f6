"""knnlm-build-index: train a FAISS index on a datastore and add every key to it.

    knnlm-build-index dstore_mmap=runs/dstore ncentroids=4096 code_size=64
    knnlm-build-index --dstore_mmap runs/dstore --dstore_size 103225485 --dimension 1024 \
        --faiss_index runs/knn.index --ncentroids 4096 --code_size 64 --probe 32

Defaults are in configs/build_index.yaml. The build:
  1. trains on a seeded random sample of the keys and saves the empty trained index to
     INDEX.trained;
  2. adds the keys in chunks (ids = datastore rows), saving INDEX.partial and
     INDEX.progress.json every `checkpoint_interval_s`, so that re-running the same command
     after a crash resumes from the last saved chunk;
  3. writes INDEX (via a temporary name), then INDEX.meta.json (`complete: true`, the
     parameters, the datastore's fingerprint), then removes the leftovers.
Sharded datastores (and ondisk_merge=true) go through knnlm.shards.build_sharded instead.
"""

import glob
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import provenance, shards
from .datastore import read_json, write_json_atomic
from .errors import ConfigError, CorruptError, KNNLMError, MismatchError
from .index import meta_path
from .npy import free_bytes

logger = logging.getLogger(__name__)

PROG = "knnlm-build-index"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_NAME = "build_index"
INDEX_FORMAT_VERSION = 1
# FAISS's k-means warns below 39 training points per centroid (and fails below 1).
MIN_POINTS_PER_CENTROID = 39
# Rows of training keys read from the datastore at a time.
SAMPLE_CHUNK = 1 << 16

# Every config field and its type, for validating overrides and translating --options.
FIELDS = {
    "dstore_mmap": str, "faiss_index": str, "factory": str, "ncentroids": int, "code_size": int,
    "probe": int, "metric": str, "seed": int, "num_keys_to_train": int,
    "num_keys_to_add_at_a_time": int, "starting_point": int, "checkpoint_interval_s": float,
    "gpu": bool, "threads": int, "overwrite": bool, "dstore_size": int, "dimension": int,
    "dstore_fp16": bool, "shards": list, "shard_workers": int, "ondisk_merge": bool,
}
OPTIONAL = {"threads", "dstore_size", "dimension", "dstore_fp16", "shards"}
METRICS = ("l2", "ip")


# --------------------------------------------------------------------------- configuration

def load_config(overrides=()):
    """The defaults of configs/build_index.yaml with `key=value` overrides, through hydra's compose."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    if not (CONFIG_DIR / f"{CONFIG_NAME}.yaml").is_file():
        raise ConfigError(f"the defaults {CONFIG_DIR / CONFIG_NAME}.yaml are missing: run from a checkout "
                          f"of knnlm or install it with `pip install -e .`")
    # compose needs its own GlobalHydra; if a hydra app already holds one, lend it back after.
    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except HydraException as e:
        msg = str(e).splitlines()[0]
        m = re.match(r"Could not override '([^']+)'", msg)
        if m:
            msg = f"unknown setting '{m[1]}' (known: {', '.join(FIELDS)})"
        elif "Ambiguous value" in msg:
            msg += "; quote values that hold commas, e.g. \"factory='IVF4096,PQ64'\""
        raise ConfigError(msg) from None
    finally:
        if saved is not None:
            GlobalHydra.instance().hydra = saved


def _as_config(cfg):
    """A DictConfig from load_config, or a plain mapping of overrides merged over the defaults."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, DictConfig):
        return cfg
    base = load_config()
    unknown = sorted(set(cfg) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    try:
        return OmegaConf.merge(base, OmegaConf.create(dict(cfg)))
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def _validated(cfg):
    """Resolve the config into a plain dict, refusing wrong types and out-of-range values."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    cfg = _as_config(cfg)
    if OmegaConf.is_missing(cfg, "dstore_mmap"):
        raise ConfigError("dstore_mmap is required: the datastore prefix (P for P_keys.npy), or a shard manifest")
    try:
        c = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    unknown = sorted(set(c) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)} (known: {', '.join(FIELDS)})")
    for name, typ in FIELDS.items():
        v = c.get(name)
        if v is None and name in OPTIONAL:
            continue
        if name == "shards" and isinstance(v, str):
            continue  # a manifest path
        ok = isinstance(v, typ) and not (typ is not bool and isinstance(v, bool))
        if typ is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise ConfigError(f"{name} must be {typ.__name__}, got {v!r}")
    for name in ("ncentroids", "code_size", "probe", "num_keys_to_train", "num_keys_to_add_at_a_time",
                 "shard_workers", "threads", "dstore_size", "dimension"):
        if c.get(name) is not None and c[name] < 1:
            raise ConfigError(f"{name} must be at least 1, got {c[name]}")
    for name in ("seed", "starting_point", "checkpoint_interval_s"):
        if c[name] < 0:
            raise ConfigError(f"{name} must not be negative, got {c[name]}")
    if c["metric"] not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {c['metric']!r}")
    if isinstance(c["shards"], list) and not all(isinstance(p, str) for p in c["shards"]):
        raise ConfigError(f"shards must be a list of datastore prefixes, got {c['shards']!r}")
    return c


# --------------------------------------------------------------------------- the plan

@dataclass
class Plan:
    """Everything the build does, decided up front from the config and the datastore."""

    index_path: str
    datastore: object  # Datastore or shards.ShardedDatastore
    template: str
    factory: str
    ncentroids: int
    code_size: int
    pq_nbits: int
    metric: str
    n_train: int
    seed: int
    probe: int
    starting_point: int
    chunk: int
    checkpoint_interval_s: float
    gpu: bool
    threads: int
    overwrite: bool
    ondisk: bool
    shard_workers: int

    @property
    def trained_path(self):
        return f"{self.index_path}.trained"

    @property
    def partial_path(self):
        return f"{self.index_path}.partial"

    @property
    def progress_path(self):
        return f"{self.index_path}.progress.json"

    def identity(self):
        """What determines the index's content: an interrupted build resumes only if this matches."""
        return {
            "factory": self.factory, "metric": self.metric, "seed": self.seed, "n_train": self.n_train,
            "starting_point": self.starting_point, "dim": self.datastore.dim,
            "datastore_fingerprint": self.datastore.fingerprint,
            "route": "ondisk" if self.ondisk else "single",
        }


def _open_datastore(c):
    """Open the datastore (or shards) named by the config and check the optional size/dim/fp16."""
    prefix = c["dstore_mmap"]
    if isinstance(c["shards"], list):
        if os.path.exists(f"{prefix}_keys.npy"):
            raise ConfigError(
                f"dstore_mmap {prefix} is itself a datastore; with shards, dstore_mmap names the "
                f"combined datastore (its manifest goes to {shards.manifest_path(prefix)}): pick another prefix"
            )
        ds = shards.write_manifest(shards.manifest_path(prefix), c["shards"], overwrite=c["overwrite"])
        logger.info("wrote shard manifest %s (%d shards, %s keys)", ds.prefix, len(ds.shards), f"{ds.size:,}")
    elif isinstance(c["shards"], str):
        ds = shards.open_manifest(c["shards"])
    elif os.path.exists(f"{prefix}_meta.json") or not os.path.exists(f"{prefix}_keys.npy"):
        ds = shards.open_datastore(prefix)  # has metadata: the checks below name the option at fault
    else:  # the original code's raw memmaps open only with their size, dimension and fp16
        ds = shards.open_datastore(prefix, dstore_size=c["dstore_size"], dim=c["dimension"],
                                   fp16=bool(c["dstore_fp16"]))
    if c["dimension"] is not None and c["dimension"] != ds.dim:
        raise MismatchError(f"--dimension {c['dimension']} does not match datastore {ds.prefix}, whose keys have dimension {ds.dim}")
    if c["dstore_size"] is not None and c["dstore_size"] != ds.size:
        raise MismatchError(f"--dstore_size {c['dstore_size']:,} does not match datastore {ds.prefix}, which has {ds.size:,} entries")
    if c["dstore_fp16"] is not None:
        have = ds.meta.get("keys_dtype") or ds.keys.dtype.name
        want = "float16" if c["dstore_fp16"] else "float32"
        if have != want:
            raise MismatchError(f"datastore {ds.prefix} holds {have} keys but --dstore_fp16 says {want}")
    return ds


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def make_plan(cfg):
    """Validate the config, open the datastore and settle the parameters (shrunk for small data)."""
    c = _validated(cfg)
    ds = _open_datastore(c)
    dim, size = ds.dim, ds.size
    if c["starting_point"] >= size:
        raise ConfigError(f"starting_point {c['starting_point']:,} is past the end of datastore {ds.prefix} ({size:,} entries)")
    n_train = min(c["num_keys_to_train"], size)
    if n_train < 2:
        raise ConfigError(f"datastore {ds.prefix} has {size} entries: too few to train an index")
    template = c["factory"]

    ncentroids = c["ncentroids"]
    if "{ncentroids}" in template and n_train < MIN_POINTS_PER_CENTROID * ncentroids:
        # Largest power of two that leaves FAISS its ~39 training points per centroid.
        reduced = 2 ** int(math.log2(max(1, n_train // MIN_POINTS_PER_CENTROID)))
        logger.warning(
            "only %s training keys for ncentroids=%d (FAISS wants %d per centroid, i.e. %s keys): "
            "using ncentroids=%d instead", f"{n_train:,}", ncentroids, MIN_POINTS_PER_CENTROID,
            f"{MIN_POINTS_PER_CENTROID * ncentroids:,}", reduced)
        ncentroids = reduced

    code_size = c["code_size"]
    if re.search(r"(?<![A-Za-z])PQ\{code_size\}", template) and dim % code_size:
        raise ConfigError(
            f"code_size {code_size} does not divide the key dimension {dim}: PQ splits each key into "
            f"code_size equal parts. Choose one of {', '.join(map(str, _divisors(dim)))}"
        )
    try:
        factory = template.format(ncentroids=ncentroids, code_size=code_size)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"factory {template!r}: only {{ncentroids}} and {{code_size}} can be filled in ({e})") from None

    # 8-bit PQ trains 256 centroids per sub-quantizer; with few keys use fewer bits.
    pq_nbits = 8
    fit = n_train // MIN_POINTS_PER_CENTROID
    if fit < 256 and re.search(r"(?<![A-Za-z])PQ\d+(?=,|$)", factory):
        pq_nbits = max(1, min(8, int(math.log2(max(fit, 2)))))
        factory = re.sub(r"(?<![A-Za-z])PQ(\d+)(?=,|$)", lambda m: f"PQ{m[1]}x{pq_nbits}", factory)
        logger.warning(
            "only %s training keys: 8-bit PQ needs %s (%d per each of 256 centroids); using %d-bit "
            "codes (factory %s)", f"{n_train:,}", f"{MIN_POINTS_PER_CENTROID * 256:,}",
            MIN_POINTS_PER_CENTROID, pq_nbits, factory)

    plan = Plan(
        index_path=c["faiss_index"], datastore=ds, template=template, factory=factory,
        ncentroids=ncentroids, code_size=code_size, pq_nbits=pq_nbits, metric=c["metric"],
        n_train=n_train, seed=c["seed"], probe=c["probe"], starting_point=c["starting_point"],
        chunk=c["num_keys_to_add_at_a_time"], checkpoint_interval_s=c["checkpoint_interval_s"],
        gpu=c["gpu"], threads=c["threads"] or os.cpu_count() or 1, overwrite=c["overwrite"],
        ondisk=isinstance(ds, shards.ShardedDatastore) or c["ondisk_merge"],
        shard_workers=c["shard_workers"],
    )
    if plan.starting_point:
        logger.warning("starting_point=%s: the index will hold only rows %s..%s, and load_index will "
                       "refuse it for the whole datastore", f"{plan.starting_point:,}",
                       f"{plan.starting_point:,}", f"{size - 1:,}")
    return plan


# --------------------------------------------------------------------------- FAISS helpers

_GPU_RESOURCES = None


def set_threads(n):
    import faiss

    faiss.omp_set_num_threads(int(n))


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


def _is_gpu(index):
    import faiss

    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index


def maybe_to_gpu(index, want, what):
    """(index on GPU 0, True) if asked and possible; else (index, False) with a message why not."""
    global _GPU_RESOURCES
    import faiss

    if not want:
        return index, False
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        logger.warning("gpu=true, but this faiss %s has no GPU support or sees no GPU: %s on the CPU",
                       faiss.__version__, what)
        return index, False
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    options = faiss.GpuClonerOptions()
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        ivf = None
    # For IVFPQ, useFloat16 means float16 lookup tables: without them PQ64 x 8 bits needs more
    # shared memory than a GPU block has and the copy fails. The codes stay exact. (For
    # IVFFlat it would store the vectors in float16, so it stays off there.)
    options.useFloat16 = isinstance(ivf, faiss.IndexIVFPQ)
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, 0, index, options), True
    except RuntimeError as e:  # e.g. PQ with fewer than 8 bits, or an unsupported sub-quantizer size
        logger.warning("gpu=true, but FAISS cannot run this index on the GPU (%s): %s on the CPU",
                       str(e).strip().splitlines()[-1], what)
        return index, False


def save_index(index, path):
    """Write `index` (copied off the GPU if there) to path via a temporary name."""
    import faiss

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        faiss.write_index(to_cpu(index), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _add_chunk(index, keys, ids):
    """One add; a seam for tests that simulate a crash part-way through."""
    index.add_with_ids(keys, ids)


def add_rows(index, keys, start, end, *, id_offset=0, chunk, desc="adding keys", bar_start=None,
             on_chunk=None, position=None):
    """Add keys[start:end] as float32 with ids id_offset + row, `chunk` rows at a time."""
    bar_start = start if bar_start is None else bar_start
    with tqdm(total=end - bar_start, initial=start - bar_start, unit="key", unit_scale=True,
              desc=desc, position=position, dynamic_ncols=True) as bar:
        for s in range(start, end, chunk):
            e = min(end, s + chunk)
            x = np.array(keys[s:e], dtype=np.float32)  # a copy: fp16 keys become fp32, memmaps are read
            _add_chunk(index, x, np.arange(s + id_offset, e + id_offset, dtype=np.int64))
            bar.update(e - s)
            if on_chunk is not None:
                on_chunk(e)


def sample_training_keys(plan):
    """min(num_keys_to_train, size) keys at seeded random rows, read in ascending row order, as float32."""
    ds = plan.datastore
    rng = np.random.default_rng(plan.seed)
    rows = np.sort(rng.choice(ds.size, size=plan.n_train, replace=False))
    x = np.empty((plan.n_train, ds.dim), dtype=np.float32)
    with tqdm(total=plan.n_train, unit="key", unit_scale=True, desc="reading training keys", dynamic_ncols=True) as bar:
        for s in range(0, plan.n_train, SAMPLE_CHUNK):
            x[s:s + SAMPLE_CHUNK] = ds.gather_keys(rows[s:s + SAMPLE_CHUNK])
            bar.update(min(SAMPLE_CHUNK, plan.n_train - s))
    return x


# --------------------------------------------------------------------------- build steps

def _write_progress(plan, **fields):
    state = {}
    if os.path.exists(plan.progress_path):
        try:
            state = read_json(plan.progress_path, plan.progress_path)
        except CorruptError:
            state = {}
    state.update(identity=plan.identity(), datastore=plan.datastore.prefix,
                 size=plan.datastore.size, updated=time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields)
    write_json_atomic(plan.progress_path, state)


def _stale_temporaries(index_path):
    """Temporary files (NAME.tmpPID) that a killed build of this index left behind."""
    names = [index_path] + [f"{index_path}{x}" for x in (".trained", ".partial", ".progress.json", ".meta.json")]
    return sorted(p for n in names for p in glob.glob(f"{glob.escape(n)}.tmp[0-9]*"))


def _leftovers(index_path):
    found = [p for p in (f"{index_path}.trained", f"{index_path}.partial", f"{index_path}.progress.json")
             if os.path.exists(p)]
    return found + sorted(glob.glob(f"{glob.escape(index_path)}.shard[0-9]*")) + _stale_temporaries(index_path)


def check_target(plan):
    """Refuse to replace a complete index (or a foreign file) at INDEX unless overwrite=true."""
    path = plan.index_path
    mpath = meta_path(path)
    meta = None
    if os.path.exists(mpath):
        try:
            meta = read_json(mpath, f"index {path}")
        except CorruptError:
            meta = None
    if meta and meta.get("complete") and os.path.exists(path):
        if not plan.overwrite:
            raise KNNLMError(
                f"a complete index already exists at {path} (built {meta.get('built', '?')} from "
                f"{meta.get('datastore', '?')}); pass overwrite=true (--overwrite) to replace it, "
                f"or choose another faiss_index"
            )
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
    state = None
    if os.path.exists(plan.progress_path):
        try:
            state = read_json(plan.progress_path, plan.progress_path)
        except CorruptError:
            state = None
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


def train_or_reuse(plan, state):
    """Train a new index on the sample and save it to INDEX.trained, or reuse an earlier run's."""
    if state is not None and state.get("train_seconds") is not None:
        logger.info("reusing the trained index %s from an earlier run of this build", plan.trained_path)
        return state["train_seconds"]
    t0 = time.perf_counter()
    x = sample_training_keys(plan)
    index = new_index(plan)
    index, on_gpu = maybe_to_gpu(index, plan.gpu, "training")
    logger.info("training %s on %s keys of dimension %d%s", plan.factory, f"{len(x):,}", x.shape[1],
                " on the GPU" if on_gpu else f" with {plan.threads} threads")
    try:
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
        from .errors import DiskSpaceError

        raise DiskSpaceError(
            f"index {plan.index_path} needs about {need / 2**30:.2f} GiB while building (the "
            f"index and its last checkpoint) but only {have / 2**30:.2f} GiB are free there"
        )


def retire_old_index(index_path):
    """Mark a complete index about to be replaced as incomplete, so no reader trusts a half-replaced one."""
    mpath = meta_path(index_path)
    if not os.path.exists(mpath):
        return
    try:
        meta = read_json(mpath, f"index {index_path}")
    except CorruptError:
        meta = {}
    if meta.get("complete"):
        meta.update(complete=False, being_replaced=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        write_json_atomic(mpath, meta)


def finalize(plan, index, *, train_seconds, add_seconds, rows_added, extra_meta, leftovers=(),
             resumed_from=None, t_start=None):
    """Write INDEX then INDEX.meta.json (complete), remove leftovers, print and return the summary."""
    retire_old_index(plan.index_path)
    save_index(index, plan.index_path)
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
        **extra_meta,
    }
    write_json_atomic(meta_path(plan.index_path), meta)
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


def _build_single(plan, state, t_start):
    import faiss

    train_seconds = train_or_reuse(plan, state)
    size, start = plan.datastore.size, plan.starting_point
    resumed_from = None
    if state is not None and os.path.exists(plan.partial_path):
        index = faiss.read_index(plan.partial_path)
        next_row = start + index.ntotal
        if index.d != plan.datastore.dim or next_row > size:
            raise CorruptError(f"{plan.partial_path} does not fit datastore {plan.datastore.prefix}; remove it and build again")
        resumed_from = next_row
        logger.info("resuming the interrupted build of %s at row %s of %s (from %s)",
                    plan.index_path, f"{next_row:,}", f"{size:,}", plan.partial_path)
    else:
        index, next_row = faiss.read_index(plan.trained_path), start
    index, on_gpu = maybe_to_gpu(index, plan.gpu, "adding")

    last_save = time.monotonic()

    def checkpoint(row):
        nonlocal last_save
        if row >= size or time.monotonic() - last_save < plan.checkpoint_interval_s:
            return  # the last chunk is saved by finalize
        save_index(index, plan.partial_path)
        _write_progress(plan, rows_added=row)
        last_save = time.monotonic()

    t0 = time.perf_counter()
    add_rows(index, plan.datastore.keys, next_row, size, chunk=plan.chunk, bar_start=start, on_chunk=checkpoint)
    add_seconds = time.perf_counter() - t0
    return finalize(plan, index, train_seconds=train_seconds, add_seconds=add_seconds,
                    rows_added=size - next_row, extra_meta={"gpu": on_gpu}, resumed_from=resumed_from,
                    t_start=t_start)


def build_index(cfg):
    """Build the index described by `cfg` (a DictConfig from load_config, or a dict of settings).

    Returns a summary dict: index path, the metadata written, train/add seconds, keys/s, sizes.
    """
    t_start = time.perf_counter()
    plan = make_plan(cfg)
    set_threads(plan.threads)
    check_target(plan)
    os.makedirs(os.path.dirname(os.path.abspath(plan.index_path)), exist_ok=True)
    state = load_state(plan)
    logger.info("building %s: %s over %s (%s keys x %d), %s",
                plan.index_path, plan.factory, plan.datastore.prefix, f"{plan.datastore.size:,}",
                plan.datastore.dim, "resuming an interrupted build" if state else "from scratch")
    if plan.ondisk:
        return shards.build_sharded(plan, state, t_start=t_start)
    return _build_single(plan, state, t_start)


# --------------------------------------------------------------------------- command line

USAGE = f"""usage: {PROG} [key=value ...] [--option value ...]

Builds a FAISS index over a kNN-LM datastore. Settings (defaults in {CONFIG_DIR / (CONFIG_NAME + '.yaml')}):
  {', '.join(FIELDS)}
Each can be given as key=value (hydra syntax; quote values with commas: "factory='IVF4096,PQ64'")
or as --key value / --key=value (dashes or underscores). --gpu, --overwrite, --dstore_fp16 and
--ondisk_merge are flags; --shards takes comma-separated prefixes or a manifest .json.
"""


def _quote(v):
    # Hydra's quoted-string syntax, so paths and factory strings with commas pass through unchanged.
    return "'" + str(v).replace("\\", "\\\\").replace("'", "\\'") + "'"


def argv_to_overrides(argv):
    """Translate `--flag value` options (build_dstore.py style) into hydra overrides; keep key=value."""
    overrides, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if "=" not in arg or arg.startswith("-"):
                raise ConfigError(f"unexpected argument {arg!r}: give settings as key=value or --key value")
            overrides.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name not in FIELDS:
            raise ConfigError(f"unknown option --{arg[2:].partition('=')[0]} (known: "
                              f"{', '.join('--' + f for f in FIELDS)})")
        typ = FIELDS[name]
        if typ is bool:
            if eq:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ConfigError(f"--{name} is a flag; got --{name}={value}")
                value = value.lower() in ("true", "1", "yes")
            else:
                value = True
            overrides.append(f"{name}={'true' if value else 'false'}")
            continue
        if not eq:
            if i >= len(argv):
                raise ConfigError(f"option --{name} needs a value")
            value = argv[i]
            i += 1
        if typ is int or typ is float:
            try:
                typ(value)
            except ValueError:
                raise ConfigError(f"--{name} expects {'an integer' if typ is int else 'a number'}, got {value!r}") from None
            overrides.append(f"{name}={value}")
        elif typ is list:
            if value.endswith(".json"):
                overrides.append(f"{name}={_quote(value)}")
            else:
                overrides.append(f"{name}=[{','.join(_quote(p) for p in value.split(',') if p)}]")
        else:
            overrides.append(f"{name}={_quote(value)}")
    return overrides


def setup_logging():
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it picked: noise


def main(argv=None):
    """Console entry point; returns the exit status (0, or 2 for a problem with the input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    setup_logging()
    try:
        build_index(load_config(argv_to_overrides(argv)))
    except KNNLMError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; run the same command again to resume from the last saved chunk",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
