"""knnlm-build-index's settings and plan: the config validated, the datastore opened, the
parameters settled (shrunk for small data) before anything is built."""

import logging
import math
import os
import re
from dataclasses import dataclass

from .. import config as configs
from ..errors import ConfigError, MismatchError
from ..store import sharded
from ..store.sharded import ShardedDatastore

logger = logging.getLogger(__name__)

CONFIG_NAME = "build_index"
# FAISS's k-means warns below 39 training points per centroid (and fails below 1).
MIN_POINTS_PER_CENTROID = 39

# Every config field and its type, for validating overrides and translating --options.
FIELDS = {
    "dstore_mmap": str, "faiss_index": str, "factory": str, "ncentroids": int, "code_size": int,
    "probe": int, "metric": str, "seed": int, "sampler": str, "num_keys_to_train": int,
    "num_keys_to_add_at_a_time": int, "starting_point": int, "checkpoint_interval_s": float,
    "gpu": bool, "threads": int, "overwrite": bool, "dstore_size": int, "dimension": int,
    "dstore_fp16": bool, "shards": list, "shard_workers": int, "ondisk_merge": bool,
    "executor": str, "merge": str,
}
OPTIONAL = {"threads", "dstore_size", "dimension", "dstore_fp16", "shards", "executor"}
# How the shards' indexes end: merged on disk into one index, or kept one per shard (an index
# manifest, knnlm.index.shard_manifest) for indexes no machine can hold.
MERGES = ("ondisk", "none")
METRICS = ("l2", "ip")
# How the training keys are drawn (knnlm.index.steps.sample_training_keys): "default": numpy's
# default_rng(seed), rows read in ascending order; "legacy": the original build_dstore.py's
# np.random.seed(seed); np.random.choice(size, n, replace=False), in the order drawn.
SAMPLERS = ("default", "legacy")


# --------------------------------------------------------------------------- configuration

def load_config(overrides=()):
    """The defaults of configs/build_index.yaml with `key=value` overrides, through hydra's compose."""
    return configs.compose(CONFIG_NAME, overrides, known=FIELDS)


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
    if c.get("sampler", "default") not in SAMPLERS:
        raise ConfigError(f"sampler must be one of {', '.join(SAMPLERS)}, got {c['sampler']!r}")
    if c.get("merge", "ondisk") not in MERGES:
        raise ConfigError(f"merge must be one of {', '.join(MERGES)}, got {c['merge']!r}")
    if c.get("executor") not in (None, "local", "ray"):
        raise ConfigError(f"executor must be local or ray, got {c['executor']!r}")
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
    datastore: object  # Datastore or ShardedDatastore
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
    sampler: str = "default"
    executor: str = "local"  # where shards are sampled and added: local processes or Ray tasks
    merge: str = "ondisk"    # "none": one index per shard and an index manifest

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
            # merge=none parts hold shard rows as ids, merged parts global ids: not interchangeable
            "route": ("parts" if self.merge == "none" else "ondisk") if self.ondisk else "single",
            **({"sampler": self.sampler} if self.sampler != "default" else {}),
        }


def _open_datastore(c):
    """Open the datastore (or shards) named by the config and check the optional size/dim/fp16."""
    prefix = c["dstore_mmap"]
    if isinstance(c["shards"], list):
        if os.path.exists(f"{prefix}_keys.npy"):
            raise ConfigError(
                f"dstore_mmap {prefix} is itself a datastore; with shards, dstore_mmap names the "
                f"combined datastore (its manifest goes to {sharded.manifest_path(prefix)}): pick another prefix"
            )
        ds = sharded.write_manifest(sharded.manifest_path(prefix), c["shards"], overwrite=c["overwrite"])
        logger.info("wrote shard manifest %s (%d shards, %s keys)", ds.prefix, len(ds.shards), f"{ds.size:,}")
    elif isinstance(c["shards"], str):
        ds = sharded.open_manifest(c["shards"])
    elif os.path.exists(f"{prefix}_meta.json") or not os.path.exists(f"{prefix}_keys.npy"):
        ds = sharded.open_datastore(prefix)  # has metadata: the checks below name the option at fault
    else:  # the original code's raw memmaps open only with their size, dimension and fp16
        ds = sharded.open_datastore(prefix, dstore_size=c["dstore_size"], dim=c["dimension"],
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


def _executor(name):
    from ..cluster import resolve_executor

    return resolve_executor(name)


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
        ondisk=isinstance(ds, ShardedDatastore) or c["ondisk_merge"] or c.get("merge") == "none"
        or c.get("executor") == "ray",
        shard_workers=c["shard_workers"], sampler=c.get("sampler") or "default",
        executor=_executor(c.get("executor")), merge=c.get("merge") or "ondisk",
    )
    if plan.starting_point:
        logger.warning("starting_point=%s: the index will hold only rows %s..%s, and load_index will "
                       "refuse it for the whole datastore", f"{plan.starting_point:,}",
                       f"{plan.starting_point:,}", f"{size - 1:,}")
    return plan
