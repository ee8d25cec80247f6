"""Adaptive retrieval (He, Neubig, Berg-Kirkpatrick, EMNLP 2021, "Efficient Nearest Neighbor
Language Models", section 4): search only for the tokens where p_kNN is predicted to help.

A small network (`Predictor`, trained by `knnlm-adaptive train` on a held-out export) reads the
LM's own features of each token (`knnlm.retrieval.adaptive.features`: entropy and top log-probabilities of p_LM)
and scores how much the search is worth there. Objective "lambda" (the paper's): the score is
the logit of the weight lambda that maximizes log(lambda p_kNN + (1 - lambda) p_LM) for that
token. Objective "gain": the score is the predicted gain in log-probability of the kNN-LM at
its constant lambda over p_LM alone, log(lambda p_kNN + (1 - lambda) p_LM) - log p_LM, which
is exactly what skipping a token gives up. Tokens scored below a threshold are not searched
and get p_LM alone; the others are searched by the base strategy in one call with only their
queries, and scored exactly as the plain kNN-LM scores them (its constant lambda), or, with
`per_token_lambda` (--adaptive-lambda, objective lambda only), with the predictor's own lambda
for each token, returned as `Neighbors.lmbda` (KNNLM mixes with it where present).

The threshold comes from a target skip fraction (`skip=F`: the F-quantile of the scores on
the export the predictor was calibrated on) or is given (`threshold=X`: a predicted lambda in
[0, 1] for objective lambda, a predicted gain in nats for objective gain). With nothing
skipped (skip 0, or threshold 0 with objective lambda) every token is searched in one base
call and the result is the plain kNN-LM's, bit for bit.

    retriever = AdaptiveRetriever(FaissRetriever(index, ds, k=1024), "pred.json", skip=0.5)
    knn = KNNLM(retriever, lmbda=0.25, temperature=1.0)
    knn.score(queries, targets, lp_lm, context=Context(lm_features=lm_features(log_probs, retriever.top_k),
                                                       context_tokens=context_tokens(tokens, positions)))

The features: the LM's (entropy, top log-probabilities) and, by default, the paper's n-gram
features of each token's context in the datastore's text (`knnlm.retrieval.adaptive.ngrams`: how often its last
1..4 tokens occur there and how many distinct tokens follow them). The predictor file is JSON,
self-describing: the feature names, the normalization, the weights (with a checksum), the
calibration quantiles, and the fingerprints of the datastore and model whose export trained it
(another datastore or model is refused by name); the n-gram statistics sit beside it
(PRED.ngrams.npz), checksummed in the JSON.
"""

import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import torch

from ...artefacts import AtomicOutput, read_json, verify_checksum
from ...errors import ConfigError, CorruptError, KNNLMError, MismatchError
from ...timing import timed
from .features import TokenFeatures, feature_names
from .ngrams import NgramStats
from .ngrams import feature_names as ngram_feature_names
from ..base import Neighbors, Wrapper
from ..registry import register_wrapper

FORMAT = "knnlm-adaptive-predictor"
# Version 2 added ensembles ("members"); version 1 files (one network) are still read.
FORMAT_VERSION = 2
READS_VERSIONS = (1, 2)
# Log-probabilities below this (-inf where the LM gives a token 0) are clamped before the network.
FEATURE_FLOOR = -100.0
# Quantiles of the predictions kept for calibration: 0, 0.1%, ..., 100%.
CALIBRATION_POINTS = 1001
ARCHS = ("mlp", "linear")
OBJECTIVES = ("lambda", "gain")


def build_net(n_in, hidden, members=1):
    """Linear -> ReLU ... -> Linear to one logit; `hidden` empty: logistic regression. With
    `members` > 1, that many such networks whose outputs are averaged (`Ensemble`)."""
    if members > 1:
        return Ensemble(build_net(n_in, hidden) for _ in range(members))
    layers, width = [], n_in
    for h in hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, 1))
    return torch.nn.Sequential(*layers)


class Ensemble(torch.nn.ModuleList):
    """Networks trained from different seeds; the score is the mean of their outputs (for
    objective lambda: of their logits). Averaging seeds is what makes the predictor transfer to
    another book: on the demo (trained on Persuasion, scored on Northanger Abbey, skip 0.6, the
    predicted lambda) 10 members give up +0.96% / +0.78% perplexity where one gives up +1.13% /
    +0.96% (the demo's datastore / its PCA one; benchmarks/adaptive_predictor.py)."""

    def forward(self, x):
        return torch.stack([m(x) for m in self]).mean(0)


def _checksum(payload):
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _payload(meta):
    """The fields a checksum covers: everything that changes a prediction or a threshold."""
    payload = {k: meta.get(k) for k in ("feature_names", "hidden", "mean", "std", "params", "calibration",
                                        "objective", "ngrams")}
    if meta.get("members", 1) != 1:  # absent from version 1 files, whose checksums stay valid
        payload["members"] = meta["members"]
    return payload


def stats_path(predictor_path):
    """Where a predictor's n-gram statistics live: PRED.json -> PRED.ngrams.npz, beside it."""
    root, ext = os.path.splitext(predictor_path)
    return f"{root if ext == '.json' else predictor_path}.ngrams.npz"


class Predictor:
    """The trained network and what it needs: feature names, normalization, calibration.

    `scores(features)` -> (N,) float32, higher where the search helps more: the logit of the
    predicted lambda (objective "lambda") or the predicted gain in nats (objective "gain").
    With n-gram features (`ngrams`: `knnlm.retrieval.adaptive.ngrams.NgramStats` of the datastore's text, saved
    beside the predictor), `inputs(TokenFeatures(lm, context))` builds the network's input.
    """

    def __init__(self, meta, net, path=None, ngrams=None):
        self.meta, self.net, self.path, self.ngrams = meta, net.eval(), path, ngrams
        self.feature_names = list(meta["feature_names"])
        self.top_k = int(meta["top_k"])
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32)
        self.std = torch.tensor(meta["std"], dtype=torch.float32)
        self.calibration = np.asarray(meta["calibration"], dtype=np.float64)
        self.objective = meta.get("objective", "lambda")

    # ---- building and saving ----
    @classmethod
    def from_net(cls, net, *, hidden, mean, std, top_k, calibration, info, objective="lambda", ngrams=None):
        """A predictor from a trained net (or `Ensemble`); `info` adds the provenance (export,
        fingerprints, ...); `ngrams`: the NgramStats whose features follow the LM's in the input."""
        params = {k: v.detach().cpu().double().tolist() for k, v in net.state_dict().items()}
        names = feature_names(top_k) + (ngrams.feature_names if ngrams is not None else [])
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "feature_names": names,
                "top_k": int(top_k), "hidden": [int(h) for h in hidden], "mean": [float(x) for x in mean],
                "std": [float(x) for x in std], "params": params,
                "calibration": [float(x) for x in calibration], "objective": objective,
                "members": len(net) if isinstance(net, Ensemble) else 1, **info}
        if ngrams is not None:
            meta["ngrams"] = {"orders": list(ngrams.orders), "checksum": None}
        meta["checksum"] = _checksum(_payload(meta))
        return cls(meta, net, ngrams=ngrams)

    def save(self, path, overwrite=False):
        """Write the predictor (JSON) and, with n-gram features, its statistics beside it: both
        under temporary names, moved into place once whole (knnlm.artefacts.AtomicOutput); an
        existing file at either name is replaced only with `overwrite`."""
        targets = ([stats_path(path)] if self.ngrams is not None else []) + [path]
        output = AtomicOutput(targets, what=f"predictor {path}", overwrite=overwrite,
                              option="--overwrite (or choose another --out)")
        with output:
            if self.ngrams is not None:
                # The predictor records the statistics' checksum: another file in their place is refused.
                self.meta["ngrams"] = {"orders": list(self.ngrams.orders),
                                       "checksum": self.ngrams.save(output.path(stats_path(path)), overwrite=True)}
                self.meta["checksum"] = _checksum(_payload(self.meta))
            with open(output.path(path), "w") as f:
                json.dump(self.meta, f, indent=2, sort_keys=True, default=str)
            output.commit()
        if self.ngrams is not None:
            self.ngrams.path = stats_path(path)
        self.path = path

    @classmethod
    def load(cls, path):
        """Read and check a predictor file; a damaged or foreign one is refused by name."""
        if not os.path.isfile(path):
            raise KNNLMError(f"no adaptive-retrieval predictor at {path} (written by knnlm-adaptive train)")
        meta = read_json(path, f"predictor {path}")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise CorruptError(f"{path} is not an adaptive-retrieval predictor (format {found!r}); "
                               f"write one with knnlm-adaptive train")
        if meta.get("format_version") not in READS_VERSIONS:
            raise CorruptError(f"predictor {path} has format version {meta.get('format_version')}; "
                               f"this code reads versions {', '.join(map(str, READS_VERSIONS))}")
        try:
            if meta.get("checksum") != _checksum(_payload(meta)):
                raise CorruptError(f"predictor {path} fails its checksum: its weights, normalization or "
                                   f"calibration were changed or damaged. Train it again")
            top_k = int(meta["top_k"])
            if meta.get("objective", "lambda") not in OBJECTIVES:
                raise CorruptError(f"predictor {path} has objective {meta.get('objective')!r}, not one of "
                                   f"{', '.join(OBJECTIVES)}; train it again")
            ngrams = meta.get("ngrams")
            orders = tuple(ngrams["orders"]) if ngrams else ()
            if meta["feature_names"] != feature_names(top_k) + (ngram_feature_names(orders) if ngrams else []):
                raise CorruptError(f"predictor {path} expects features {meta['feature_names']}, which this "
                                   f"code does not compute; train it again")
            n_in = len(meta["feature_names"])
            if len(meta["mean"]) != n_in or len(meta["std"]) != n_in or len(meta["calibration"]) < 2:
                raise CorruptError(f"predictor {path}: its normalization or calibration has the wrong length")
            members = meta.get("members", 1)
            if isinstance(members, bool) or not isinstance(members, int) or members < 1:
                raise CorruptError(f"predictor {path}: members must be a count >= 1, got {members!r}")
            net = build_net(n_in, meta["hidden"], members)
            state = {k: torch.tensor(v, dtype=torch.float32) for k, v in meta["params"].items()}
            net.load_state_dict(state)
        except CorruptError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CorruptError(f"predictor {path} is damaged ({e.__class__.__name__}: {e}); train it again") from None
        stats = None
        if ngrams:
            where = stats_path(path)
            if not os.path.isfile(where):
                raise KNNLMError(f"predictor {path} reads n-gram features, but its statistics {where} (written "
                                 f"beside it by knnlm-adaptive train) are missing: keep the two files together")
            verify_checksum(where, ngrams.get("checksum"), f"the n-gram statistics of predictor {path}")
            stats = NgramStats.load(where)
            if tuple(stats.orders) != orders:
                raise CorruptError(f"n-gram statistics {where} hold orders {list(stats.orders)}, predictor {path} "
                                   f"reads {list(orders)}; train it again")
        return cls(meta, net, path, ngrams=stats)

    @property
    def needs_context(self):
        """Whether the input includes n-gram features (then each token's context tokens are needed)."""
        return self.ngrams is not None

    def inputs(self, state):
        """The network's (N, F) input from `TokenFeatures` (or a bare (N, F_lm) LM-feature tensor
        for a predictor without n-gram features)."""
        lm, context = (state.lm, state.context) if isinstance(state, TokenFeatures) else (state, None)
        if self.ngrams is None:
            return lm
        if context is None:
            raise ConfigError(f"predictor {self.path or ''} reads n-gram features of each token's context: pass "
                              f"state=knnlm.retrieval.adaptive.features.TokenFeatures(lm_features, knnlm.retrieval.adaptive.ngrams.context_tokens(...))")
        lm = torch.as_tensor(lm).detach().to("cpu", torch.float32)
        return torch.cat([lm, torch.from_numpy(self.ngrams.features(context))], dim=1)

    # ---- using it ----
    @torch.no_grad()
    def scores(self, features):
        """(N, F) LM features (`knnlm.retrieval.adaptive.features.lm_features`) -> (N,) float32 scores, on the CPU."""
        x = torch.as_tensor(features).detach().to("cpu", torch.float32)
        if x.ndim != 2 or x.shape[1] != len(self.feature_names):
            raise ConfigError(f"adaptive retrieval: the predictor takes {len(self.feature_names)} features per "
                              f"token ({', '.join(self.feature_names)}), got an array of shape {tuple(x.shape)}")
        x = (x.clamp(min=FEATURE_FLOOR) - self.mean) / self.std
        return self.net(x).squeeze(-1)

    def lmbda(self, features):
        """The predicted per-token lambda, (N,) in [0, 1] (objective lambda only)."""
        if self.objective != "lambda":
            raise ConfigError(f"predictor {self.path} predicts the gain of a search, not a lambda")
        return torch.sigmoid(self.scores(features))

    def threshold_for_skip(self, skip):
        """The score below which a token is skipped so that a fraction `skip` of the calibration
        tokens is; skip 0 skips nothing (-inf), whatever a new token scores."""
        check_skip(skip)
        if skip == 0:
            return -math.inf
        grid = np.linspace(0.0, 1.0, len(self.calibration))
        return float(np.interp(skip, grid, self.calibration))

    def threshold_from(self, threshold):
        """The score cut of `--adaptive-threshold X`: logit(X) for a lambda, X itself for a gain."""
        if self.objective == "lambda":
            check_threshold(threshold)
            return logit(float(threshold))
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ConfigError(f"--adaptive-threshold is a predicted gain in nats for this predictor, got {threshold!r}")
        return float(threshold)

    def check_compatible(self, *, datastore=None, identity=None, allow_model_mismatch=False):
        """Refuse, by name, a predictor trained on another datastore's or another model's export."""
        m, where = self.meta, self.path or "the predictor"
        if datastore is not None and m.get("datastore_fingerprint") not in (None, datastore.fingerprint):
            raise MismatchError(
                f"predictor {where} was trained on an export scored with datastore {m.get('datastore')} "
                f"(fingerprint {m.get('datastore_fingerprint')}), not {datastore.prefix} "
                f"({datastore.fingerprint}): its predictions of where p_kNN helps belong to that datastore. "
                f"Export with this datastore and train again")
        if identity is None:
            return
        ident = identity if isinstance(identity, dict) else identity.as_dict()
        if m.get("dict_fingerprint") is not None and m["dict_fingerprint"] != ident.get("dict_fingerprint"):
            raise MismatchError(f"predictor {where} was trained with another dictionary (fingerprint "
                                f"{m['dict_fingerprint']}) than this model's ({ident.get('dict_fingerprint')})")
        if (m.get("model_fingerprint") is not None and ident.get("model_fingerprint") is not None
                and m["model_fingerprint"] != ident["model_fingerprint"] and not allow_model_mismatch):
            raise MismatchError(f"predictor {where} was trained on the features of other model weights "
                                f"(fingerprint {m['model_fingerprint']}) than the model scoring now "
                                f"({ident['model_fingerprint']}); train it on this model's export")


def check_skip(skip, name="--adaptive-skip"):
    if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not 0 <= skip < 1:
        raise ConfigError(f"{name} is the fraction of tokens not searched, in [0, 1), got {skip!r}")


def check_threshold(threshold, name="--adaptive-threshold"):
    """A threshold that is a predicted lambda (the default objective's); a gain predictor takes any number."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ConfigError(f"{name} is a predicted lambda in [0, 1] (tokens below it are not searched), got {threshold!r}")


def logit(p):
    """log(p / (1 - p)), -inf at 0 and inf at 1."""
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return math.log(p) - math.log1p(-p)


@register_wrapper("adaptive")
class AdaptiveRetriever(Wrapper):
    """`base` (FaissRetriever, ExactRetriever, ...) searches only the tokens the predictor keeps.

    predictor: a `Predictor` or the path of one. Exactly one of skip (target fraction of tokens
    not searched, in [0, 1)) and threshold (tokens scored below it are not searched: a predicted
    lambda in [0, 1], or a predicted gain in nats, by the predictor's objective); neither means
    skip 0. per_token_lambda: return each token's predicted lambda with its neighbors
    (`Neighbors.lmbda`, used by KNNLM instead of its constant; objective lambda only). Each call's `Context` carries the (N, 1 + top_k) LM features of the queries
    (`knnlm.retrieval.adaptive.features.lm_features(log_probs, self.top_k)`) and, for a predictor with n-gram
    features, their context tokens.
    """

    unsearched = "lm_only"

    @classmethod
    def enabled(cls, opts):
        return bool(opts.adaptive_retrieval)

    @classmethod
    def validate_options(cls, opts, export=None):
        skip, threshold = opts.adaptive_skip, opts.adaptive_threshold
        per_token = getattr(opts, "adaptive_lambda", False)
        if not opts.adaptive_retrieval:
            if skip is not None or threshold is not None or per_token:
                flag = ("--adaptive-skip" if skip is not None else "--adaptive-threshold" if threshold is not None
                        else "--adaptive-lambda")
                raise ConfigError(f"{flag} is an option of adaptive retrieval: add --adaptive-retrieval PREDICTOR")
            return
        if per_token and export is not None and export.knnlm_dump_probs:
            # An export records one constant lambda, which its re-scoring tools (knnlm-tune, the
            # sweeps, knnlm-explain) apply to every token: with per-token lambdas they would be wrong.
            raise ConfigError("--adaptive-lambda mixes each token with its own predicted lambda, which an export "
                              "(--knnlm-dump-probs, one constant lambda) cannot record: export without it")
        if per_token and opts.retomaton:
            raise ConfigError("--adaptive-lambda mixes each searched token with its predicted lambda, but under "
                              "--retomaton the tokens fed by pointers have none: drop one of the two")
        if skip is not None and threshold is not None:
            raise ConfigError("adaptive retrieval takes a target skip fraction or a threshold, not both: "
                              "drop --adaptive-skip or --adaptive-threshold")
        if skip is not None:
            check_skip(skip)
        if threshold is not None and not math.isfinite(threshold):
            raise ConfigError(f"--adaptive-threshold must be a finite number, got {threshold}")
        # (its range depends on the predictor's objective, checked when the predictor is read)

    @classmethod
    def wrap(cls, base, opts):
        return cls(base, opts.adaptive_retrieval, skip=opts.adaptive_skip, threshold=opts.adaptive_threshold,
                   per_token_lambda=bool(getattr(opts, "adaptive_lambda", False)))

    def __init__(self, base, predictor, *, skip=None, threshold=None, per_token_lambda=False):
        if skip is not None and threshold is not None:
            raise ConfigError("adaptive retrieval takes a target skip fraction or a threshold, not both: "
                              "drop --adaptive-skip or --adaptive-threshold")
        super().__init__(base)
        self.predictor = predictor if isinstance(predictor, Predictor) else Predictor.load(predictor)
        self.predictor.check_compatible(datastore=self.datastore)
        if per_token_lambda and self.predictor.objective != "lambda":
            raise ConfigError(f"--adaptive-lambda mixes with the predictor's per-token lambda, but predictor "
                              f"{self.predictor.path or ''} has objective {self.predictor.objective!r}: it predicts "
                              f"the gain of a search, not a lambda. Train one with knnlm-adaptive train "
                              f"--objective lambda, or drop --adaptive-lambda")
        self._per_token_lambda = bool(per_token_lambda)
        if threshold is not None:
            self.setting, self.cut = f"threshold {threshold:g}", self.predictor.threshold_from(threshold)
        else:
            skip = 0.0 if skip is None else skip
            check_skip(skip)
            self.setting, self.cut = f"skip {skip:g}", self.predictor.threshold_for_skip(float(skip))
        self.tokens = 0
        self.searched = 0
        self.last_kept = None  # which queries of the last call were searched
        self._memo = None  # (a call's whole context, its tokens' scores): see _scores

    @property
    def per_token_lambda(self):
        return self._per_token_lambda

    @property
    def top_k(self):
        return self.predictor.top_k

    @property
    def lm_feature_top_k(self):
        return self.predictor.top_k

    @property
    def needs(self):
        own = {"lm_features", "context_tokens"} if self.predictor.needs_context else {"lm_features"}
        return frozenset(own) | frozenset(getattr(self.base, "needs", ()))

    def summary(self):
        saved = 1.0 - self.searched / self.tokens if self.tokens else 0.0
        return {"tokens": self.tokens, "searched": self.searched, "searches_saved": saved}

    def describe(self):
        s = self.summary()
        lam = ", per-token lambda" if self.per_token_lambda else ""
        return f"adaptive {self.setting}{lam}: {100 * s['searches_saved']:.1f}% of {s['tokens']:,} searches saved"

    @property
    def needs_context(self):
        return self.predictor.needs_context

    def keep(self, features):
        """(N,) bool on the CPU: which tokens are searched (score at or above the cut).
        features: `TokenFeatures`, or the (N, F) LM features alone."""
        return self.predictor.scores(self.predictor.inputs(features)) >= self.cut

    def _predict(self, context):
        return self.predictor.scores(self.predictor.inputs(TokenFeatures(context.lm_features, context.context_tokens)))

    def _scores(self, context):
        """The predictor's scores of the context's tokens. Rows of a larger call's context (RetoMaton
        asks about a few tokens per round) are scored with the whole call at its first round, once."""
        root, at = context.origin if context.origin is not None else (context, None)
        if at is None or root.lm_features is None or (self.predictor.needs_context and root.context_tokens is None):
            return self._predict(context)
        if self._memo is None or self._memo[0] is not root:
            self._memo = (root, self._predict(root))
        return self._memo[1][at]

    def _with_lambda(self, neighbors, scores):
        """The neighbors with each token's predicted lambda (sigmoid of its score), if asked for."""
        if not self.per_token_lambda:
            return neighbors
        lam = torch.sigmoid(scores).to(neighbors.distances.device, torch.float32)
        return dataclasses.replace(neighbors, lmbda=lam)

    def retrieve(self, queries, context=None, *, nearest_first=True):
        if context is None or context.lm_features is None:
            raise ConfigError("adaptive retrieval decides from the LM's features of each token: pass "
                              "context=knnlm.Context(lm_features=lm_features(log_probs, retriever.top_k), "
                              "context_tokens=context_tokens(...))")
        q = queries if torch.is_tensor(queries) else torch.as_tensor(np.asarray(queries))
        n = len(q)
        if len(context.lm_features) != n:
            raise ValueError(f"adaptive retrieval: {len(context.lm_features)} feature rows for {n} queries")
        with timed("predictor"):
            scores = self._scores(context)
        keep = scores >= self.cut  # as self.keep(...)
        self.last_kept = keep
        self.tokens += n
        kept = int(keep.sum())
        self.searched += kept
        if kept == n:  # nothing skipped: the base's own answer, untouched (but for the lambdas)
            return self._with_lambda(self.base.retrieve(q, context, nearest_first=nearest_first), scores)
        # Compact neighbors (Neighbors.rows): the searched tokens' rows alone, nothing allocated
        # or scored for a skipped token (KNNLM gives it p_LM untouched).
        device = q.device
        rows = keep.nonzero().squeeze(1).to(device)
        if kept:
            sub = self.base.retrieve(q[rows], context.rows(rows), nearest_first=nearest_first).dense()
        else:
            empty = lambda dtype: torch.zeros((0, self.k), dtype=dtype, device=device)  # noqa: E731
            sub = Neighbors(empty(torch.float32), empty(torch.int64), empty(torch.bool), ids=empty(torch.int64))
        out = dataclasses.replace(sub, rows=rows, retrieved=keep.to(device), searched=None, lmbda=None)
        return self._with_lambda(out, scores)
