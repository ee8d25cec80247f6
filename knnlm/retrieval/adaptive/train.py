"""knnlm-adaptive: train the adaptive-retrieval predictor (He et al., EMNLP 2021, section 4) on a
per-token export, and print the curve of skipped fraction vs perplexity.

    knnlm-adaptive train EXPORT_DIR --out PRED.json [--lmbda L --knn-temp T | --tune-json best.json]
    knnlm-adaptive curve EXPORT_DIR --predictor PRED.json        # the curve on another export

The export must hold the LM features (features.npy: written by `--knnlm-dump-probs` since
adaptive retrieval exists). The network reads them and, when the export holds each token's
context tokens (context.npy), the paper's n-gram features too (`knnlm.retrieval.adaptive.ngrams`: count and
fertility of the context's last 1..4 tokens in the text of the export's datastore, counted here
and saved beside the predictor as PRED.ngrams.npz; --no-ngrams leaves them out), and scores
each token, with p_kNN at the temperature the kNN-LM will use. `--objective lambda` (the paper's): a per-token lambda trained
to maximize log(lambda p_kNN + (1 - lambda) p_LM). `--objective gain`: a regression (squared
error) on the gain of the kNN-LM at its constant lambda over p_LM alone, log(lambda p_kNN +
(1 - lambda) p_LM) - log p_LM: what skipping a token gives up, so ranking by it is what the
skip decision needs. At evaluation the lowest-scored tokens skip the search and get p_LM alone;
the others get the kNN-LM with its constant lambda (or, `--adaptive-lambda`, their predicted one).

`--ensemble N` (default 10, each network `--epochs` 10) trains N networks from seeds SEED..SEED+N-1
and averages their scores: chosen by cross-validation on the demo's test export, and it is what
transfers to another book (benchmarks/adaptive_predictor.py: on valid, skip 0.6 with the
predicted lambda costs 15-19% less perplexity than with one network of 20 epochs).

Training uses the export's first tokens; the last `--heldout` fraction (default 20%, a
contiguous tail, so no sentence is on both sides) is never trained on, and the curve is
measured there: for each target skip fraction, the threshold the predictor's calibration
gives (as `--adaptive-skip` would), the fraction actually skipped, the perplexity, and the
perplexity of skipping as many tokens at random (seeded). Deterministic for a seed.
"""

import argparse
import math
import sys
import time

import numpy as np
import torch

from ... import provenance
from ...artefacts import AtomicOutput
from ...cli import run_command
from ...errors import ConfigError, MismatchError
from ...offline.export_reader import load_export
from ...offline.rescoring import lp_knn_at, same_temperature
from ...offline.rescoring import PNG_METADATA, write_outputs
from ...scoring import check_lambda, check_temperature, interpolate
from ...store.datastore import Datastore
from .features import TokenFeatures, feature_names
from .ngrams import ORDERS, NgramStats, text_datastore
from .retriever import (ARCHS, CALIBRATION_POINTS, FEATURE_FLOOR, OBJECTIVES, Ensemble, Predictor, build_net,
                        check_skip, stats_path)

SKIPS = [i / 10 for i in range(10)]
# Defaults chosen by 5-fold cross-validation on the demo's test export (benchmarks/adaptive_predictor.py):
# 10 networks of 10 epochs each give up less perplexity at 60% skipped than one of 20.
EPOCHS = 10
ENSEMBLE = 10
IDENTITY_FIELDS = ("datastore", "datastore_fingerprint", "dim", "dict_size", "dict_fingerprint",
                   "model_fingerprint", "split", "index")


def training_data(export, lmbda=None, temperature=None, tune_json=None):
    """(features (N, F), lp_lm (N,), lp_knn (N,) at T, lambda, T) from an export with features.

    lambda and T: as given, else the tune JSON's best point, else the run's own."""
    if not export.has_features:
        raise ConfigError(
            f"export {export.path} has no LM features (features.npy): it was written before adaptive "
            f"retrieval existed. Export again (fairseq-eval-lm ... --knnlm --knnlm-dump-probs DIR)")
    if export.count == 0:
        raise ConfigError(f"export {export.path} holds no tokens")
    if tune_json is not None:
        from ...artefacts import read_json

        best = read_json(tune_json, f"tune result {tune_json}")
        try:
            lmbda = float(best["best_lambda"]) if lmbda is None else lmbda
            temperature = float(best["best_temperature"]) if temperature is None else temperature
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{tune_json} is not a knnlm-tune --json result (no best_lambda/best_temperature)") from None
    lmbda = float(export.meta["lmbda"]) if lmbda is None else float(lmbda)
    temperature = float(export.meta["temperature"]) if temperature is None else float(temperature)
    check_lambda(lmbda)
    check_temperature(temperature, "--knn-temp")
    if same_temperature(temperature, export.meta["temperature"]):
        lp_knn = np.array(export.lp_knn, dtype=np.float32)
    else:
        lp_knn = lp_knn_at(export, temperature)
    return (np.array(export.features, dtype=np.float32), np.array(export.lp_lm, dtype=np.float32),
            lp_knn, lmbda, temperature)


def mixture_nll(logits, lp_lm, lp_knn):
    """-log(lambda p_kNN + (1 - lambda) p_LM) per token, lambda = sigmoid(logits)."""
    both = torch.stack([torch.nn.functional.logsigmoid(logits) + lp_knn,
                        torch.nn.functional.logsigmoid(-logits) + lp_lm], dim=-1)
    return -torch.logsumexp(both, dim=-1)


def gain(lp_lm, lp_knn, lmbda):
    """log(lambda p_kNN + (1 - lambda) p_LM) - log p_LM per token: what a search adds (nats)."""
    a, b = torch.as_tensor(lp_lm), torch.as_tensor(lp_knn)
    return interpolate(a, b, lmbda) - a.float()


def fit(features, lp_lm, lp_knn, *, hidden=(32, 32), epochs=EPOCHS, lr=3e-3, batch_size=1024, seed=0,
        weight_decay=0.0, progress=True, objective="lambda", lmbda=None, members=1):
    """Train the network on (N, F) features: returns (net, mean, std). Seeded, deterministic.
    objective "lambda": the mixture likelihood; "gain": squared error on `gain(..., lmbda)`.
    members > 1: that many networks, seeds seed, seed + 1, ..., as one `Ensemble` (the mean of
    their outputs); members 1 is the single network of seed `seed`.

    One thread: the network is tiny, and on a busy host more threads only wait on each other
    (measured 15x slower with 2 threads under load)."""
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ConfigError(f"--ensemble is a number of networks >= 1, got {members!r}")
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    # the inputs, normalized, and the targets: once, shared by every network
    x = torch.from_numpy(np.maximum(features, FEATURE_FLOOR).astype(np.float32))
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones(x.shape[1])
    x = (x - mean) / std
    a, b = torch.from_numpy(lp_lm), torch.from_numpy(lp_knn)
    g = gain(a, b, lmbda) if objective == "gain" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=members * epochs * max(1, math.ceil(len(x) / batch_size)),
                   desc="knnlm-adaptive train", unit="step", file=sys.stderr, mininterval=1.0)
    try:
        nets = [_fit(x, a, b, g, hidden=hidden, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed + i,
                     weight_decay=weight_decay, bar=bar) for i in range(members)]
    finally:
        torch.set_num_threads(threads)
        if bar is not None:
            bar.close()
    net = nets[0] if members == 1 else Ensemble(nets)
    return net.eval(), mean, std


def _fit(x, a, b, g, *, hidden, epochs, lr, batch_size, seed, weight_decay, bar):
    """One network of seed `seed` on normalized inputs x; targets: the mixture likelihood of
    (a, b) = (lp_LM, lp_kNN), or squared error on the gains g where given."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build_net(x.shape[1], list(hidden))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    steps = max(1, math.ceil(len(x) / batch_size))
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for s in range(steps):
            i = order[s * batch_size:(s + 1) * batch_size]
            out = net(x[i]).squeeze(-1)
            loss = mixture_nll(out, a[i], b[i]).mean() if g is None else (out - g[i]).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return net.eval()


def _ppl(lp):
    return math.exp(-float(lp.double().mean()))


def curve(predictor, features, lp_lm, lp_knn, lmbda, skips=SKIPS, seed=0):
    """Rows of the curve on these tokens: for each target skip fraction, the predictor's
    threshold (as --adaptive-skip F sets it), the fraction skipped, ppl with the kNN-LM's
    constant lambda on the kept tokens, ppl when as many tokens are skipped at random, and (a
    lambda predictor) ppl with the predicted lambda on the kept tokens (the paper's variant;
    what --adaptive-lambda does)."""
    scores = predictor.scores(torch.from_numpy(features))
    a, b = torch.from_numpy(lp_lm), torch.from_numpy(lp_knn)
    full = interpolate(a, b, lmbda)
    own = -mixture_nll(scores, a, b) if predictor.objective == "lambda" else None
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(a)))
    rows = []
    for f in skips:
        check_skip(f, "a skip fraction")
        cut = predictor.threshold_for_skip(f)
        keep = scores >= cut
        skipped = 1.0 - float(keep.float().mean())
        rand = torch.ones(len(a), dtype=torch.bool)
        rand[perm[:int(round(skipped * len(a)))]] = False
        threshold = (1 / (1 + math.exp(-cut)) if predictor.objective == "lambda" else cut) if math.isfinite(cut) else (
            0.0 if predictor.objective == "lambda" else cut)
        rows.append({"skip_target": f, "threshold": threshold,
                     "skipped": skipped, "ppl": _ppl(torch.where(keep, full, a)),
                     "ppl_random": _ppl(torch.where(rand, full, a)),
                     "ppl_predicted_lambda": None if own is None else _ppl(torch.where(keep, own, a))})
    return {"tokens": len(a), "base_ppl": _ppl(a), "knnlm_ppl": _ppl(full), "objective": predictor.objective,
            "rows": rows}


def report(result, where):
    c = result
    lines = [f"{where}: {c['tokens']:,} tokens, base LM ppl {c['base_ppl']:.4f}, full kNN-LM ppl {c['knnlm_ppl']:.4f}",
             "",
             f"| skip target | threshold ({'lambda' if c['objective'] == 'lambda' else 'gain, nats'}) | skipped | ppl | "
             f"vs full kNN-LM | random skipping ppl | ppl, predicted lambda |",
             "|---|---|---|---|---|---|---|"]
    for r in c["rows"]:
        own = "—" if r["ppl_predicted_lambda"] is None else f"{r['ppl_predicted_lambda']:.4f}"
        lines.append(f"| {100 * r['skip_target']:.0f}% | {r['threshold']:.4g} | {100 * r['skipped']:.1f}% | "
                     f"{r['ppl']:.4f} | {100 * (r['ppl'] / c['knnlm_ppl'] - 1):+.2f}% | {r['ppl_random']:.4f} | {own} |")
    lines.append("")
    lines.append("ppl: skipped tokens get p_LM alone, the others the kNN-LM at its constant lambda (what "
                 "--adaptive-skip does); the last column (a lambda predictor) uses the predicted lambda "
                 "instead (what --adaptive-lambda does).")
    return "\n".join(lines)


def plot(result, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    x = [100 * r["skipped"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["ppl"] for r in rows], "o-", label="adaptive (learned)")
    ax.plot(x, [r["ppl_random"] for r in rows], "s--", label="random skipping")
    ax.axhline(result["knnlm_ppl"], color="g", ls=":", label=f"full kNN-LM ({result['knnlm_ppl']:.3f})")
    ax.axhline(result["base_ppl"], color="r", ls=":", label=f"base LM ({result['base_ppl']:.3f})")
    ax.set_xlabel("tokens not searched (%)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata=PNG_METADATA)
    plt.close(fig)


def _hidden(arch, text):
    if arch == "linear":
        return []
    try:
        hidden = [int(h) for h in text.split(",") if h.strip()]
    except ValueError:
        hidden = None
    if not hidden or min(hidden) < 1:
        raise ConfigError(f"--hidden must be a comma list of layer widths >= 1, got {text!r}")
    return hidden


def ngram_stats(export, prefix=None, orders=ORDERS):
    """The n-gram statistics of the text of the datastore the export was scored with (or of
    `prefix`): its values in order (a pruned datastore's source's)."""
    prefix = prefix or export.meta.get("datastore")
    if not prefix:
        raise ConfigError(f"export {export.path} does not name its datastore: pass --ngram-datastore PREFIX")
    ds = Datastore.open(prefix, load_keys=False)
    want = export.meta.get("datastore_fingerprint")
    if want is not None and ds.fingerprint != want and ds.meta.get("pruned_from_fingerprint") != want:
        raise MismatchError(f"datastore {prefix} ({ds.fingerprint}) is not the one export {export.path} was scored "
                            f"with ({want}): its text would give the wrong n-gram counts")
    text = text_datastore(ds)
    t0 = time.time()
    stats = NgramStats.build(text.vals, orders, source={"datastore": text.prefix,
                                                        "datastore_fingerprint": text.fingerprint})
    print(f"counted the {', '.join(map(str, stats.orders))}-grams of {text.prefix} ({text.size:,} tokens) "
          f"in {time.time() - t0:.1f} s")
    return stats


def train(args):
    # A predictor (or its statistics) already at --out is refused now, not after training.
    AtomicOutput([stats_path(args.out), args.out], what=f"predictor {args.out}", overwrite=args.overwrite,
                 option="--overwrite (or choose another --out)").check_existing()
    if not 0 < args.heldout < 1:
        raise ConfigError(f"--heldout is the fraction of the export kept out of training, in (0, 1), got {args.heldout}")
    for name in ("epochs", "batch_size", "ensemble"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    export = load_export(args.export_dir)
    features, lp_lm, lp_knn, lmbda, temperature = training_data(export, args.lmbda, args.knn_temp, args.tune_json)
    n = export.count
    cut = n - int(round(args.heldout * n))
    if cut < 1 or cut >= n:
        raise ConfigError(f"export {export.path} has {n} tokens: too few to hold out {args.heldout:g} of them")
    hidden = _hidden(args.arch, args.hidden)
    stats = None
    if args.ngrams and not export.has_context:
        print(f"note: export {export.path} has no context tokens (context.npy: written by --knnlm-dump-probs since "
              f"n-gram features exist): the predictor reads the LM features only")
    elif args.ngrams:
        stats = ngram_stats(export, args.ngram_datastore, args.ngram_orders)
        features = np.concatenate([features, stats.features(export.context)], axis=1)
    t0 = time.time()
    net, mean, std = fit(features[:cut], lp_lm[:cut], lp_knn[:cut], hidden=hidden, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, weight_decay=args.weight_decay,
                         objective=args.objective, lmbda=lmbda, members=args.ensemble)
    with torch.no_grad():
        x = (torch.from_numpy(np.maximum(features, FEATURE_FLOOR)) - mean) / std
        scores = net(x).squeeze(-1).numpy().astype(np.float64)
    calibration = np.quantile(scores, np.linspace(0.0, 1.0, CALIBRATION_POINTS))
    info = {k: export.meta.get(k) for k in IDENTITY_FIELDS}
    info.update(export=export.path, lmbda=lmbda, temperature=temperature, arch=args.arch,
                training={"tokens": cut, "heldout_tokens": n - cut,
                          "heldout": f"the last {100 * args.heldout:g}% of the export's tokens (rows {cut}..{n - 1})",
                          "ensemble": args.ensemble, "epochs": args.epochs, "lr": args.lr,
                          "batch_size": args.batch_size, "seed": args.seed,
                          "weight_decay": args.weight_decay, "seconds": round(time.time() - t0, 2)},
                calibration_on="every token of the export", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                versions=provenance.versions())
    top_k = len(export.feature_names) - 1
    predictor = Predictor.from_net(net, hidden=hidden, mean=mean.tolist(), std=std.tolist(), top_k=top_k,
                                   calibration=calibration, info=info, objective=args.objective, ngrams=stats)
    held = curve(predictor, features[cut:], lp_lm[cut:], lp_knn[cut:], lmbda, seed=args.seed)
    predictor.meta["heldout_curve"] = held  # informative, outside the checksum
    predictor.save(args.out, overwrite=args.overwrite)
    grams = (f"n-gram features of orders {list(stats.orders)} counted on {stats.meta.get('datastore')}"
             if stats is not None else "LM features only")
    print(f"trained on {cut:,} tokens of {export.path} (lambda {lmbda:g}, T {temperature:g}, {args.arch} "
          f"{hidden}{f' x {args.ensemble} seeds' if args.ensemble > 1 else ''}, objective {args.objective}, {grams}); "
          f"wrote {args.out}")
    print(report(held, f"held out (the last {100 * args.heldout:g}% of the export)"))
    write_outputs(None, None, args.plot, lambda p: plot(held, p, f"adaptive retrieval, held-out part of {export.path}"),
                  prog=args.prog, overwrite=args.overwrite)


def evaluate(args):
    predictor = Predictor.load(args.predictor)
    export = load_export(args.export_dir)
    lmbda = predictor.meta["lmbda"] if args.lmbda is None else args.lmbda
    temperature = predictor.meta["temperature"] if args.knn_temp is None else args.knn_temp
    features, lp_lm, lp_knn, lmbda, temperature = training_data(export, lmbda, temperature)
    if export.feature_names != feature_names(predictor.top_k):
        raise ConfigError(f"export {export.path} holds features {export.feature_names}, the predictor reads "
                          f"{predictor.feature_names}")
    if predictor.needs_context and not export.has_context:
        raise ConfigError(f"predictor {args.predictor} reads n-gram features of each token's context, and export "
                          f"{export.path} has no context tokens (context.npy); export again")
    context = torch.from_numpy(np.asarray(export.context)) if export.has_context else None
    features = predictor.inputs(TokenFeatures(torch.from_numpy(features), context)).numpy()
    ds_fp = export.meta.get("datastore_fingerprint")
    if ds_fp is not None and predictor.meta.get("datastore_fingerprint") not in (None, ds_fp):
        raise MismatchError(f"predictor {args.predictor} was trained with datastore {predictor.meta.get('datastore')}, "
                            f"export {export.path} was scored with {export.meta.get('datastore')}")
    predictor.check_compatible(identity={k: export.meta.get(k) for k in ("dict_fingerprint", "model_fingerprint")})
    result = curve(predictor, features, lp_lm, lp_knn, lmbda, seed=args.seed)
    print(report(result, f"{export.path} (lambda {lmbda:g}, T {temperature:g})"))
    write_outputs(args.json, lambda: result, args.plot, lambda p: plot(result, p, f"adaptive retrieval, {export.path}"),
                  prog=args.prog, overwrite=args.overwrite)


def build_parser():
    p = argparse.ArgumentParser(
        prog="knnlm-adaptive",
        description="Adaptive retrieval (He et al. 2021): train the predictor of where p_kNN helps on a "
                    "per-token export with LM features, and print skipped fraction vs perplexity.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a predictor on an export (its last --heldout part measures the curve)")
    t.add_argument("export_dir", metavar="EXPORT_DIR")
    t.add_argument("--out", required=True, metavar="PREDICTOR", help="the predictor file to write (JSON)")
    t.add_argument("--arch", choices=ARCHS, default="mlp", help="mlp (default) or linear (logistic/linear regression)")
    t.add_argument("--objective", choices=OBJECTIVES, default="lambda",
                   help="lambda: a per-token lambda maximizing the mixture likelihood (the paper's; default); gain: "
                        "regress the kNN-LM's gain over p_LM at the constant lambda")
    t.add_argument("--hidden", default="32,32", help="--arch mlp: hidden layer widths (default %(default)s)")
    t.add_argument("--ensemble", type=int, default=ENSEMBLE, metavar="N",
                   help="train N networks (seeds SEED..SEED+N-1) and average their scores: transfers better to "
                        "other text than one network (default %(default)s; 1: a single network)")
    t.add_argument("--epochs", type=int, default=EPOCHS, help="of each network (default %(default)s)")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--batch-size", type=int, default=1024)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--heldout", type=float, default=0.2,
                   help="fraction of the export, at its end, kept out of training to measure the curve (default %(default)s)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing predictor file")
    t.add_argument("--no-ngrams", dest="ngrams", action="store_false",
                   help="the LM features only (default: also the n-gram features of each token's context in the "
                        "datastore's text, the paper's freq and fert, when the export has context.npy)")
    t.add_argument("--ngram-orders", type=int, nargs="+", default=list(ORDERS), metavar="N",
                   help="n-gram orders of those features (default: %(default)s)")
    t.add_argument("--ngram-datastore", metavar="PREFIX",
                   help="count the n-grams of this datastore's text (default: the export's datastore)")
    c = sub.add_parser("curve", help="the curve of a trained predictor on a whole export")
    c.add_argument("export_dir", metavar="EXPORT_DIR")
    c.add_argument("--predictor", required=True)
    c.add_argument("--json", metavar="JSON", help="write the curve")
    c.add_argument("--overwrite", action="store_true", help="replace a --json/--plot file this library did not write")
    for q in (t, c):
        q.add_argument("--lmbda", type=float, help="the kNN-LM's lambda (default: --tune-json's, else the export's run)")
        q.add_argument("--knn-temp", type=float, help="the kNN-LM's temperature (default: --tune-json's, else the export's run)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--plot", metavar="PNG", help="write skipped fraction vs perplexity")
    t.add_argument("--tune-json", metavar="JSON", help="take lambda and T from a knnlm-tune --json result (best point)")
    return p


def _run(args):
    (train if args.command == "train" else evaluate)(args)


def main(argv=None):
    return run_command("knnlm-adaptive", build_parser(), _run, argv)


if __name__ == "__main__":
    sys.exit(main())
