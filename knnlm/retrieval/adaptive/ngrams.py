"""N-gram statistics of the datastore's text, for adaptive retrieval's features (He, Neubig,
Berg-Kirkpatrick, EMNLP 2021, "Efficient Nearest Neighbor Language Models", section 4: "freq",
the frequency of the context's n-grams in the training text, and "fert", how many distinct
tokens follow them there).

    stats = NgramStats.build(datastore.vals)           # the datastore's values are its text, in order
    ctx = context_tokens(tokens, positions, rows=rows) # (N, MAX_ORDER) the tokens each prediction saw last
    feats = stats.features(ctx)                        # (N, 2 * len(orders)) float32

A datastore entry's value is the token that followed its context, so the values in datastore
order are the dumped text: the context n-gram of entry i is values[i-n .. i-1] and its next token
values[i]. Counts are of n-grams of that stream (an n-gram that straddles two documents of the
dump is counted too: at most n - 1 per document). N-grams are keyed by a 64-bit hash of their
tokens (a collision, about N^2 / 2^65 for N distinct n-grams, would merge two counts). A token
of -1 in a context (before the text's start) makes the n-grams that include it unseen: count 0.
"""

import json
import os

import numpy as np
import torch

from ...artefacts import file_checksum
from ...errors import ConfigError, CorruptError, KNNLMError

FORMAT = "knnlm-ngram-stats"
FORMAT_VERSION = 1
MAX_ORDER = 4
ORDERS = (1, 2, 3, 4)
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd: hashing by multiply-add modulo 2^64


def feature_names(orders=ORDERS):
    """Column names of `NgramStats.features`: per order, log(1 + count), log(1 + fertility)."""
    return [f"ngram{n}_{what}" for n in orders for what in ("log_count", "log_fertility")]


def context_tokens(tokens, positions, rows=None, order=MAX_ORDER):
    """The `order` tokens ending at each position (inclusive), oldest first: (N, order) int64.

    tokens: (T,) or (B, T) token ids the model read; positions: (N,) the input position whose
    output predicts the next token; rows: (N,) the row of each (for (B, T)). Where a context
    reaches before position 0 the missing tokens are -1.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    positions = torch.as_tensor(positions, device=tokens.device).long()
    rows = torch.zeros_like(positions) if rows is None else torch.as_tensor(rows, device=tokens.device).long()
    idx = positions[:, None] + torch.arange(1 - order, 1, device=tokens.device)
    got = tokens[rows[:, None], idx.clamp(min=0)].long()
    return torch.where(idx >= 0, got, torch.full_like(got, -1))


def _codes(windows):
    """(N, n) int64 tokens -> ((N,) uint64 hashes, (N,) bool: the row holds no -1)."""
    w = np.asarray(windows, dtype=np.int64)
    h = np.zeros(len(w), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(w.shape[1]):
            h = h * _MULT + (w[:, j].astype(np.uint64) + np.uint64(1))
    return h, (w >= 0).all(axis=1)


class NgramStats:
    """Per order n: the sorted distinct context n-grams of the text (hashes), how often each
    occurs, and how many distinct tokens follow it."""

    def __init__(self, tables, meta, path=None):
        self.tables, self.meta, self.path = tables, meta, path
        self.orders = tuple(int(n) for n in meta["orders"])

    @property
    def feature_names(self):
        return feature_names(self.orders)

    @classmethod
    def build(cls, values, orders=ORDERS, *, source=None, progress=None, max_order=MAX_ORDER):
        """Count the context n-grams of `values` (the datastore's values, in order; read whole,
        8 bytes per entry, plus a sort per order). `source`: metadata to record (the datastore's
        prefix and fingerprint). max_order: the highest order allowed (adaptive retrieval's
        features stop at MAX_ORDER; the explorer's longest-match lengths go further)."""
        orders = tuple(sorted({int(n) for n in orders}))
        if not orders or orders[0] < 1 or orders[-1] > max_order:
            raise ConfigError(f"n-gram orders must be in 1..{max_order}, got {list(orders)}")
        vals = np.asarray(values).reshape(-1).astype(np.int64)
        if (vals < 0).any():
            raise CorruptError("n-gram statistics: the datastore holds negative token ids")
        tables = {}
        for n in orders:
            if progress is not None:
                progress(f"counting {n}-grams of {len(vals):,} tokens")
            # context n-gram values[i-n .. i-1] of each i >= n, and its next token values[i]
            windows = (np.lib.stride_tricks.sliding_window_view(vals[:-1], n) if len(vals) > n
                       else np.zeros((0, n), dtype=np.int64))
            codes, nxt = _codes(windows)[0], vals[n:]
            order = np.lexsort((nxt, codes))
            codes, nxt = codes[order], nxt[order]
            new_code = np.ones(len(codes), dtype=bool)
            new_code[1:] = codes[1:] != codes[:-1]
            new_pair = new_code.copy()
            new_pair[1:] |= nxt[1:] != nxt[:-1]
            starts = np.flatnonzero(new_code)
            counts = np.diff(np.append(starts, len(codes)))
            fert = np.add.reduceat(new_pair.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)
            tables[n] = (codes[starts], counts.astype(np.int64), fert.astype(np.int64))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "orders": list(orders),
                "tokens": int(len(vals)), **(source or {})}
        return cls(tables, meta)

    def lookup(self, n, context):
        """(count, fertility) int64 arrays of the last n tokens of each context row."""
        ctx = np.asarray(context, dtype=np.int64)
        codes, ok = _codes(ctx[:, ctx.shape[1] - n:])
        u, counts, fert = self.tables[n]
        if len(u) == 0:
            z = np.zeros(len(ctx), dtype=np.int64)
            return z, z.copy()
        at = np.clip(np.searchsorted(u, codes), 0, len(u) - 1)
        hit = ok & (u[at] == codes)
        return np.where(hit, counts[at], 0), np.where(hit, fert[at], 0)

    def features(self, context):
        """(N, C >= max order) context tokens (`context_tokens`) -> (N, 2 * len(orders)) float32:
        log(1 + count) and log(1 + fertility) of each order's context n-gram."""
        ctx = context.detach().cpu().numpy() if torch.is_tensor(context) else np.asarray(context)
        if ctx.ndim != 2 or ctx.shape[1] < max(self.orders):
            raise ConfigError(f"n-gram features need the last {max(self.orders)} tokens of each context, "
                              f"got an array of shape {ctx.shape}")
        cols = []
        for n in self.orders:
            c, f = self.lookup(n, ctx)
            cols += [np.log1p(c), np.log1p(f)]
        return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((len(ctx), 0), np.float32)

    # ---- files ----
    def save(self, path, overwrite=False):
        """Write PATH (.npz) atomically; returns its checksum (`knnlm.artefacts.file_checksum`)."""
        if os.path.exists(path) and not overwrite:
            raise KNNLMError(f"n-gram statistics {path} already exist; pass --overwrite to replace them")
        arrays = {"meta": np.array(json.dumps(self.meta))}
        for n, (u, c, f) in self.tables.items():
            arrays.update({f"codes{n}": u, f"counts{n}": c, f"fertility{n}": f})
        tmp = f"{path}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        self.path = path
        return file_checksum(path)

    @classmethod
    def load(cls, path):
        if not os.path.isfile(path):
            raise KNNLMError(f"no n-gram statistics at {path} (written by knnlm-adaptive train beside its predictor)")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
                    raise CorruptError(f"{path} is not n-gram statistics of format {FORMAT} v{FORMAT_VERSION}")
                tables = {int(n): (z[f"codes{n}"], z[f"counts{n}"], z[f"fertility{n}"]) for n in meta["orders"]}
        except CorruptError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged zip fails in many ways
            raise CorruptError(f"n-gram statistics {path} are unreadable ({e.__class__.__name__}: {e}); "
                               f"train the predictor again") from None
        for n, (u, c, f) in tables.items():
            if not (len(u) == len(c) == len(f)) or u.dtype != np.uint64:
                raise CorruptError(f"n-gram statistics {path}: the {n}-gram tables disagree in length or type")
        return cls(tables, meta, path)


def text_datastore(datastore):
    """The datastore whose values are the dumped text in order: a pruned datastore's source
    (its merged entries are not), else the datastore itself (reduced keys keep the order)."""
    src = datastore.meta.get("pruned_from")
    if not src:
        return datastore
    from ...store.datastore import Datastore

    try:
        return Datastore.open(src, load_keys=False)
    except KNNLMError as e:
        raise KNNLMError(f"n-gram statistics of pruned datastore {datastore.prefix} are counted on the text of "
                         f"the datastore it was pruned from, {src}, which cannot be opened: {e}") from None
