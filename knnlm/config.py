"""Default configs (hydra-core YAML) and loading them: one helper for every tool.

The defaults live in the checkout's `configs/` folder; a wheel ships the same files as the
package data `knnlm.configs`, so a non-editable `pip install .` finds them from any directory.
"""

import importlib.util
import re
from pathlib import Path

from .errors import ConfigError


def config_dir():
    """The folder of the default configs: the installed package data, else the checkout's configs/."""
    try:
        spec = importlib.util.find_spec("knnlm.configs")  # a namespace package: data only, no __init__
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"  # an editable install or a plain checkout


def config_path(name):
    """configs/NAME.yaml (NAME may contain a folder, e.g. 'demo/austen')."""
    path = config_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"the default config {path} is missing: reinstall knnlm (`pip install .`), "
                          f"or run from a checkout of it")
    return path


def compose(name, overrides=(), known=None):
    """configs/NAME.yaml with hydra `key=value` overrides, through hydra's compose API.

    known: the field names, for a message that lists them when an override names another.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra import version as hydra_version
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    path = config_path(name)
    # compose needs its own GlobalHydra; if a hydra app already holds one, lend it back after.
    gh = GlobalHydra.instance()
    saved = gh.hydra if gh.is_initialized() else None
    # version_base=None sets hydra's process-wide version base to 1.3; fairseq's own
    # hydra.experimental.initialize (convert_namespace_to_omegaconf) then raises ImportError in
    # this process. The base is put back as it was.
    base = hydra_version.VersionBase.instance()
    saved_base = base.getbase()
    gh.clear()
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base=None):
            return hydra_compose(config_name=path.stem, overrides=list(overrides))
    except HydraException as e:
        msg = str(e).splitlines()[0]
        m = re.match(r"Could not override '([^']+)'", msg)
        if m:
            msg = f"unknown setting '{m[1]}'" + (f" (known: {', '.join(known)})" if known else "")
        elif "Ambiguous value" in msg:
            msg += "; quote values that hold commas, e.g. \"factory='IVF4096,PQ64'\""
        elif "LexerNoViableAlt" in msg or "mismatched input" in msg or "no viable alternative" in msg:
            msg = _grammar_hint(overrides, msg)
        raise ConfigError(msg) from None
    finally:
        base.version_base = saved_base
        if saved is not None:
            GlobalHydra.instance().hydra = saved


def _grammar_hint(overrides, msg):
    """Hydra's parser error for a key=value whose value holds spaces with other special
    characters, rewritten to name the setting and the fix."""
    special = re.compile(r"[\s!()\[\]{}=,<>\\\"]")
    bad = [o for o in overrides if special.search(o.partition("=")[2]) and not re.match(r"^[^=]+=(['\"]).*\1$", o)]
    if not bad:
        return f"cannot read the settings ({msg})"
    key, _, value = bad[0].partition("=")
    quoted = value.replace("\\", "\\\\").replace("'", "\\'")
    return (f"cannot read the setting {bad[0]!r}: a value with spaces or characters such as ! ( ) [ ] = , "
            f"must be quoted: \"{key}='{quoted}'\" (or pass --{key} VALUE)")


def load_yaml(path, overrides=()):
    """A YAML file with dotlist `key=value` overrides (unknown keys refused), resolved.

    For configs that are not hydra apps' (the demo's); errors are ConfigErrors naming the setting.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"settings must look like key=value, got {bad}")
    try:
        cfg = OmegaConf.load(path)
        OmegaConf.set_struct(cfg, True)
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad setting: {str(e).splitlines()[0]}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    return cfg
