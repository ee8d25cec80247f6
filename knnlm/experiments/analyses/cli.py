"""`python -m knnlm.experiments.analyses` (make analyses): the command line."""

import argparse
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..demo import DemoError
from .plan import Analyses
from .settings import DEFAULT_CONFIG, load_configs


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m knnlm.experiments.analyses",
        description="The kNN-LM paper's analyses (Figures 2, 4, 5; Tables 3, 4, 5; Xu et al. 2023's exact vs "
                    "approximate neighbors and scores) on the demo's Jane Austen LM, datastore and index.",
        epilog="Settings: any field of configs/demo/analyses.yaml as key=value (run=[k,lambda], "
               "eval.valid_fraction=1); the demo's as demo.key=value (demo.workdir=demo_runs/other).")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config (default %(default)s)")
    p.add_argument("--austen-dir", metavar="DIR", help="local copy of the books (as knnlm.demo's --austen-dir)")
    p.add_argument("--print-config", action="store_true", help="print both configs and exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(asctime)s | analyses | %(message)s", datefmt="%H:%M:%S",
                        level=logging.INFO, stream=sys.stdout)
    overrides = list(args.overrides)
    if args.austen_dir:
        overrides.append(f"demo.austen_dir={Path(args.austen_dir).expanduser().resolve()}")
    try:
        cfg, dcfg, demo_over, demo_path = load_configs(overrides, args.config)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg) + "# demo:\n" + OmegaConf.to_yaml(dcfg), end="")
            return 0
        Analyses(cfg, dcfg, demo_over, demo_path, overrides).run()
    except DemoError as e:
        print(f"knnlm.analyses: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("knnlm.analyses: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
