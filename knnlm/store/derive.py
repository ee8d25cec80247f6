"""What the datastore tools that write a new datastore from an old one share (subset, prune,
reduce): opening the source with its identity, and a writer that carries the identity over."""

import os

import numpy as np

from ..errors import ConfigError, KNNLMError
from .datastore import Datastore
from .writer import DatastoreWriter, existing_data
from .npy import GrowingNpy


def check_out_prefix(out_prefix, overwrite, side_files=()):
    """Refuse, before any work, what the writer would refuse at the end (data at OUT_PREFIX)."""
    existing_data(out_prefix, overwrite, [f"{out_prefix}_{n}" for n in side_files], place="OUT_PREFIX")

# Metadata the writer sets itself; everything else is copied from the source.
WRITER_FIELDS = {"format_version", "uuid", "complete", "size", "dim", "keys_dtype", "vals_dtype",
                 "keytype", "dict_size", "dict_fingerprint", "model_fingerprint", "started",
                 "finished", "versions", "bytes", "checksum", "checksums", "token_sketch"}


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


def derived_writer(src, out_prefix, *, dim=None, expected_size=None, overwrite=False, side_files=(), **extra):
    """A DatastoreWriter at out_prefix with the source's key type, dictionary and model identity,
    its other metadata, and `extra` (what the tool records of itself); side_files: its own files
    beside the keys (written at writer.side_path(name), moved into place with them)."""
    m = src.meta
    meta = {key: value for key, value in m.items() if key not in WRITER_FIELDS}
    meta.update(extra)
    # Reduced keys (knnlm-reduce) keep their query transform: a pruned or subset copy of a PCA
    # datastore carries the transform file along, beside its own keys.
    carry = bool(m.get("transform")) and "transform" not in extra
    if carry:
        meta["transform"] = dict(m["transform"], file=f"{os.path.basename(out_prefix)}_transform.faiss")
        side_files = tuple(side_files) + ("transform.faiss",)
    writer = DatastoreWriter(
        out_prefix, src.dim if dim is None else dim, keytype=m["keytype"], fp16=m["keys_dtype"] == "float16",
        dict_size=m["dict_size"], dict_fingerprint=m["dict_fingerprint"],
        model_fingerprint=m.get("model_fingerprint"), expected_size=expected_size, overwrite=overwrite, extra=meta,
        side_files=side_files, place="OUT_PREFIX",
    )
    if carry:
        import shutil

        source = os.path.join(os.path.dirname(os.path.abspath(src.prefix)), m["transform"]["file"])
        try:
            shutil.copyfile(source, writer.side_path("transform.faiss"))
        except BaseException:
            writer.abandon()
            raise
    return writer


def copy_rows(src, writer, blocks, side=None):
    """Write the source's rows for each block of ascending ids (the memory map is read forward,
    only the pages needed) and finish the datastore; `side` = (side file name, ids -> its rows,
    (dtype, row shape, rows)) is a GrowingNpy written alongside, at the writer's side_path. On
    any failure everything is left incomplete (a replaced datastore as it was). Returns the metadata."""
    side_file = None
    try:
        if side is not None:
            side_file = GrowingNpy(writer.side_path(side[0]), *side[2])
        for ids in blocks:
            writer.add(np.asarray(src.keys[ids]), np.asarray(src.vals[ids]))
            if side_file is not None:
                side_file.append(side[1](ids))
        if side_file is not None:
            side_file.close()
        return writer.finalize()
    except BaseException:
        if side_file is not None:
            side_file.abandon()
        writer.abandon()
        raise
