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
Sharded datastores (and ondisk_merge=true) go through knnlm.index.sharded_build instead.
"""

import logging
import os
import sys
import time

from ..artefacts import WriteLock
from ..errors import ConfigError, CorruptError
from ..lifecycle import run_main
from . import sharded_build
from .faiss_utils import maybe_to_gpu, save_index, set_threads
from .plan import CONFIG_NAME, FIELDS, load_config, make_plan
from .steps import PROG, _write_progress, add_rows, check_target, finalize, load_state, setup_logging, train_or_reuse

logger = logging.getLogger(__name__)


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
    add_rows(index, plan.datastore.keys, next_row, size, chunk=plan.chunk, bar_start=start, on_chunk=checkpoint,
             where=f"datastore {plan.datastore.prefix}")
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
    # One build per index path: a second one at once is refused by name.
    with WriteLock(plan.index_path, f"index {plan.index_path}"):
        return _build(plan, t_start)


def _build(plan, t_start):
    check_target(plan)
    os.makedirs(os.path.dirname(os.path.abspath(plan.index_path)), exist_ok=True)
    state = load_state(plan)
    logger.info("building %s: %s over %s (%s keys x %d), %s",
                plan.index_path, plan.factory, plan.datastore.prefix, f"{plan.datastore.size:,}",
                plan.datastore.dim, "resuming an interrupted build" if state else "from scratch")
    if plan.ondisk:
        return sharded_build.build_sharded(plan, state, t_start=t_start)
    return _build_single(plan, state, t_start)


# --------------------------------------------------------------------------- command line

USAGE = f"""usage: {PROG} [key=value ...] [--option value ...]

Builds a FAISS index over a kNN-LM datastore. Settings (defaults in configs/{CONFIG_NAME}.yaml):
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


def main(argv=None):
    """Console entry point; returns the exit status (0, or 2 for a problem with the input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    setup_logging()
    return run_main(PROG, lambda: build_index(load_config(argv_to_overrides(argv))) and None,
                    again="Run the same command again to resume from the last saved chunk")


if __name__ == "__main__":
    sys.exit(main())
