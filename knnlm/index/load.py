"""Opening a FAISS index safely: only a complete one, built from the datastore at hand.

An index at path I has its metadata at I.meta.json (written last by the builder): `complete`,
the datastore's fingerprint, the `metric`, and (since this version) a `checksum` of the index
file, verified before FAISS reads it. Indexes written before checksums existed still load.
"""

import logging
import os

from ..artefacts import check_schema, read_json, verify_checksum
from ..errors import CorruptError, IncompleteError, MismatchError

# What an index's metadata must hold: field -> (types, required).
META_SCHEMA = {
    "complete": (bool, True), "datastore_fingerprint": ((str, type(None)), False),
    "datastore": ((str, type(None)), False), "metric": (str, False), "ntotal": (int, False),
    "dim": (int, False), "ondisk": (bool, False), "ivfdata": (str, False), "checksum": (dict, False),
    "ivfdata_checksum": (dict, False), "factory": (str, False), "format_version": (int, False),
}
METRICS = ("l2", "ip")
# The similarity functions each index metric serves. An inner-product index returns the largest
# q.k and those as "distances": an L2 scorer (l2, do_not_recomp_l2) would take the wrong
# neighbors, and do_not_recomp_l2 would rank similarities as distances. An L2 index with dot is
# the original kNN-LM code's `dot` (candidates by L2, scored by inner product; pinned by
# tests/test_knnlm_eval.py::...[dot]), so it stays allowed.
SIM_FUNCS_OF_METRIC = {"l2": ("l2", "do_not_recomp_l2", "dot"), "ip": ("dot",)}
FLAG_NO_FINGERPRINT = "--knn-allow-index-without-fingerprint"

logger = logging.getLogger(__name__)


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
    what = f"index {index_path}"
    meta = check_schema(read_json(meta_path(index_path), what), META_SCHEMA, what, meta_path(index_path))
    if not meta["complete"]:
        raise IncompleteError(f"index {index_path} is marked incomplete; run knnlm-build-index again")
    if "metric" in meta and meta["metric"] not in METRICS:
        raise CorruptError(f"{what}: metadata metric {meta['metric']!r} is not one of {', '.join(METRICS)}; it is damaged")
    return meta


def verify_index_files(index_path, meta):
    """Check the index file (and its .ivfdata) against the checksums recorded at build time, if any."""
    what = f"index {index_path}"
    if "checksum" in meta:
        verify_checksum(index_path, meta["checksum"], what)
    if meta.get("ondisk") and "ivfdata_checksum" in meta and "ivfdata" in meta:
        ivf = os.path.join(os.path.dirname(os.path.abspath(index_path)), meta["ivfdata"])
        if not os.path.exists(ivf):
            raise CorruptError(f"{what}: its inverted lists {ivf} are missing; build it again")
        verify_checksum(ivf, meta["ivfdata_checksum"], what)


def index_metric(index):
    """'l2' or 'ip': FAISS's own metric_type of a (CPU or GPU) index."""
    import faiss

    mt = getattr(index, "metric_type", faiss.METRIC_L2)
    return {faiss.METRIC_L2: "l2", faiss.METRIC_INNER_PRODUCT: "ip"}.get(mt, f"metric {mt}")


def check_metric(index, sim_func, index_path=None, meta=None):
    """Refuse a similarity function the index's metric does not serve (an `ip` index with l2)."""
    name = f"index {index_path}" if index_path else "the index"
    metric = index_metric(index)
    if meta is not None and meta.get("metric") is not None and meta["metric"] != metric:
        raise CorruptError(f"{name}: its metadata says metric {meta['metric']} but the FAISS index "
                           f"file has {metric}; the index or its metadata was replaced. Build it again")
    if sim_func is None:
        return
    served = SIM_FUNCS_OF_METRIC.get(metric, ())
    if sim_func not in served:
        needs = [m for m, funcs in SIM_FUNCS_OF_METRIC.items() if sim_func in funcs]
        raise MismatchError(
            f"{name} was built with metric {metric} but --knn-sim-func {sim_func} needs an "
            f"{' or '.join(needs) or '?'} index: its neighbors would be the wrong ones. Build the "
            f"index with metric={needs[0] if needs else 'l2'}, or pass --knn-sim-func "
            f"{' or '.join(served) or '?'}")
    if metric == "l2" and sim_func == "dot":
        logger.warning("%s is an L2 index: with --knn-sim-func dot its neighbors are the L2-nearest, scored by "
                       "inner product (the original kNN-LM code's `dot`); for inner-product neighbors build the "
                       "index with metric=ip", name)


def load_index(index_path, datastore=None, mmap=False, *, allow_without_fingerprint=False, sim_func=None):
    """Read a complete index and check it against `datastore` (dimension, size, identity).

    An index whose metadata lacks the datastore's fingerprint is refused (it cannot be shown
    to be of this datastore) unless allow_without_fingerprint; a raw (original-format)
    datastore has no fingerprint, so its indexes are not asked for one. With `sim_func`, the
    index's metric must serve it.
    """
    import faiss

    meta = read_index_meta(index_path)
    if datastore is not None and not datastore.meta.get("legacy"):
        want = meta.get("datastore_fingerprint")
        if want is None and not allow_without_fingerprint:
            raise MismatchError(
                f"index {index_path} does not record the datastore it was built from (its metadata "
                f"{meta_path(index_path)} has no datastore_fingerprint), so it cannot be shown to "
                f"belong to {datastore.prefix}; rebuild it with knnlm-build-index, or pass "
                f"{FLAG_NO_FINGERPRINT} if you know it does")
        if want is not None and want != datastore.fingerprint:
            raise MismatchError(
                f"index {index_path} was built from datastore {meta.get('datastore')} "
                f"({want}), not from {datastore.prefix} ({datastore.fingerprint}); rebuild the "
                f"index or point --dstore-filename at the datastore it was built from"
            )
    verify_index_files(index_path, meta)
    flags = faiss.IO_FLAG_ONDISK_SAME_DIR if meta.get("ondisk") else 0
    if mmap:
        flags |= faiss.IO_FLAG_MMAP
    try:
        index = faiss.read_index(index_path, flags)
    except (RuntimeError, IndexError, ValueError, OverflowError, MemoryError, TypeError) as e:
        raise CorruptError(f"index {index_path} is unreadable ({(str(e).splitlines() or [type(e).__name__])[0]}); "
                           f"build it again") from None
    if "ntotal" in meta and index.ntotal != meta["ntotal"]:
        raise CorruptError(f"index {index_path} holds {index.ntotal:,} vectors but its metadata says "
                           f"{meta['ntotal']:,}; the file was replaced or damaged. Build it again")
    if sim_func is not None or "metric" in meta:
        check_metric(index, sim_func, index_path, meta)
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
