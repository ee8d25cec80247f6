"""Where sharded work runs: in this process ("local") or on a Ray cluster ("ray").

Ray is imported only here and only when asked for, so nothing starts a Ray process unless a
command says `executor=ray` / `--knn-executor ray` or the environment names a cluster
(RAY_ADDRESS). With RAY_ADDRESS set, `connect()` joins that cluster (`ray start --head` on one
node, `ray start --address HEAD:6379` on the others); without it, a local Ray instance is
started for the run and stops with it.

Work goes to the data: a node that holds datastore shard k is started with the custom
resource `shard_k` (`ray start --resources '{"shard_0": 1}'`); tasks and actors for shard k ask
for a sliver of it, so Ray places them there. A cluster without such resources (a local
instance) places them anywhere.
"""

import logging
import os

from .errors import ConfigError, KNNLMError

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
# The custom resource a node holding shard k advertises.
SHARD_RESOURCE = "shard_{k}"
# What one task or actor asks of it: a sliver, so a shard's sample, add and search can share it.
SHARD_RESOURCE_SHARE = 0.01


class ShardUnavailableError(KNNLMError):
    """A shard's worker (a Ray actor or task) died, or the node holding it left the cluster."""


def resolve_executor(executor, default="local"):
    """"local" or "ray": as given; None means "ray" when RAY_ADDRESS names a cluster, else `default`."""
    if executor in (None, ""):
        return "ray" if os.environ.get("RAY_ADDRESS") else default
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    return executor


def import_ray():
    try:
        import ray
    except ImportError:
        raise ConfigError("executor ray needs Ray: pip install 'knnlm[ray]' (or `pip install ray`)") from None
    return ray


def connect():
    """The `ray` module, connected: to RAY_ADDRESS's cluster, to one this process already joined,
    or to a local instance started now."""
    ray = import_ray()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        logger.info("Ray: %s", f"joining the cluster at {address}" if address else "starting a local instance")
        # A local instance's workers inherit this environment (PYTHONPATH included), so they
        # import this very package; a cluster's nodes need it installed.
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    return ray


def shard_options(k, resources=None):
    """Ray .options() placing the work of shard k on the node that advertises `shard_k`
    (`resources`: the cluster's, default ray.cluster_resources()); {} where no node does."""
    name = SHARD_RESOURCE.format(k=k)
    if resources is None:
        resources = import_ray().cluster_resources()
    return {"resources": {name: SHARD_RESOURCE_SHARE}} if name in resources else {}


def where():
    """(node id, node address) of the Ray worker calling it."""
    ray = import_ray()
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), ray.util.get_node_ip_address()


def died(error, what, node=None):
    """A ShardUnavailableError for `what` (e.g. "shard 1 (dstore/shard1)") from Ray's error."""
    kind = "its node left the cluster" if "node has died" in str(error) else "its worker died"
    at = f" on node {node}" if node else ""
    return ShardUnavailableError(
        f"{what}{at} is unavailable ({kind}: {type(error).__name__}); no result is computed from the "
        f"other shards. Restart the node (ray start ...) and run the command again")


def is_actor_error(error):
    """Whether `error` is Ray's word that an actor, a task's worker or a node is gone."""
    ray = import_ray()
    exc = ray.exceptions
    lost = tuple(getattr(exc, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                           "WorkerCrashedError", "NodeDiedError", "OwnerDiedError",
                                           "ObjectLostError") if hasattr(exc, n))
    return isinstance(error, lost)
