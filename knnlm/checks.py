"""The framework-free half of `knnlm-check` and `knnlm-hf check`: one PASS/FAIL line per check.

    report = Report()
    store = check_artefacts(report, prefix, indexfile)   # None if the datastore cannot be opened
    ... a front-end replays its dump on `store` (model, keys, values) ...
    return finish(report)                                # prints the last line; exit code 0 or 1

What needs no model lives here once: the datastore is complete, its values lie in the
dictionary, its keys are finite and filled, the index is complete, built from this datastore
and matches its checksum. The front-ends keep only what needs their framework: loading the
model, comparing its identity and recomputing a few windows' keys.
"""

import sys

import numpy as np

from .errors import KNNLMError
from .index import load_index, read_index_meta
from .store import open_datastore


def byte_order(store):
    """(ok, 'byte order', detail): the keys' and values' byte order (a datastore opens only in native order)."""
    parts = store.shards if hasattr(store, "shards") else [store]
    orders = set()
    for s in parts:
        for a in (s.keys, s.vals):
            if a is not None:
                orders.add("little" if a.dtype.byteorder == "<" or (a.dtype.byteorder in "=|" and sys.byteorder == "little")
                           else "big")
    ok = orders <= {sys.byteorder}
    return ok, "byte order", f"{'/'.join(sorted(orders)) or '?'}-endian keys and values (this machine: {sys.byteorder}-endian)"


def text_fingerprint(store):
    """(True, 'text fingerprint', detail): the dumped text's fingerprint (knnlm.memorisation), or
    that none is recorded (a datastore dumped before: memorisation by content cannot be checked)."""
    from .memorisation import datastore_sketch

    sketch = datastore_sketch(store)
    if sketch is None:
        return True, "text fingerprint", ("none recorded (dumped before this version): scoring the text it was "
                                          "dumped from cannot be caught by content")
    digest = format(int(sketch["hashes"][0]), "016x") if len(sketch["hashes"]) else "empty"
    return True, "text fingerprint", (f"bottom-{sketch['k']} MinHash of its {sketch['ngram']}-token n-grams, "
                                      f"{len(sketch['hashes']):,} hashes (smallest {digest})")


class Report:
    """Prints one line per check and counts the failures."""

    def __init__(self, out=None):
        self.out, self.failed = out, 0

    def line(self, ok, what, detail):
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {what:<22} {detail}", file=self.out or sys.stdout, flush=True)


def check_artefacts(report, prefix, indexfile=None, *, allow_index_without_fingerprint=False, **open_kwargs):
    """Check the datastore at `prefix` (and the index, if given) without a model. Returns the
    opened datastore for the model checks, or None when it cannot be opened (already reported)."""
    try:
        store = open_datastore(prefix, **open_kwargs)
    except KNNLMError as e:
        report.line(False, "datastore", str(e))
        return None
    m = store.meta
    report.line(True, "datastore", f"{store.prefix}: complete, {store.size:,} entries, dim {store.dim}, {m.get('keytype')} keys")
    report.line(*byte_order(store))
    report.line(*text_fingerprint(store))
    try:
        store.check_values(m.get("dict_size") or np.iinfo(np.int64).max)
        report.line(True, "values in dictionary", f"all {store.size:,} values < {m.get('dict_size')}")
    except KNNLMError as e:
        report.line(False, "values in dictionary", str(e))
    try:
        zero = store.check_keys_finite()
        report.line(zero == 0, "keys finite", f"all {store.size:,} keys finite and non-zero" if zero == 0 else
                    f"{zero:,} keys are all zero: rows a writer never filled (an interrupted or concurrent dump); dump it again")
    except KNNLMError as e:
        report.line(False, "keys finite", str(e))
    if indexfile:
        try:
            index = load_index(indexfile, datastore=store, allow_without_fingerprint=allow_index_without_fingerprint)
            meta = read_index_meta(indexfile)
            verified = ", content checksum verified" if "checksum" in meta else ", no checksum recorded (built before checksums)"
            built = "built from this datastore" if meta.get("datastore_fingerprint") or m.get("legacy") \
                else "its metadata does not say which datastore it was built from"
            report.line(True, "index", f"{indexfile}: complete, {index.ntotal:,} vectors, dim {index.d}, {built}{verified}")
        except KNNLMError as e:
            report.line(False, "index", str(e))
    return store


class Replay:
    """A front-end's replayed rows (its keys and targets recomputed) against the datastore rows
    they were written to; `report` adds the two lines "keys recomputed" and "values = targets"."""

    def __init__(self, store):
        self.store, self.worst, self.rows, self.bad_vals = store, 0.0, 0, 0

    def add(self, rows, keys, targets):
        """rows: datastore row numbers; keys (n, D) and targets (n,) recomputed for them (numpy)."""
        if len(rows) == 0:
            return
        stored = np.asarray(self.store.gather_keys(rows), dtype=np.float32)
        diff = float(np.abs(stored - keys).max()) / max(float(np.abs(keys).max()), 1e-6)
        # NaN-safe: max(0.0, nan) is 0.0, so a NaN key would pass; any NaN/inf is a failure.
        self.worst = max(self.worst, diff) if np.isfinite(diff) else float("inf")
        self.bad_vals += int((np.asarray(self.store.gather_vals(rows)) != targets).sum())
        self.rows += len(rows)

    def report(self, report, source):
        """`source` says what was replayed, e.g. "3 batches"."""
        tol = 2e-3 if self.store.meta.get("keys_dtype") == "float16" else 1e-4
        report.line(bool(self.worst <= tol), "keys recomputed", f"{self.rows:,} rows from {source}, max relative "
                                                                f"difference {self.worst:.2e} (tolerance {tol:g})")
        report.line(self.bad_vals == 0, "values = targets",
                    f"{self.bad_vals} of {self.rows:,} sampled values differ from the replayed targets")


def finish(report, out=None):
    """The report's last line; the exit code (1 if any check failed)."""
    print(f"{report.failed} check(s) failed" if report.failed else "all checks passed", file=out or sys.stdout)
    return 1 if report.failed else 0
