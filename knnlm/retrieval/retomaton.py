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

import os

import numpy as np
import torch

from ..errors import ConfigError
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

    def __init__(self, base, *, min_pointers=1, max_pointers=None, clusters=None):
        check_pointers(min_pointers, max_pointers)
        if base.sim_func == "do_not_recomp_l2":
            raise ConfigError(DO_NOT_RECOMP)
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
        return (f"retomaton min-pointers {self.min_pointers}{states}: {100 * s['searches_saved']:.1f}% of "
                f"{s['tokens']:,} searches saved")

    def retrieve(self, queries, context=None, *, nearest_first=True):
        """Neighbors of a call's streams (`context.lengths`, `context.targets`): pointers where
        enough survive, the base's search elsewhere."""
        if context is None or context.lengths is None or context.targets is None:
            raise ConfigError("RetoMaton follows the text: pass a knnlm.Context with the streams' lengths (and "
                              "the targets, which KNNLM.score fills in); generation knows no next token")
        return self._follow(queries, context)

    def _follow(self, queries, streams):
        device = queries.device if torch.is_tensor(queries) else torch.device("cpu")
        q = queries if torch.is_tensor(queries) else torch.as_tensor(np.asarray(queries))
        lengths = [int(n) for n in streams.lengths]
        if sum(lengths) != len(q):
            raise ValueError(f"streams of lengths summing to {sum(lengths)} for {len(q)} queries")
        targets = streams.targets.to("cpu").long()
        n_streams, n = len(lengths), len(q)
        len_t = torch.tensor(lengths, dtype=torch.int64)
        starts = torch.zeros(n_streams, dtype=torch.int64)
        if n_streams:
            starts[1:] = torch.cumsum(len_t, 0)[:-1]
        width = max(self.k, self.max_pointers)
        dists = torch.full((n, width), float("nan"), dtype=torch.float32)
        vals = torch.full((n, width), -1, dtype=torch.int64)
        ids = torch.full((n, width), -1, dtype=torch.int64)
        # Candidates of each stream for its next token: datastore rows, nearest first, -1 after
        # the first `count`. All streams of a position are handled as one block (no per-stream loop).
        cands = torch.full((n_streams, self.max_pointers), -1, dtype=torch.int64)
        count = torch.zeros(n_streams, dtype=torch.int64)
        self.last_searched = torch.zeros(n, dtype=torch.bool)  # which queries of this call were searched
        for pos in range(max(lengths, default=0)):
            live = torch.nonzero(len_t > pos).squeeze(1)  # streams in order, as the rows of the block
            rows = starts[live] + pos
            search = count[live] < self.min_pointers
            b_ids = torch.full((len(live), width), -1, dtype=torch.int64)
            b_d = torch.full((len(live), width), float("nan"), dtype=torch.float32)
            b_v = torch.full((len(live), width), -1, dtype=torch.int64)
            if search.any():
                nb = self.base.retrieve(q[rows[search]], streams.rows(rows[search]), nearest_first=True)  # nearest first: candidates keep the order
                keep = nb.valid.cpu()
                i, d, v = nb.ids.cpu().long(), nb.distances.cpu().float(), nb.values.cpu().long()
                if not bool(keep.all()):  # valid neighbors first, in their order
                    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
                    keep, i, d, v = (t.gather(1, order) for t in (keep, i, d, v))
                m = i.shape[1]
                b_ids[search, :m] = i.masked_fill(~keep, -1)
                b_d[search, :m] = d.masked_fill(~keep, float("nan"))
                b_v[search, :m] = v.masked_fill(~keep, -1)
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
            n_search = int(search.sum())
            self.searched += n_search
            self.last_searched[rows[search]] = True
            self.tokens += len(live)
            ids[rows], dists[rows], vals[rows] = b_ids, b_d, b_v
            # Pointers of the neighbors that carry the real next token, nearest first (a stable
            # sort; the empty slots, at the end of each row, sort last).
            ok = b_ids >= 0
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
        valid = ids >= 0
        return Neighbors(distances=dists.nan_to_num(0.0).to(device), values=vals.clamp(min=0).to(device),
                         valid=valid.to(device), ids=ids.to(device), searched=self.last_searched.to(device))
