"""Everything the page shows, computed from checked `Sources` (knnlm.explain.source).

The scored text is the export's targets in order (both front-ends score a split front to back),
so token i's context in the text view and for the n-gram lengths is targets[:i].
"""

import dataclasses
import logging

import numpy as np

from ..errors import CorruptError, MismatchError
from . import summaries as S

log = logging.getLogger(__name__)

TOP = 20            # rows of the largest gains / losses tables
TABLE_CONTEXT = 12  # test-text tokens shown before a target in those tables


@dataclasses.dataclass
class Report:
    """Per-token arrays (N,), per-neighbor arrays (N, shown), the compacted neighbor text, the
    summaries' tables, and what the page says about itself (meta)."""

    meta: dict
    tokens: np.ndarray
    lp_lm: np.ndarray
    lp_knn: np.ndarray
    lp_final: np.ndarray
    gain: np.ndarray
    searched: np.ndarray      # bool; all True unless the export records tokens not searched
    rank_lm: np.ndarray       # 1.., -1: beyond the export's top-k, 0: unknown
    rank_knn: np.ndarray      # 1.., 0: not among the kept neighbors
    freq: np.ndarray          # the target's count in the datastore's text
    match: np.ndarray         # longest context n-gram found in the datastore's text (<= max_ngram)
    nb_id: np.ndarray         # datastore rows, -1 missing
    nb_dist: np.ndarray       # NaN missing
    nb_q: np.ndarray          # position of the neighbor's next token in `snippets`, -1 missing
    nb_clen: np.ndarray       # tokens of preceding text before it
    snippets: np.ndarray
    tables: dict


def build(sources, *, neighbors=8, context=16, max_ngram=S.MAX_NGRAM, progress=None):
    """Compute the report. neighbors: per token, how many of the export's kept neighbors the
    panel lists (nearest first); context: datastore tokens shown before each neighbor."""
    say = progress or (lambda msg: log.info("%s", msg))
    ex, ds, text = sources.export, sources.datastore, sources.text
    n = ex.count
    shown = min(int(neighbors), ex.k_kept)
    lmbda, temperature = float(ex.meta["lmbda"]), float(ex.meta["temperature"])
    tokens = np.asarray(ex.targets, np.int64)
    lp_lm = np.asarray(ex.lp_lm, np.float64)
    lp_knn = np.asarray(ex.lp_knn, np.float64)
    searched = np.ones(n, bool)
    if ex.searched is not None:
        searched = np.asarray(ex.searched, bool)
    unsearched = ex.meta.get("unsearched")
    say(f"gains of {n:,} tokens (lambda {lmbda:g})")
    # adaptive retrieval: an unsearched token got p_LM alone; RetoMaton: its pointers' p_kNN
    lp_final = S.final_log_probs(lp_lm, lp_knn, lmbda, searched if unsearched == "lm_only" else None)
    gain = S.gains(lp_lm, lp_final)

    say(f"reading the neighbors' text from {ds.prefix}")
    ids = np.asarray(ex.ids[:, :shown], np.int64)
    have = ids >= 0
    seg, pos = text.locate(ids[have])
    toks, q, clen = text.snippets(seg, pos, context)
    # The export's values must be the datastore's at those rows: a wrong datastore shows here
    # even when its fingerprint was copied.
    got = toks[q]
    want = np.asarray(ex.vals[:, :shown], np.int64)[have]
    if not np.array_equal(got, want):
        i = int(np.argmax(got != want))
        raise MismatchError(f"export {ex.path}: neighbor value {want[i]} of datastore row {ids[have][i]} is "
                            f"{got[i]} in {ds.prefix}; the export was not scored against this datastore")
    nb_q = np.full(ids.shape, -1, np.int64)
    nb_clen = np.zeros(ids.shape, np.int64)
    nb_q[have], nb_clen[have] = q, clen

    say("ranks of the targets")
    weights = None
    if getattr(ds, "weighted", False):
        weights = np.where(ex.ids[:, :] >= 0, ds.gather_weights(np.maximum(np.asarray(ex.ids), 0)), 0)
    rank_knn = S.knn_ranks(ex.dists, ex.vals, tokens, ex.meta["sim_func"], temperature, weights)
    rank_lm = S.lm_ranks(ex.features, ex.feature_names, lp_lm)

    values = text.values()
    if len(values) and values.min() < 0:
        raise CorruptError(f"datastore {ds.prefix} holds negative token ids")
    freq = np.bincount(values, minlength=int(max(tokens.max(initial=0), values.max(initial=0))) + 1)[tokens]
    say(f"longest context n-grams (up to {max_ngram}) in {len(values):,} datastore tokens")
    match = S.longest_matches(values, S.text_contexts(tokens, max_ngram), max_ngram, progress=say)
    del values

    f_idx, f_labels = S.frequency_buckets(freq)
    m_idx, m_labels = S.match_buckets(match, max_ngram)
    best, worst = S.top_tokens(gain, TOP)
    tables = {
        "frequency": S.group_table(gain, lp_lm, lp_final, f_idx, f_labels),
        "ngram": S.group_table(gain, lp_lm, lp_final, m_idx, m_labels),
        "helps": S.helps_hurts(gain),
        "best": best, "worst": worst,
    }
    finite = np.abs(gain[np.isfinite(gain)])
    q99 = float(np.quantile(finite, 0.99)) if len(finite) else 1.0
    scale = float(min(8.0, max(0.5, np.ceil(q99 * 2) / 2)))
    meta = {
        "export": ex.path, "datastore": ds.prefix, "datastore_size": int(ds.size), "tokens": int(n),
        "lmbda": lmbda, "temperature": temperature, "sim_func": ex.meta["sim_func"], "k": ex.k,
        "k_kept": ex.k_kept, "neighbors_shown": shown, "context": int(context), "max_ngram": int(max_ngram),
        "scale": scale, "searched": int(searched.sum()), "unsearched": unsearched, "split": ex.meta.get("split"),
        "ppl_lm": float(np.exp(-lp_lm.mean())) if n else float("nan"),
        "ppl_knnlm": float(np.exp(-lp_final.mean())) if n else float("nan"),
        "total_gain": float(gain.sum()),
        "weighted": weights is not None,
        "lm_top_k": sum(1 for f in (ex.feature_names or []) if f.startswith("top") and f.endswith("_log_prob")),
    }
    return Report(meta=meta, tokens=tokens, lp_lm=lp_lm, lp_knn=lp_knn, lp_final=lp_final, gain=gain,
                  searched=searched, rank_lm=rank_lm, rank_knn=rank_knn, freq=freq, match=match,
                  nb_id=ids, nb_dist=np.asarray(ex.dists[:, :shown], np.float32), nb_q=nb_q, nb_clen=nb_clen,
                  snippets=toks, tables=tables)
