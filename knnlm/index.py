"""Opening a FAISS index safely: only a complete one, built from the datastore at hand.

An index at path I has its metadata at I.meta.json (written last by the builder).
"""

import os

from .datastore import read_json
from .errors import CorruptError, IncompleteError, MismatchError


def meta_path(index_path):
    return f"{index_path}.meta.json"


def read_index_meta(index_path):
    if not os.path.exists(index_path):
        partial = os.path.exists(f"{index_path}.partial") or os.path.exists(f"{index_path}.trained")
        if partial:
            raise IncompleteError(
                f"index {index_path} is not finished: a build left {index_path}.partial/.trained; "
                f"run knnlm-build-index again to resume it"
            )
        raise CorruptError(f"index {index_path} is missing; build it with knnlm-build-index")
    meta = read_json(meta_path(index_path), f"index {index_path}")
    if not meta.get("complete"):
        raise IncompleteError(f"index {index_path} is marked incomplete; run knnlm-build-index again")
    return meta


def load_index(index_path, datastore=None, mmap=False):
    """Read a complete index and check it against `datastore` (dimension, size, identity)."""
    import faiss

    meta = read_index_meta(index_path)
    if datastore is not None and not datastore.meta.get("legacy"):
        want = meta.get("datastore_fingerprint")
        if want is not None and want != datastore.fingerprint:
            raise MismatchError(
                f"index {index_path} was built from datastore {meta.get('datastore')} "
                f"({want}), not from {datastore.prefix} ({datastore.fingerprint}); rebuild the "
                f"index or point --dstore-filename at the datastore it was built from"
            )
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if meta.get("ondisk") else 0
    if mmap:
        flags |= faiss.IO_FLAG_MMAP
    try:
        index = faiss.read_index(index_path, flags)
    except RuntimeError as e:
        raise CorruptError(f"index {index_path} is unreadable ({str(e).splitlines()[0]})") from None
    if datastore is not None:
        if index.d != datastore.dim:
            raise MismatchError(
                f"index {index_path} has dimension {index.d} but datastore {datastore.prefix} "
                f"has keys of dimension {datastore.dim}"
            )
        if index.ntotal != datastore.size:
            raise MismatchError(
                f"index {index_path} holds {index.ntotal:,} vectors but datastore "
                f"{datastore.prefix} has {datastore.size:,} entries"
            )
    return index
