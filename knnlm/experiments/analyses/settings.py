"""The analyses' settings: which analyses there are, their titles, the papers' numbers, and
loading configs/demo/analyses.yaml with the demo's config."""

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ...config import config_path, load_yaml
from ...errors import ConfigError
from .. import demo as demo_mod
from ..demo import DemoError, load_config

DEFAULT_CONFIG = config_path("demo/analyses")
ANALYSES = ("k", "lambda", "size", "keytype", "approx", "domain", "beyond")
TITLES = {
    "shared": "shared (valid slice, full-datastore export on it)",
    "k": "1. perplexity vs k (Figure 4)",
    "lambda": "2. perplexity vs lambda and T (Figure 5)",
    "size": "3. datastore size (Figure 2a/2b)",
    "keytype": "4. key types (Table 5)",
    "approx": "5. exact vs approximate neighbors and scores (Xu et al. 2023, Table 3, Figure 4)",
    "domain": "6. domain adaptation (Table 4, Figure 5 right)",
    "beyond": "7. a datastore beyond the training data (Table 3, Figure 2)",
}
# Analysis 5's three ways to score a datastore (Xu et al. 2023's names): label, knn search, sim func.
APPROX = {
    "faiss": ("FAISS neighbors, FAISS scores", "faiss", "do_not_recomp_l2"),
    "l2": ("FAISS neighbors, exact scores", "faiss", "l2"),
    "exact": ("exact neighbors, exact scores", "exact", "l2"),
}
# Xu et al. 2023, Table 3 (WikiText-103, full datastore, lambda and T tuned; base LM 21.750).
APPROX_PAPER = {"faiss": 19.174, "l2": 19.672, "exact": 19.735}
# Khandelwal et al. 2020, Table 3 (WIKI-3B dev, test): the 100M-token LM with a 3B-token
# datastore beats the LM trained on all 3B tokens.
BEYOND_PAPER = {"a": (20.99, 19.59), "c": (14.61, 13.73), "d": (16.11, 15.17)}
# The paper's Table 5 (WikiText-103 dev perplexity, k=1024, lambda tuned); base LM 17.96.
KEYTYPE_PAPER = {
    "decoder_output": ("Model output", 17.07),
    "decoder_output_ln": ("Model output layer normalized", 17.01),
    "last_ffn_input": ("FFN input after layer norm", 16.06),
    "last_ffn_input_before_ln": ("FFN input before layer norm", 17.06),
    "last_attn_input": ("MHSA input after layer norm", 16.76),
    "last_attn_input_before_ln": ("MHSA input before layer norm", 17.14),
}
TABLE_LAMBDAS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# The demo's last step the analyses need: its tuned lambda and T on the valid export.
DEMO_LAST_STEP = "tune"

log = logging.getLogger("knnlm.analyses")


def load_configs(overrides=(), path=DEFAULT_CONFIG):
    """(analyses config, demo config) from `key=value` overrides; `demo.KEY=v` goes to the demo's."""
    demo_over = [o[len("demo."):] for o in overrides if o.startswith("demo.")]
    own = [o for o in overrides if not o.startswith("demo.")]
    try:
        cfg = load_yaml(path, own)
    except ConfigError as e:
        raise DemoError(str(e)) from None
    unknown = [a for a in cfg.run if a not in ANALYSES]
    if unknown:
        raise DemoError(f"run: unknown analyses {unknown}; known: {list(ANALYSES)}")
    for name in ("valid_fraction", "test_fraction"):
        if not 0 < cfg.eval[name] <= 1:
            raise DemoError(f"eval.{name} must lie in (0, 1], got {cfg.eval[name]}")
    for f in [*cfg.size.fractions, *(cfg.approx.fractions or []), cfg.keytype.train_fraction,
              cfg.domain.dstore_fraction]:
        if not 0 < f <= 1:
            raise DemoError(f"datastore and text fractions must lie in (0, 1], got {f}")
    if "beyond" in cfg.run:
        beyond_books(cfg)
    demo_path = Path(cfg.demo_config) if cfg.demo_config else demo_mod.DEFAULT_CONFIG
    return cfg, load_config(demo_over, demo_path), demo_over, demo_path


def beyond_books(cfg):
    """(the beyond LM's training books, the rest of the demo's), canonical titles, checked."""
    from ..corpora.austen import BOOK_TITLES, canonical_title

    train = BOOK_TITLES[:4]  # the demo's training books (knnlm.demo builds the default corpus)
    try:
        part = [canonical_title(b) for b in cfg.beyond.train_books]
    except ValueError as e:
        raise DemoError(f"beyond.train_books: {e}") from None
    if not part or len(set(part)) != len(part) or not set(part) < set(train):
        raise DemoError(f"beyond.train_books must be some, not all, of the demo's training books "
                        f"{list(train)}, each once; got {list(cfg.beyond.train_books)}")
    return [b for b in train if b in part], [b for b in train if b not in part]


def _plain(x):
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) or OmegaConf.is_list(x) else x


def fkey(f):
    return f"{float(f):g}"


def demo_lambdas(dcfg):
    """The demo's lambda grid: tune.lambda_step (0..1) or tune.lambdas (a knnlm-tune grid)."""
    t = dcfg.tune
    if "lambda_step" in t:
        return f"0:1:{t.lambda_step}"
    if "lambdas" in t:
        return str(t.lambdas)
    return "0:1:0.01"


def _plain_tree(x):
    if isinstance(x, dict):
        return {k: _plain_tree(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain_tree(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return _plain(x)
