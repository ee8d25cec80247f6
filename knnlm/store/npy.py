"""A `.npy` file that grows row by row through a memory map.

The row count of a datastore is rarely known up front, so the file is created with a
fixed-size header, grown geometrically (from 1 MiB, doubling, at most 64 MiB a step, never
past the free space: only rows that really do not fit are refused) while rows are written
through `numpy.memmap`,
and on `close()` truncated to the rows written and given its final header. Until then
the header says zero rows, so a killed writer never leaves a file that reads as whole.
"""

import os

import numpy as np

from ..errors import DiskSpaceError

HEADER_BYTES = 128  # fixed so the final header can be written in place
_GROW_BYTES = 64 << 20  # the largest step by which a file grows
_FIRST_GROW_BYTES = 1 << 20  # the first step; each next one doubles the capacity, up to _GROW_BYTES


def _header(dtype, shape):
    """A version 1.0 .npy header padded to exactly HEADER_BYTES."""
    text = "{'descr': %r, 'fortran_order': False, 'shape': %r, }" % (
        np.lib.format.dtype_to_descr(np.dtype(dtype)),
        tuple(shape),
    )
    room = HEADER_BYTES - 10 - 1  # magic(6) + version(2) + length(2), newline
    if len(text) > room:
        raise ValueError(f"shape {shape} does not fit a {HEADER_BYTES}-byte npy header")
    text = text.ljust(room) + "\n"
    return b"\x93NUMPY\x01\x00" + (HEADER_BYTES - 10).to_bytes(2, "little") + text.encode("latin1")


def free_bytes(path):
    st = os.statvfs(os.path.dirname(os.path.abspath(path)) or ".")
    return st.f_bavail * st.f_frsize


class GrowingNpy:
    """Append rows of a fixed trailing shape to PATH; `close()` makes it a valid .npy."""

    def __init__(self, path, dtype, row_shape=(), expected_rows=None):
        self.path = path
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.rows = 0
        need = HEADER_BYTES + (expected_rows or 0) * self.row_bytes
        if expected_rows and need > free_bytes(path):
            raise DiskSpaceError(
                f"{path}: {expected_rows:,} rows need {need / 2**30:.2f} GiB but only "
                f"{free_bytes(path) / 2**30:.2f} GiB are free there; free some space or "
                f"write it elsewhere"
            )
        self._file = open(path, "w+b")
        self._file.write(_header(self.dtype, (0,) + self.row_shape))
        self._capacity = 0
        self._reserve(max(need - HEADER_BYTES, 0) // max(self.row_bytes, 1))

    def _reserve(self, rows):
        if rows <= self._capacity:
            return
        rb = max(self.row_bytes, 1)
        # Geometric growth: few fallocate calls for a big file, little waste for a small one.
        step = min(max(self._capacity * rb, _FIRST_GROW_BYTES), _GROW_BYTES) // rb
        want = max(rows, self._capacity + max(step, 1))
        spare = free_bytes(self.path) - (want - self._capacity) * self.row_bytes
        if want > rows and spare < 0:
            want = rows  # the spare room does not fit: ask for exactly what the rows need
        try:
            os.posix_fallocate(self._file.fileno(), 0, HEADER_BYTES + want * self.row_bytes)
        except OSError as e:
            raise DiskSpaceError(
                f"{self.path}: cannot grow to {rows:,} rows ({e.strerror}); "
                f"{free_bytes(self.path) / 2**30:.2f} GiB free (or a file-size limit); nothing complete was "
                f"replaced. Free space or write elsewhere, then run the command again."
            ) from e
        self._capacity = want

    def append(self, array):
        array = np.asarray(array, dtype=self.dtype)
        if array.shape[1:] != self.row_shape:
            raise ValueError(f"{self.path}: rows of shape {array.shape[1:]}, expected {self.row_shape}")
        n = len(array)
        if n == 0:
            return
        self._reserve(self.rows + n)
        view = np.memmap(
            self._file, dtype=self.dtype, mode="r+",
            offset=HEADER_BYTES + self.rows * self.row_bytes, shape=(n,) + self.row_shape,
        )
        view[:] = array
        # No msync per append: the pages are the kernel's once written, so a killed writer
        # loses nothing; close() fsyncs once (a synchronous flush per batch cost the dump time).
        del view
        self.rows += n

    def close(self):
        """Trim spare capacity and write the real shape: only now is the file complete."""
        self._file.truncate(HEADER_BYTES + self.rows * self.row_bytes)
        self._file.seek(0)
        self._file.write(_header(self.dtype, (self.rows,) + self.row_shape))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abandon(self):
        self._file.close()
