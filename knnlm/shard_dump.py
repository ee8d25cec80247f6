"""knnlm-shard-dump: dump a datastore in N shards, one run of the stock dump command per shard.

    knnlm-shard-dump --num-shards 3 --dstore-mmap dstore/train [--executor local|ray] -- \\
        fairseq-eval-lm data-bin --path lm.pt --user-dir fairseq_plugins --task knnlm \\
            --gen-subset train --save-knnlm-dstore --context-window 1536 ...
    knnlm-shard-dump --num-shards 3 --dstore-mmap dstore/train -- knnlm-hf dump --model gpt2 --text train.txt

Shard i runs the command with `--num-shards N --shard-id i --dstore-mmap PREFIX.shard_i` added:
in a local process (`--workers` at a time) or as a Ray task (executor ray: on the node that
advertises the resource `shard_i` if one does, with one GPU when the cluster has GPUs). A shard
whose datastore is already complete is not dumped again; a failed or killed one is run again
up to --retries times. When every shard is complete, the shard manifest PREFIX_shards.json is
written (once), which every tool reads as one datastore.

The shards' files must be readable where the manifest is written (a shared filesystem, or the
same paths on each node): the manifest records each shard's fingerprint.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys

from . import cluster
from .artefacts import read_json_or_none, write_json_atomic
from .errors import ConfigError, KNNLMError, OutputExistsError

PROG = "knnlm-shard-dump"
logger = logging.getLogger(__name__)
# The options this command adds to the dump command, so it must not carry them itself.
OWN_OPTIONS = ("--num-shards", "--shard-id", "--dstore-mmap")


def shard_prefix(prefix, i):
    return f"{prefix}.shard_{i}"


def shard_command(command, num_shards, i, prefix):
    return [*command, "--num-shards", str(num_shards), "--shard-id", str(i), "--dstore-mmap", shard_prefix(prefix, i)]


def is_complete(prefix):
    """Whether the datastore at `prefix` is a complete dump (its metadata says so and its files open)."""
    from .store.datastore import Datastore

    try:
        Datastore.open(prefix)
        return True
    except KNNLMError:
        return False


def _run(cmd, env=None):
    """Run one shard's dump; (exit status, the tail of its stderr). Also a Ray task's body."""
    exe = shutil.which(cmd[0]) or cmd[0]
    p = subprocess.run([exe, *cmd[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       env=dict(os.environ, **(env or {})))
    sys.stdout.write(p.stdout[-2000:])
    return p.returncode, p.stderr[-3000:]


def _describe_failure(i, rc, tail):
    last = [line for line in tail.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
    how = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
    return f"shard {i} failed ({how}): {last[0]}"


def _check_state(prefix, command, num_shards):
    """Refuse to mix shards of another dump command (or shard count) into this one."""
    path = f"{prefix}_shard_dump.json"
    want = {"command": list(command), "num_shards": num_shards}
    old = read_json_or_none(path)
    if old is not None and (old.get("command"), old.get("num_shards")) != (want["command"], want["num_shards"]):
        raise ConfigError(
            f"{prefix}'s shards were started by another dump ({path}: {old.get('num_shards')} shards of "
            f"{' '.join(old.get('command') or [])}); remove {prefix}.shard_* and {path}, or choose another --dstore-mmap")
    write_json_atomic(path, want)


def dump_shards(command, num_shards, prefix, *, executor="local", workers=1, retries=2, gpus=None, overwrite=False):
    """Run every incomplete shard's dump (retrying failures), then write the manifest; returns
    {"done": [shards dumped now], "skipped": [complete already], "attempts": {i: n}, "manifest": path}."""
    from .store import sharded

    if num_shards < 1:
        raise ConfigError(f"--num-shards must be at least 1, got {num_shards}")
    if not command:
        raise ConfigError("give the dump command after --, e.g. -- knnlm-hf dump --model M --text T")
    clash = [o for o in OWN_OPTIONS if any(a == o or a.startswith(o + "=") for a in command)]
    if clash:
        raise ConfigError(f"the dump command must not carry {', '.join(clash)}: {PROG} adds them for each shard")
    if retries < 0 or workers < 1:
        raise ConfigError("--retries must be >= 0 and --workers >= 1")
    executor = cluster.resolve_executor(executor)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    _check_state(prefix, command, num_shards)
    manifest = sharded.manifest_path(prefix)
    old = read_json_or_none(manifest) if os.path.lexists(manifest) else None
    if os.path.lexists(manifest) and not overwrite and not (isinstance(old, dict)
                                                            and old.get("format") == sharded.MANIFEST_FORMAT):
        # checked before any shard is dumped: the run would end by replacing it
        raise OutputExistsError(f"{manifest} already exists and is not a shard manifest: pass --overwrite to "
                                f"replace it, or choose another --dstore-mmap")
    skipped = [i for i in range(num_shards) if is_complete(shard_prefix(prefix, i))]
    todo = [i for i in range(num_shards) if i not in skipped]
    for i in skipped:
        logger.info("shard %d is complete (%s): not dumped again", i, shard_prefix(prefix, i))
    attempts = {i: 0 for i in todo}
    if todo:
        run = _run_ray if executor == "ray" else _run_local
        run(todo, command, num_shards, prefix, attempts, workers=workers, retries=retries, gpus=gpus)
    prefixes = [shard_prefix(prefix, i) for i in range(num_shards)]
    old = read_json_or_none(manifest)
    ds = sharded.write_manifest(manifest, prefixes, overwrite=overwrite)
    if old is None or old.get("fingerprint") != ds.fingerprint:
        logger.info("wrote shard manifest %s (%d shards, %s entries)", manifest, num_shards, f"{ds.size:,}")
    print(f"{PROG}: {num_shards} shard(s) complete ({len(todo)} dumped now, {len(skipped)} already), "
          f"{ds.size:,} entries: {manifest}")
    return {"done": todo, "skipped": skipped, "attempts": attempts, "manifest": manifest}


def _after(i, rc, tail, prefix, attempts, retries):
    """True when shard i is done; False to run it again; raises when out of tries."""
    if rc == 0 and is_complete(shard_prefix(prefix, i)):
        logger.info("shard %d complete (attempt %d)", i, attempts[i])
        return True
    why = _describe_failure(i, rc, tail) if rc != 0 else f"shard {i} exited 0 but {shard_prefix(prefix, i)} is not complete"
    if attempts[i] > retries:
        raise KNNLMError(f"{why}; gave up after {attempts[i]} attempt(s). Shards already complete are kept: "
                         f"run the same command again to dump the rest")
    logger.warning("%s; running it again (attempt %d of %d)", why, attempts[i] + 1, retries + 1)
    return False


def _run_local(todo, command, num_shards, prefix, attempts, *, workers, retries, gpus=None):
    """Each shard in a local process, `workers` at a time."""
    pending, running = list(todo), []
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            attempts[i] += 1
            cmd = shard_command(command, num_shards, i, prefix)
            exe = shutil.which(cmd[0]) or cmd[0]
            logger.info("shard %d: %s", i, " ".join(cmd))
            running.append((i, subprocess.Popen([exe, *cmd[1:]], stderr=subprocess.PIPE, text=True)))
        i, proc = running.pop(0)
        _, err = proc.communicate()
        if err:
            sys.stderr.write(err[-2000:])
        if not _after(i, proc.returncode, err or "", prefix, attempts, retries):
            pending.append(i)


def _run_ray(todo, command, num_shards, prefix, attempts, *, workers=None, retries, gpus=None):
    """Each shard as a Ray task, on the node advertising `shard_i` when one does."""
    ray = cluster.connect()
    resources = ray.cluster_resources()
    if gpus is None:
        gpus = 1 if resources.get("GPU", 0) >= 1 else 0
    task = ray.remote(_run)

    def submit(i):
        attempts[i] += 1
        cmd = shard_command(command, num_shards, i, prefix)
        logger.info("shard %d (Ray task%s): %s", i, ", 1 GPU" if gpus else "", " ".join(cmd))
        # Ray's own retries are off: a lost worker comes back here and counts as an attempt.
        return task.options(num_cpus=1, num_gpus=gpus, max_retries=0, **cluster.shard_options(i, resources)).remote(cmd)

    running = {submit(i): i for i in todo}
    while running:
        ready, _ = ray.wait(list(running), num_returns=1)
        i = running.pop(ready[0])
        try:
            rc, tail = ray.get(ready[0])
        except Exception as e:  # noqa: BLE001 - Ray's errors: the task's worker or node died
            if not cluster.is_actor_error(e) and not isinstance(e, ray.exceptions.RayError):
                raise
            rc, tail = -9, f"its Ray worker died ({type(e).__name__})"
        if not _after(i, rc, tail, prefix, attempts, retries):
            running[submit(i)] = i


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" in argv:
        cut = argv.index("--")
        own, command = argv[:cut], argv[cut + 1:]
    else:
        own, command = argv, []
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                usage=f"{PROG} --num-shards N --dstore-mmap PREFIX [options] -- DUMP COMMAND ...")
    p.add_argument("--num-shards", type=int, required=True, help="shards to dump (one dump run each)")
    p.add_argument("--dstore-mmap", required=True, help="prefix: shard i goes to PREFIX.shard_i, the manifest to PREFIX_shards.json")
    p.add_argument("--executor", choices=cluster.EXECUTORS, help="local processes or Ray tasks (default: ray if RAY_ADDRESS is set)")
    p.add_argument("--workers", type=int, default=1, help="local executor: shards dumped at once")
    p.add_argument("--retries", type=int, default=2, help="runs again of a failed shard before giving up")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a file at PREFIX_shards.json that is not this dump's manifest")
    args = p.parse_args(own)
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    from .lifecycle import run_main

    return run_main(PROG, lambda: dump_shards(command, args.num_shards, args.dstore_mmap, executor=args.executor,
                                              workers=args.workers, retries=args.retries,
                                              overwrite=args.overwrite) and None)


if __name__ == "__main__":
    sys.exit(main())
