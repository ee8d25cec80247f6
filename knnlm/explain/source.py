"""What the explorer reads, checked to belong together: an export with neighbor ids, the
datastore it was scored against, the text those neighbors came from, and a vocabulary.

A datastore entry's value is the token that followed its context, and a dump writes its
entries in text order, so the text before entry i is the values before row i (Khandelwal et
al. 2020, section 6). That holds for a plain datastore and for reduced keys (PCA/OPQ keep the
rows); a pruned datastore keeps only some rows, so its text is its source's (`pruned_from`),
read at the row recorded for each entry (OUT_PREFIX_source_rows.npy); each shard of a sharded
datastore is a text of its own (a context never reaches into the previous shard).
"""

import dataclasses
import os

import numpy as np

from ..errors import ConfigError, KNNLMError, MismatchError
from ..offline.export import load_export
from ..store.datastore import Datastore
from ..store.sharded import open_datastore

IDS_FLAG = "--knnlm-dump-ids"


@dataclasses.dataclass
class Segment:
    """One text: `vals` (its tokens in order) and, for a pruned datastore, the row of `vals`
    each of its entries came from (`rows`; None: entry i is row i)."""

    vals: np.ndarray
    rows: np.ndarray = None
    name: str = ""


class DatastoreText:
    """The text behind a datastore's entries: global entry ids -> (segment, position)."""

    def __init__(self, datastore):
        shards = getattr(datastore, "shards", None) or [datastore]
        self.offsets = np.asarray(getattr(datastore, "offsets", [0, datastore.size]), dtype=np.int64)
        self.segments = [_segment(s) for s in shards]

    def locate(self, ids):
        """(N,) entry ids >= 0 -> (segment index, position in that segment's text), int64 each."""
        ids = np.asarray(ids, dtype=np.int64)
        seg = np.searchsorted(self.offsets, ids, side="right") - 1
        pos = ids - self.offsets[seg]
        for k, s in enumerate(self.segments):
            if s.rows is not None:
                sel = seg == k
                pos[sel] = np.asarray(s.rows[pos[sel]])
        return seg, pos

    def values(self):
        """The whole text, every segment in order (int64; 8 bytes a token: frequencies, n-grams)."""
        return np.concatenate([np.asarray(s.vals, dtype=np.int64) for s in self.segments])

    def window(self, seg, pos, n):
        """The up to n tokens before position pos of segment seg (for tests and tables)."""
        return np.asarray(self.segments[seg].vals[max(0, pos - n):pos], dtype=np.int64)

    def snippets(self, seg, pos, n):
        """The text that neighbors need, compacted: for each (segment, position) its n tokens
        before and itself. Returns (tokens, q, clen): tokens[q] is the entry's next token,
        tokens[q - clen:q] its preceding text (clen < n only at the start of a text).
        Overlapping windows (near-duplicate neighbors, neighbors of consecutive tokens) share
        their tokens, so this stays at most the datastore's size."""
        seg, pos = np.asarray(seg, dtype=np.int64), np.asarray(pos, dtype=np.int64)
        q, clen = np.zeros(len(pos), np.int64), np.zeros(len(pos), np.int64)
        parts, base = [], 0
        for k, s in enumerate(self.segments):
            sel = np.flatnonzero(seg == k)
            if not len(sel):
                continue
            start = np.maximum(0, pos[sel] - n)
            end = pos[sel] + 1
            order = np.lexsort((end, start))
            st, en = start[order], end[order]
            reach = np.maximum.accumulate(en)
            # an interval opens where it starts beyond everything before it
            new = np.ones(len(st), dtype=bool)
            new[1:] = st[1:] > reach[:-1]
            first = np.flatnonzero(new)
            m_start = st[first]
            m_end = np.append(reach[first[1:] - 1], reach[-1])
            lengths = m_end - m_start
            m_off = base + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            which = np.searchsorted(m_start, pos[sel], side="right") - 1
            q[sel] = m_off[which] + (pos[sel] - m_start[which])
            clen[sel] = pos[sel] - start
            vals = s.vals
            parts += [np.asarray(vals[a:b], dtype=np.int64) for a, b in zip(m_start.tolist(), m_end.tolist())]
            base += int(lengths.sum())
        tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return tokens, q, clen


def _segment(ds):
    src = ds.meta.get("pruned_from")
    if not src:
        return Segment(ds.vals, None, ds.prefix)
    rows_file = ds.meta.get("source_rows_file")
    if not rows_file:
        raise KNNLMError(
            f"datastore {ds.prefix} was pruned by a version of knnlm-prune that did not record which row of "
            f"{src} each entry came from, so its neighbors' text cannot be read back; prune it again "
            f"(knnlm-prune writes {ds.prefix}_source_rows.npy)")
    try:
        source = Datastore.open(src, load_keys=False)
    except KNNLMError as e:
        raise KNNLMError(f"datastore {ds.prefix} is pruned: its neighbors' text is that of the datastore it was "
                         f"pruned from, {src}, which cannot be opened: {e}") from None
    if ds.meta.get("pruned_from_fingerprint") not in (None, source.fingerprint):
        raise MismatchError(f"datastore {ds.prefix} was pruned from a dump at {src} ({ds.meta['pruned_from_fingerprint']}) "
                            f"that has since been replaced ({source.fingerprint}); prune the new one again")
    path = os.path.join(os.path.dirname(os.path.abspath(ds.prefix)), rows_file)
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise KNNLMError(f"datastore {ds.prefix}: its source rows {path} are unreadable ({e}); prune again") from None
    if rows.shape != (ds.size,) or (len(rows) and (rows.min() < 0 or rows.max() >= source.size)):
        raise KNNLMError(f"datastore {ds.prefix}: {path} does not hold one row of {src} per entry; prune again")
    return Segment(source.vals, rows, source.prefix)


@dataclasses.dataclass
class Sources:
    export: object
    datastore: object
    text: DatastoreText
    vocab: object


def open_sources(export_path, datastore_path, vocab):
    """Open and cross-check; every mismatch is a named error saying which file and what to do."""
    export = load_export(export_path, partial_search=True)
    if not export.has_neighbors:
        raise ConfigError(
            f"export {export_path} holds no neighbors (it was written with --knnlm-dump-neighbors 0 or without "
            f"distances): the explorer shows each token's neighbors; export again with {IDS_FLAG} "
            f"(and --knnlm-dump-neighbors N > 0)")
    if export.ids is None or export.vals is None:
        raise ConfigError(
            f"export {export_path} has no neighbor ids (ids.npy, vals.npy), which the explorer needs to read "
            f"each neighbor's text from the datastore; export again with {IDS_FLAG}")
    datastore = open_datastore(datastore_path, load_keys=False)
    want = export.meta.get("datastore_fingerprint")
    if want is None:
        raise MismatchError(f"export {export_path} does not record which datastore it was scored against "
                            f"(no datastore_fingerprint), so its neighbor ids cannot be shown to be rows of "
                            f"{datastore_path}; export again with this version")
    if want != datastore.fingerprint:
        raise MismatchError(
            f"export {export_path} was scored against datastore {export.meta.get('datastore')} ({want}), not "
            f"{datastore_path} ({datastore.fingerprint}): its neighbor ids are another datastore's rows; "
            f"pass --datastore {export.meta.get('datastore')}")
    check_vocab(vocab, datastore, export)
    text = DatastoreText(datastore)
    return Sources(export, datastore, text, vocab)


def check_vocab(vocab, datastore, export):
    """The vocabulary must be the one the datastore's values are ids of."""
    fp = datastore.meta.get("dict_fingerprint")
    if fp is not None and vocab.fingerprint is not None and fp != vocab.fingerprint:
        raise MismatchError(
            f"{vocab.source} is not the vocabulary of datastore {datastore.prefix}: its fingerprint is "
            f"{vocab.fingerprint}, the datastore records {fp} (another dictionary or tokenizer; pass the "
            f"dict.txt of the data the model was trained on, or the model's tokenizer)")
    size = datastore.meta.get("dict_size")
    top = int(max(np.max(export.targets, initial=-1), np.max(export.vals, initial=-1)))
    if top >= len(vocab) or (size is not None and len(vocab) > size and fp is None):
        raise MismatchError(
            f"{vocab.source} has {len(vocab):,} tokens, but the export holds token id {top:,} and datastore "
            f"{datastore.prefix} a vocabulary of {size if size is not None else '?'}: not this datastore's "
            f"vocabulary")
