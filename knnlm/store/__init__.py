"""Datastores on disk: one entry point opens any of them.

    datastore.py  Datastore (read, memory-mapped): the layout P_keys.npy, P_vals.npy, P_meta.json
    writer.py     DatastoreWriter: rows appended, metadata written last
    legacy.py     the original code's raw format (no header, no metadata)
    sharded.py    ShardedDatastore: shards listed in a manifest, read as one
    subset.py     a random fraction of a datastore, as a new datastore
    prune.py      greedy merging into weighted entries (knnlm-prune is knnlm.offline.prune: the index)
    npy.py        GrowingNpy: a .npy file that grows row by row

`open_datastore(path)` takes a prefix, a shard manifest, or a prefix that has only a manifest.
"""

from .datastore import Datastore, paths
from .writer import DatastoreWriter
from .sharded import ShardedDatastore, open_datastore

__all__ = ["Datastore", "DatastoreWriter", "ShardedDatastore", "open_datastore", "paths"]
