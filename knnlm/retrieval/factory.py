"""The one factory: options (and a datastore) -> the retriever they describe -> a KNNLM.

Every front-end and the Python API call `build`; none builds a retriever by hand.
"""

import dataclasses
import os

from .registry import get_strategy, wrappers


def build_retriever(opts, datastore=None):
    """The retriever the options describe: the strategy over the datastore, wrappers over it."""
    from ..options import open_datastore, validate

    if not opts.knnlm:  # building one is the point: the command-line switch is implied
        opts = dataclasses.replace(opts, knnlm=True)
    validate(opts)
    if datastore is None:
        datastore = open_datastore(opts)
    elif isinstance(datastore, (str, os.PathLike)):
        from ..store import open_datastore as open_store

        datastore = open_store(str(datastore), in_memory=opts.move_dstore_to_mem)
    retriever = get_strategy(opts.knn_search, opts).from_options(opts, datastore)
    for cls in wrappers():
        if cls.enabled(opts):
            retriever = cls.wrap(retriever, opts)
    return retriever


def build(opts, datastore=None):
    """RetrievalOptions (+ an opened datastore, or its prefix) -> KNNLM. The one factory."""
    from ..model import KNNLM

    return KNNLM(build_retriever(opts, datastore), lmbda=opts.lmbda, temperature=opts.knn_temp)
