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


def training_iterations(index):
    """How many k-means iterations `index.train` runs (the coarse quantizer's, then each PQ
    sub-quantizer's), as FAISS's verbose output counts them; 0 if it runs none we can see."""
    import faiss

    total = 0
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        total += ivf.cp.niter
        inner = faiss.downcast_index(ivf)
        pq = getattr(inner, "pq", None)
        if pq is not None:
            total += pq.M * pq.cp.niter
    return total


def set_verbose(index, on=True):
    """FAISS's own per-iteration lines for the coarse quantizer and the PQ (the progress bar reads them)."""
    import faiss

    index.verbose = on
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        return
    ivf.verbose = on
    ivf.cp.verbose = on
    inner = faiss.downcast_index(ivf)
    if getattr(inner, "pq", None) is not None:
        inner.pq.verbose = on
        inner.pq.cp.verbose = on


class TrainingProgress:
    """`with TrainingProgress(index, desc):` around `index.train(x)`: a progress bar with an ETA
    fed by FAISS's own k-means iteration lines. FAISS prints them from C++ on file descriptor 1;
    they go to a temporary file (never a pipe: a full pipe would block a training that holds the
    GIL) that a thread reads through a descriptor of its own, counting 'Iteration' lines."""

    def __init__(self, index, desc="training (k-means iterations)"):
        self.index, self.desc = index, desc
        self.total = training_iterations(index)

    def __enter__(self):
        import sys
        import tempfile
        import threading

        from ..cli import progress

        self.bar = None
        if not self.total:  # nothing FAISS counts for us (a flat index trains in no time)
            return self
        self.bar = progress(total=self.total, desc=self.desc, unit="iter")
        set_verbose(self.index, True)
        sys.stdout.flush()
        self.dir = tempfile.mkdtemp(prefix="knnlm-train-")
        path = os.path.join(self.dir, "faiss.log")
        # FAISS appends through fd 1; we read through our own descriptor: no shared file offset.
        writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.reader = open(path, "rb")
        self.saved = os.dup(1)
        os.dup2(writer, 1)
        os.close(writer)
        self.seen, self.tail = 0, b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _follow(self):
        while not self.stop.wait(0.5):
            self._advance()

    def _advance(self):
        import re

        chunk = self.tail + self.reader.read()
        cut = max(chunk.rfind(b"\r"), chunk.rfind(b"\n")) + 1  # whole lines only
        self.seen += len(re.findall(rb"Iteration \d+ \(", chunk[:cut]))
        self.tail = chunk[cut:]
        n = min(self.seen, self.total)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)

    def __exit__(self, *exc):
        import shutil

        if self.total:
            self.stop.set()
            self.thread.join()
            os.dup2(self.saved, 1)
            os.close(self.saved)
            self._advance()
            self.reader.close()
            shutil.rmtree(self.dir, ignore_errors=True)
            set_verbose(self.index, False)
            self.bar.close()
        return False
