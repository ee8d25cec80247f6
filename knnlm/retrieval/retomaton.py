"""RetoMaton (Alon et al., ICML 2022, "Neuro-Symbolic Language Modeling with Automaton-augmented
Retrieval"): follow pointers through the datastore instead of searching at every token.

Each datastore entry i points to entry i + 1, the one that followed it in the text it was dumped
from (no pointer crosses a break between texts). After token t is scored, the neighbors of t
whose value is the token that really came next pass their pointers on: those entries are the
candidates of token t + 1, nearest first. If at least `min_pointers` candidates survive, token
t + 1 is scored against them (their exact distances to its query, at most `max_pointers` of
them) and no search happens; otherwise the base strategy searches as usual. Either the search's
neighbors or the candidates are used, never both, so with `min_pointers` above k every token is
searched and the result is the plain kNN-LM's, bit for bit.

Scoring is teacher-forced: the text is known, so one call scores whole streams. The call's
`Context` says how its queries are laid out (`lengths`: consecutive streams of tokens; fairseq:
the rows of an eval batch, knnlm-hf: its windows) and which token really follows each (`targets`,
filled by `KNNLM.score`); pointers are followed within a stream, and the streams advance
together, position by position, so the searches of one position are one batch. Generation
knows no next token, so RetoMaton does not generate (refused by name).
"""

import dataclasses
import os
import time

import numpy as np
import torch

from ..errors import ConfigError
from ..timing import STAGES
from .base import Neighbors, Wrapper
from .registry import register_wrapper


DO_NOT_RECOMP = ("--retomaton scores pointer candidates by their exact distances, which FAISS does not give: use "
                 "--knn-sim-func l2 or dot, not do_not_recomp_l2")


def check_pointers(min_pointers, max_pointers):
    if int(min_pointers) != min_pointers or min_pointers < 1:
        raise ConfigError(f"--retomaton-min-pointers must be a whole number of at least 1, got {min_pointers}")
    if max_pointers is not None and (int(max_pointers) != max_pointers or max_pointers < 1):
        raise ConfigError(f"--retomaton-max-pointers must be a whole number of at least 1 (leave it out for "
                          f"--k), got {max_pointers}")


def pointer_targets(datastore):
    """(N,) bool: whether entry i has a successor i + 1 in the same text.

    A datastore dumped with fairseq's --sample-break-mode none (the default, and the paper's
    setting) is one contiguous stream per shard; other break modes do not record where a text
    starts, so pointers could cross texts: refused.
    """
    n = datastore.size
    follows = np.ones(n, dtype=bool)
    follows[-1:] = False
    shards = getattr(datastore, "shards", None)
    metas = [s.meta for s in shards] if shards else [datastore.meta]
    for meta in metas:
        mode = meta.get("sample_break_mode", "none")
        if mode not in (None, "none", "None"):
            raise ConfigError(
                f"--retomaton follows each datastore entry to the next one in its text, but datastore "
                f"{datastore.prefix} was dumped with --sample-break-mode {mode}, which does not record "
                f"where its texts break; dump it with --sample-break-mode none (the paper's setting)")
    if shards:
        follows[np.asarray(datastore.offsets[1:], dtype=np.int64) - 1] = False  # a shard's last row
    return follows


@register_wrapper("retomaton")
class RetoMatonRetriever(Wrapper):
    """Pointers first, `base` search (FaissRetriever, ExactRetriever, ...) when too few survive.

    min_pointers: search when fewer candidates than this survive (1: only when none does);
    max_pointers: candidates kept per token (default: the base's k);
    clusters: the paper's states, a knnlm-retomaton-cluster file or (N,) cluster ids: a token
    that follows pointers is scored against them and the other members of their clusters (up to
    max_pointers); whether it searches still depends on the pointers alone.
    """

    own_needs = frozenset({"streams", "targets"})
    unsearched = "pointers"

    @classmethod
    def enabled(cls, opts):
        return bool(opts.retomaton)

    @classmethod
    def validate_options(cls, opts, export=None):
        if not opts.retomaton:
            if opts.retomaton_cluster:
                raise ConfigError("--retomaton-cluster is an option of RetoMaton: add --retomaton")
            for name in ("retomaton_min_pointers", "retomaton_max_pointers"):
                if getattr(opts, name) != cls._defaults[name]:
                    raise ConfigError(f"--{name.replace('_', '-')} is an option of RetoMaton: add --retomaton")
            return
        check_pointers(opts.retomaton_min_pointers, opts.retomaton_max_pointers)
        if opts.knn_sim_func == "do_not_recomp_l2":
            raise ConfigError(DO_NOT_RECOMP)

    @classmethod
    def wrap(cls, base, opts):
        return cls(base, min_pointers=opts.retomaton_min_pointers, max_pointers=opts.retomaton_max_pointers,
                   clusters=opts.retomaton_cluster)

    _defaults = {"retomaton_min_pointers": 1, "retomaton_max_pointers": None}

    def __init__(self, base, *, min_pointers=1, max_pointers=None, clusters=None, vectorised=True):
        check_pointers(min_pointers, max_pointers)
        self.vectorised = bool(vectorised)  # False: the position-by-position reference, for tests
        if base.sim_func == "do_not_recomp_l2":
            raise ConfigError(DO_NOT_RECOMP)
        if getattr(base, "per_token_lambda", False):
            raise ConfigError("--adaptive-lambda mixes each searched token with its predicted lambda, but under "
                              "--retomaton the tokens fed by pointers have none: drop one of the two")
        super().__init__(base)
        self.min_pointers = int(min_pointers)
        self.max_pointers = int(max_pointers if max_pointers is not None else base.k)
        self.follows = torch.from_numpy(pointer_targets(self.datastore))
        self.members = None
        if clusters is not None:
            from ..offline.retomaton_clusters import ClusterMembers, load_clusters

            if isinstance(clusters, (str, os.PathLike)):
                clusters = load_clusters(clusters, self.datastore)
            clusters = np.asarray(clusters)
            if clusters.shape != (self.datastore.size,) or (clusters < 0).any():
                raise ConfigError(f"RetoMaton clusters: {clusters.shape} ids for {self.datastore.size:,} entries "
                                  f"(one non-negative cluster id per entry is needed)")
            self.members = ClusterMembers(clusters)
        self.searched = 0
        self.tokens = 0

    def summary(self):
        saved = 1.0 - self.searched / self.tokens if self.tokens else 0.0
        return {"tokens": self.tokens, "searched": self.searched, "searches_saved": saved}

    def describe(self):
        s = self.summary()
        states = f", {len(self.members.starts) - 1:,} clusters" if self.members is not None else ""
        inner = getattr(self.base, "describe", lambda: "")()  # stacked over adaptive retrieval: its own line first
        return (f"{inner + '; ' if inner else ''}retomaton min-pointers {self.min_pointers}{states}: "
                f"{100 * s['searches_saved']:.1f}% of {s['tokens']:,} searches saved"
                f"{' in all' if getattr(self.base, 'unsearched', None) else ''}")

    @property
    def ranks(self):
        """Whether pointers must be ranked by distance: only when some could be cut (max_pointers
        below k) or clusters extend them (the nearest pointers' clusters first). Otherwise the
        candidates keep the order of the search that found them, and no sort is needed."""
        return self.members is not None or self.max_pointers < self.k

    def retrieve(self, queries, context=None, *, nearest_first=True):
        """Neighbors of a call's streams (`context.lengths`, `context.targets`): pointers where
        enough survive, the base's search elsewhere."""
        if context is None or context.lengths is None or context.targets is None:
            raise ConfigError("RetoMaton follows the text: pass a knnlm.Context with the streams' lengths (and "
                              "the targets, which KNNLM.score fills in); generation knows no next token")
        follow = self._follow_reference if (self.ranks or not self.vectorised) else self._follow_chains
        return follow(queries, context, nearest_first)

    def _streams(self, queries, context):
        q = queries if torch.is_tensor(queries) else torch.as_tensor(np.asarray(queries))
        lengths = [int(n) for n in context.lengths]
        if sum(lengths) != len(q):
            raise ValueError(f"streams of lengths summing to {sum(lengths)} for {len(q)} queries")
        len_t = torch.tensor(lengths, dtype=torch.int64)
        starts = torch.zeros(len(lengths), dtype=torch.int64)
        if len(lengths):
            starts[1:] = torch.cumsum(len_t, 0)[:-1]
        return q, len_t, starts, context.targets.to("cpu").long()

    def _search(self, q, context, rows, nearest_first, dense=True):
        """The base's neighbors of tokens `rows` (one row each unless `dense` is False: then as the
        base gave them, maybe compact), which of them it really searched and which it gave
        neighbors at all (adaptive retrieval under RetoMaton skips some): (R,) masks on the CPU."""
        nb = self.base.retrieve(q[rows.to(q.device)], context.rows(rows), nearest_first=nearest_first)
        nb = nb.dense() if dense else nb
        n = len(rows)
        got = torch.ones(n, dtype=torch.bool) if nb.retrieved is None else nb.retrieved.cpu()
        return nb, nb.searched_mask().cpu() & got, got

    def _count(self, searched):
        """The counters of `summary`, and which tokens of this call were searched."""
        self.last_searched = searched
        self.tokens += len(searched)
        self.searched += int(searched.sum())

    def _finish(self, dists, vals, ids, searched, retrieved, device):
        self._count(searched)
        return Neighbors(distances=dists.to(device), values=vals.to(device), valid=(ids >= 0).to(device),
                         ids=ids.to(device), searched=searched.to(device),
                         retrieved=None if bool(retrieved.all()) else retrieved.to(device))

    def _follow_chains(self, queries, context, nearest_first):
        """Pointers followed as chains, without a loop over positions (when no pointer is ever cut
        or ranked, see `ranks`). A round searches, in one base call, the next token of every stream
        that needs a search; each searched token's neighbors that carry the real next token start
        chains, which the following tokens follow while at least min_pointers survive (entry e
        survives step s when entry e + s carries the token that really came s tokens later and
        has a successor): one vectorised step per chain length over the (token, entry) pairs still
        alive, no per-token sort. The followed tokens' exact distances are computed in one call at
        the end. The result is compact (`Neighbors.rows`): the searched tokens' rows, k wide, and
        the followed tokens' in a block of their own (`Neighbors.extra`) only as wide as the most
        candidates any of them has, nothing padded out to k for them. Its `dense()` is
        `_follow_reference`'s answer, and its scores are, bit for bit (tests hold both equal)."""
        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        q, len_t, starts, targets = self._streams(queries, context)
        n, width = len(q), max(self.k, self.max_pointers)
        searched = torch.zeros(n, dtype=torch.bool)
        retrieved = torch.ones(n, dtype=torch.bool)
        nxt = torch.zeros(len(len_t), dtype=torch.int64)  # each stream's next token that needs a search
        s_rows, s_ids, s_vals, s_dists = [], [], [], []  # the searched tokens that got neighbors
        f_rows, f_ids, f_vals = [], [], []  # followed tokens' (token, candidate entry, its value)
        follows = self.follows
        ds_vals = self.datastore.gather_vals
        while True:
            live = torch.nonzero(nxt < len_t).squeeze(1)
            if not len(live):
                break
            rows = starts[live] + nxt[live]
            nb, did, got = self._search(q, context, rows, nearest_first, dense=False)
            t0 = time.perf_counter()
            searched[rows], retrieved[rows] = did, got
            ok = nb.valid.cpu()
            i, v, d = nb.ids.cpu().long(), nb.values.cpu().long(), nb.distances.cpu().float()
            # pos: which of the round's tokens each of nb's rows belongs to (None: row j is token j);
            # tokens the base gave no neighbors (adaptive retrieval's skipped) have no row here
            pos = None if nb.rows is None else nb.rows.cpu()
            if pos is None and not bool(got.all()):
                pos = torch.nonzero(got).squeeze(1)
                ok, i, v, d = ok[pos], i[pos], v[pos], d[pos]
            every = bool(ok.all())  # FAISS found all k (the rule): nothing to mask
            if not every:
                i, v, d = i.masked_fill(~ok, -1), v.masked_fill(~ok, 0), d.masked_fill(~ok, 0.0)
            at = rows if pos is None else rows[pos]
            s_rows.append(at), s_ids.append(i), s_vals.append(v), s_dists.append(d)
            # Chains: (token of the round, entry) pairs, in token order then the search's order:
            # the neighbors carrying the real next token, then those of them with a successor.
            match = v == targets[at].unsqueeze(1)
            b, j = torch.nonzero(match if every else match & ok, as_tuple=True)
            e = i[b, j]
            has_next = follows[e]
            b, e = b[has_next], e[has_next]
            if pos is not None:
                b = pos[b]
            left = len_t[live] - nxt[live] - 1  # tokens after the searched one in its stream
            active = torch.ones(len(live), dtype=torch.bool)
            stop = torch.zeros(len(live), dtype=torch.int64)  # steps to the stream's next search
            step = 1
            while True:
                cnt = torch.bincount(b, minlength=len(live))
                go = active & (cnt >= self.min_pointers) & (left >= step)
                stop[active & ~go] = step
                active = go
                if not bool(active.any()):
                    break
                keep = go[b]
                b, e = b[keep], e[keep] + 1  # token rows[b] + step is scored against entries e
                t = rows[b] + step
                ev = torch.from_numpy(np.asarray(ds_vals(e.numpy())).astype(np.int64))
                f_rows.append(t), f_ids.append(e), f_vals.append(ev)
                survive = (ev == targets[t]) & follows[e]
                b, e = b[survive], e[survive]
                step += 1
            nxt[live] += stop
            STAGES.add("pointers", time.perf_counter() - t0)
        with STAGES.timed("pointers"):
            main = self._block(s_rows, s_ids, s_vals, s_dists, width)
            extra = self._followed(q, f_rows, f_ids, f_vals, width)
        return self._finish_compact(main, extra, searched, retrieved, device)

    @staticmethod
    def _block(rows, ids, vals, dists, width):
        """The searched tokens' rows as one compact block, `width` wide (the base may give fewer)."""
        if not rows:
            return Neighbors(torch.zeros((0, width)), torch.zeros((0, width), dtype=torch.int64),
                             torch.zeros((0, width), dtype=torch.bool), ids=torch.full((0, width), -1),
                             rows=torch.zeros(0, dtype=torch.int64))

        def cat(parts, fill):
            t = torch.cat(parts) if len(parts) > 1 else parts[0]
            if t.shape[1] < width:
                t = torch.cat([t, t.new_full((len(t), width - t.shape[1]), fill)], 1)
            return t

        i = cat(ids, -1)
        return Neighbors(cat(dists, 0.0), cat(vals, 0), i >= 0, ids=i, rows=torch.cat(rows))

    def _followed(self, q, rows, ids, vals, width):
        """The followed tokens' block: each token's candidates in slots 0, 1, ... (the order they were
        found in), as wide as the most any token has, rounded up to a multiple of 64 (<= width)."""
        if not rows:
            return None
        t, e, ev = torch.cat(rows), torch.cat(ids), torch.cat(vals)
        # one token's candidates are consecutive pairs: its slots are 0, 1, ... in that order
        first = torch.ones(len(t), dtype=torch.bool)
        first[1:] = t[1:] != t[:-1]
        heads = torch.nonzero(first).squeeze(1)
        group = torch.cumsum(first, 0) - 1
        slot = torch.arange(len(t)) - heads[group]
        w = min(width, -(-(int(slot.max()) + 1) // 64) * 64)
        m = len(heads)
        f_ids = torch.full((m, w), -1, dtype=torch.int64)
        f_vals = torch.zeros((m, w), dtype=torch.int64)
        f_d = torch.zeros((m, w), dtype=torch.float32)
        d = self.base.pair_distances(q, t.numpy(), e.numpy()).float().cpu()
        f_ids[group, slot], f_vals[group, slot], f_d[group, slot] = e, ev, d
        return Neighbors(f_d, f_vals, f_ids >= 0, ids=f_ids, rows=t[heads])

    def _finish_compact(self, main, extra, searched, retrieved, device):
        self._count(searched)
        to = lambda nb: None if nb is None else Neighbors(  # noqa: E731
            nb.distances.to(device), nb.values.to(device), nb.valid.to(device), ids=nb.ids.to(device),
            rows=nb.rows.to(device))
        extra = to(extra)
        return dataclasses.replace(to(main), retrieved=retrieved.to(device), searched=searched.to(device), extra=extra)

    def _follow_reference(self, queries, context, nearest_first):
        """Pointers followed position by position, all streams of a position as one block: the
        reference the chains are tested against, and the path for ranked pointers (max_pointers
        below k, clusters)."""
        t0, timed0 = time.perf_counter(), sum(STAGES.seconds.values())
        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        q, len_t, starts, targets = self._streams(queries, context)
        n_streams, n = len(len_t), len(q)
        width = max(self.k, self.max_pointers)
        dists = torch.full((n, width), float("nan"), dtype=torch.float32)
        vals = torch.full((n, width), -1, dtype=torch.int64)
        ids = torch.full((n, width), -1, dtype=torch.int64)
        searched = torch.zeros(n, dtype=torch.bool)
        retrieved = torch.ones(n, dtype=torch.bool)
        # Candidates of each stream for its next token: datastore rows, -1 after the first `count`.
        cands = torch.full((n_streams, self.max_pointers), -1, dtype=torch.int64)
        count = torch.zeros(n_streams, dtype=torch.int64)
        ranks = self.ranks
        for pos in range(int(len_t.max()) if n_streams else 0):
            live = torch.nonzero(len_t > pos).squeeze(1)  # streams in order, as the rows of the block
            rows = starts[live] + pos
            search = count[live] < self.min_pointers
            b_ids = torch.full((len(live), width), -1, dtype=torch.int64)
            b_d = torch.full((len(live), width), float("nan"), dtype=torch.float32)
            b_v = torch.full((len(live), width), -1, dtype=torch.int64)
            if search.any():
                # ranked pointers start from the search's order: nearest first
                nb, did, got = self._search(q, context, rows[search], nearest_first or ranks)
                keep = nb.valid.cpu()
                i, d, v = nb.ids.cpu().long(), nb.distances.cpu().float(), nb.values.cpu().long()
                m = i.shape[1]
                b_ids[search, :m] = i.masked_fill(~keep, -1)
                b_d[search, :m] = d.masked_fill(~keep, float("nan"))
                b_v[search, :m] = v.masked_fill(~keep, -1)
                searched[rows[search]], retrieved[rows[search]] = did, got
            follow = ~search
            if follow.any():
                width_f = int(count[live[follow]].max())
                cid = cands[live[follow], :width_f]
                if self.members is not None:  # the pointers' clusters' other members join them
                    ext = [self.members.extend(c[:m].numpy(), self.max_pointers)
                           for c, m in zip(cid, count[live[follow]].tolist())]
                    width_f = max(len(e) for e in ext)
                    cid = torch.full((len(ext), width_f), -1, dtype=torch.int64)
                    for j, e in enumerate(ext):
                        cid[j, :len(e)] = torch.from_numpy(e)
                d = self.base.exact_distances(q[rows[follow]], cid.clamp(min=0).numpy()).float().cpu()
                v = torch.from_numpy(np.asarray(self.datastore.gather_vals(cid.clamp(min=0).numpy())).astype(np.int64))
                pad = cid < 0
                b_ids[follow, :width_f] = cid
                b_d[follow, :width_f] = d.masked_fill(pad, float("nan"))
                b_v[follow, :width_f] = v.masked_fill(pad, -1)
            ids[rows], dists[rows], vals[rows] = b_ids, b_d, b_v
            # Pointers of the neighbors that carry the real next token: in the row's order, or
            # nearest first when they are ranked (a stable sort; empty slots sort last).
            i, v, ok = b_ids, b_v, b_ids >= 0
            if ranks:
                key = (-b_d if self.sim_func == "dot" else b_d).masked_fill(~ok, float("inf"))
                order = torch.argsort(key, dim=1, stable=True)
                i, v, ok = b_ids.gather(1, order), b_v.gather(1, order), ok.gather(1, order)
            ok &= (v == targets[rows].unsqueeze(1)) & self.follows[i.clamp(min=0)]
            rank = torch.cumsum(ok, 1)
            ok &= rank <= self.max_pointers
            new = torch.full((len(live), self.max_pointers), -1, dtype=torch.int64)
            r_idx, c_idx = torch.nonzero(ok, as_tuple=True)
            new[r_idx, rank[r_idx, c_idx] - 1] = i[r_idx, c_idx] + 1
            cands[live], count[live] = new, ok.sum(1)
        # pointers: this call's time less the stages its searches timed themselves
        STAGES.add("pointers", time.perf_counter() - t0 - (sum(STAGES.seconds.values()) - timed0))
        return self._finish(dists.nan_to_num(0.0), vals.clamp(min=0), ids, searched, retrieved, device)
