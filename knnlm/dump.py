"""A dump session: what a front-end opens to write a datastore, feeds rows, and finishes.

    session = DumpSession(prefix, keytype="last_ffn_input", fp16=False, extra={...})
    session.start(identity)        # once the model is known: its key dimension and fingerprints
    session.add(keys, values)      # every scored token, in order
    meta = session.finish()        # only now is the datastore complete

The front-end decides *what* is a row (fairseq: every token eval_lm scores); the session owns
the files: refusing to replace a complete datastore, the metadata written first as incomplete
and last as complete, and leaving a failed dump marked incomplete.
"""

import logging

import numpy as np

from .store.writer import DatastoreWriter

logger = logging.getLogger(__name__)


class DumpSession:
    """Writes one datastore at `prefix`; nothing is created on disk before `start`."""

    def __init__(self, prefix, *, keytype, fp16=False, expected_size=None, overwrite=False, extra=None):
        self.prefix, self.keytype, self.fp16 = prefix, keytype, fp16
        self.expected_size, self.overwrite, self.extra = expected_size, overwrite, dict(extra or {})
        self.writer = None

    @property
    def started(self):
        return self.writer is not None

    @property
    def size(self):
        return 0 if self.writer is None else self.writer.size

    def start(self, identity):
        """Open the files for a model of this `identity` (a provenance.ModelIdentity)."""
        if self.writer is not None:
            raise RuntimeError(f"dump session {self.prefix} is already started")
        self.writer = DatastoreWriter(
            self.prefix, identity.dim, keytype=self.keytype, fp16=self.fp16, dict_size=identity.dict_size,
            dict_fingerprint=identity.dict_fingerprint, model_fingerprint=identity.model_fingerprint,
            expected_size=self.expected_size, overwrite=self.overwrite, extra=self.extra,
        )
        logger.info(f"dumping {self.keytype} keys (dim {identity.dim}) to {self.prefix}_{{keys,vals}}.npy")
        return self

    def add(self, keys, values):
        """Append rows: (n, D) keys and (n,) next tokens (tensors or arrays)."""
        if self.writer is None:
            raise RuntimeError(f"dump session {self.prefix}: start() it with the model's identity first")
        self.writer.add(_numpy(keys), _numpy(values))

    def finish(self):
        """Close the files and mark the datastore complete; returns its metadata (None if never started)."""
        if self.writer is None:
            return None
        meta = self.writer.finalize()
        files = self.writer.files
        logger.info(
            f"datastore complete: {meta['size']:,} entries of dimension {meta['dim']} "
            f"({meta['keys_dtype']} keys, {meta['vals_dtype']} values), {meta['bytes'] / 2**20:.1f} MiB "
            f"in {files['keys']}, {files['vals']}, {files['meta']}"
        )
        return meta

    def abandon(self):
        """Leave the datastore marked incomplete (the run failed)."""
        if self.writer is not None:
            self.writer.abandon()


def _numpy(x):
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)
