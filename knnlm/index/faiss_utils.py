"""FAISS helpers every part shares: threads, the GPU clone, writing an index safely."""

import logging
import os

logger = logging.getLogger(__name__)

# FAISS's GPU search returns at most this many neighbors per query.
FAISS_GPU_MAX_K = 2048



_GPU_RESOURCES = None


def set_threads(n):
    import faiss

    faiss.omp_set_num_threads(int(n))


def _is_gpu(index):
    import faiss

    return hasattr(faiss, "GpuIndex") and isinstance(index, faiss.GpuIndex)


def to_cpu(index):
    import faiss

    return faiss.index_gpu_to_cpu(index) if _is_gpu(index) else index


def maybe_to_gpu(index, want, what, device=0, all_gpus=False):
    """(index on GPU `device`, True) if asked and possible; else (index, False) with a message why not.

    The one GPU clone of the library: the index builder trains and adds with it, the FAISS
    retriever searches with it. all_gpus (the retriever's search): when FAISS sees more than
    one GPU, the index is sharded across all of them instead (`index_cpu_to_all_gpus`,
    shard=True: each GPU holds 1/n of the inverted lists or vectors; common_ivf_quantizer:
    the IVF quantizer once, searched once, its lists then probed on every shard; FAISS merges
    the shards' results). Never reached without a GPU build of faiss."""
    global _GPU_RESOURCES
    import faiss

    if not want:
        return index, False
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        logger.warning("gpu=true, but this faiss %s has no GPU support or sees no GPU: %s on the CPU",
                       faiss.__version__, what)
        return index, False
    if _GPU_RESOURCES is None:
        _GPU_RESOURCES = faiss.StandardGpuResources()
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    except RuntimeError:
        ivf = None
    n_gpus = faiss.get_num_gpus()
    if all_gpus and n_gpus > 1:
        return _to_all_gpus(faiss, index, ivf, what, n_gpus)
    options = faiss.GpuClonerOptions()
    # For IVFPQ, useFloat16 means float16 lookup tables: without them PQ64 x 8 bits needs more
    # shared memory than a GPU block has and the copy fails. The codes stay exact. (For
    # IVFFlat it would store the vectors in float16, so it stays off there.)
    options.useFloat16 = isinstance(ivf, faiss.IndexIVFPQ)
    try:
        return faiss.index_cpu_to_gpu(_GPU_RESOURCES, device, index, options), True
    except RuntimeError as e:  # e.g. PQ with fewer than 8 bits, or an unsupported sub-quantizer size
        logger.warning("gpu=true, but FAISS cannot run this index on the GPU (%s): %s on the CPU",
                       str(e).strip().splitlines()[-1], what)
        return index, False


def _to_all_gpus(faiss, index, ivf, what, n_gpus):
    """`index` sharded over every visible GPU, or (index, False) with the reason FAISS gave."""
    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.common_ivf_quantizer = True
    options.useFloat16 = isinstance(ivf, faiss.IndexIVFPQ)  # as for one GPU (see maybe_to_gpu)
    try:
        gpu_index = faiss.index_cpu_to_all_gpus(index, co=options, ngpu=n_gpus)
    except RuntimeError as e:
        logger.warning("gpu=true, but FAISS cannot shard this index over %d GPUs (%s): %s on the CPU",
                       n_gpus, str(e).strip().splitlines()[-1], what)
        return index, False
    logger.info("%s: index sharded over %d GPUs", what, n_gpus)
    return gpu_index, True


def save_index(index, path):
    """Write `index` (copied off the GPU if there) to path via a temporary name."""
    import faiss

    tmp = f"{path}.tmp{os.getpid()}"
    try:
        try:
            faiss.write_index(to_cpu(index), tmp)
        except RuntimeError as e:  # FAISS's word for a failed write (a full disk, a size limit)
            from ..errors import DiskSpaceError

            detail = str(e).strip().splitlines()[-1] if str(e).strip() else "write failed"
            raise DiskSpaceError(f"{path}: FAISS could not write it ({detail}): the disk is full, a file-size "
                                 f"limit was reached or the place is not writable. Free space or write "
                                 f"elsewhere, then run the same command again") from None
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)



def set_nprobe(index, nprobe):
    """Lists visited per query by an IVF index (its GPU clone included); a flat index has none."""
    import faiss

    try:
        faiss.extract_index_ivf(index).nprobe = nprobe
    except RuntimeError:
        pass  # a flat index: nothing to probe
