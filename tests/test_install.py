"""A non-editable install works from any directory: the wheel carries the default configs.

The wheel is built from this checkout and unpacked into a folder put first on PYTHONPATH, so
the tools below run the installed copy (checked), from a directory that is not the checkout.
"""

import os
import subprocess
import sys
import zipfile

import numpy as np

from tests.conftest import REPO


def test_wheel_ships_the_configs_and_its_tools_run_elsewhere(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(REPO)], check=True, capture_output=True, cwd=str(tmp_path))
    (wheel,) = wheels.glob("knnlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for need in ("knnlm/configs/build_index.yaml", "knnlm/configs/demo/austen.yaml", "knnlm/model.py",
                 "fairseq_plugins/task.py"):
        assert need in names, f"{need} is not in the wheel"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONWARNINGS="ignore")

    def py(*args):
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=str(work), env=env)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return p.stdout

    assert py("-c", "import knnlm; print(knnlm.__file__)").startswith(str(site))
    # A small datastore and export, made with the installed package's own writers.
    py("-c", """
import numpy as np
from knnlm import DatastoreWriter
from knnlm.offline.export import ExportWriter
rng = np.random.default_rng(0)
w = DatastoreWriter("ds", 8, keytype="x", dict_size=20, dict_fingerprint="f")
w.add(rng.normal(size=(2000, 8)).astype(np.float32), rng.integers(0, 20, size=2000))
w.finalize()
e = ExportWriter("export", 4, sim_func="l2", temperature=1.0, lmbda=0.25)
d = np.sort(rng.uniform(1, 5, size=(50, 4)), axis=1).astype(np.float32)
match = rng.random((50, 4)) < 0.3
s = -d; lse = lambda x: np.log(np.exp(x).sum(1))
lp_knn = np.where(match.any(1), np.log((np.exp(s) * match).sum(1) + 1e-300) - lse(s), -np.inf)
e.add(np.full(50, -2.0, np.float32), lp_knn.astype(np.float32), np.zeros(50, np.int64), dists=d, match=match)
e.finalize()
""")
    out = py("-m", "knnlm.index.builder", "dstore_mmap=ds", "faiss_index=knn.index", "code_size=4")
    assert "built knn.index" in out and "IVF" in out  # the defaults of configs/build_index.yaml, installed
    out = py("-m", "knnlm.offline.tune", "export", "--lambdas", "0:1:0.25")
    assert "best (lambda=" in out
    assert np.isfinite(float(out.split("base LM (lambda=0):")[1].split("ppl")[1].split()[0]))


def test_composing_a_config_leaves_fairseqs_hydra_usable_in_the_same_process():
    # knnlm.config.compose used to leave hydra's version base at 1.3, after which fairseq's
    # hydra.experimental.initialize raises ImportError (the analyses' in-process evaluations).
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from knnlm.config import compose

    compose("build_index")
    args = options.parse_args_and_arch(options.get_eval_lm_parser(), input_args=["data-bin", "--path", "x.pt"])
    cfg = convert_namespace_to_omegaconf(args)
    assert cfg.common_eval.path == "x.pt"
