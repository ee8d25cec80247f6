"""What the datastore tools that write a new datastore from an old one share (subset, prune,
reduce): opening the source with its identity, and a writer that carries the identity over."""

import os

import numpy as np

from ..errors import ConfigError, KNNLMError
from .datastore import Datastore, DatastoreWriter

# Metadata the writer sets itself; everything else is copied from the source.
WRITER_FIELDS = {"format_version", "uuid", "complete", "size", "dim", "keys_dtype", "vals_dtype",
                 "keytype", "dict_size", "dict_fingerprint", "model_fingerprint", "started",
                 "finished", "versions", "bytes", "checksum", "checksums"}


def open_source(prefix, out_prefix, what):
    """The source datastore of a derived one (`what`: 'a subset', ...), refusing what it cannot come from."""
    if str(prefix).endswith(".json"):
        raise ConfigError(f"{prefix} is a shard manifest: make {what} of each shard instead")
    src = Datastore.open(prefix)
    if src.meta.get("legacy") or src.meta.get("dict_fingerprint") is None:
        raise KNNLMError(
            f"datastore {prefix} has no metadata (the original code's raw format): {what} "
            f"could not say which model and dictionary it belongs to; dump it with this code"
        )
    if os.path.abspath(out_prefix) == os.path.abspath(prefix):
        raise ConfigError(f"OUT_PREFIX {out_prefix} is the source datastore itself; choose another prefix")
    return src


def derived_writer(src, out_prefix, *, dim=None, expected_size=None, overwrite=False, **extra):
    """A DatastoreWriter at out_prefix with the source's key type, dictionary and model identity,
    its other metadata, and `extra` (what the tool records of itself)."""
    m = src.meta
    meta = {key: value for key, value in m.items() if key not in WRITER_FIELDS}
    meta.update(extra)
    return DatastoreWriter(
        out_prefix, src.dim if dim is None else dim, keytype=m["keytype"], fp16=m["keys_dtype"] == "float16",
        dict_size=m["dict_size"], dict_fingerprint=m["dict_fingerprint"],
        model_fingerprint=m.get("model_fingerprint"), expected_size=expected_size, overwrite=overwrite, extra=meta,
    )


def copy_rows(src, writer, blocks, side=None):
    """Write the source's rows for each block of ascending ids (the memory map is read forward,
    only the pages needed) and finish the datastore; `side` = (a GrowingNpy, ids -> its rows)
    is written alongside. On any failure everything is left incomplete. Returns the metadata."""
    try:
        for ids in blocks:
            writer.add(np.asarray(src.keys[ids]), np.asarray(src.vals[ids]))
            if side is not None:
                side[0].append(side[1](ids))
        if side is not None:
            side[0].close()
        return writer.finalize()
    except BaseException:
        if side is not None:
            side[0].abandon()
        writer.abandon()
        raise
