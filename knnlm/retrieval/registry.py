"""Strategies by name, and the one factory every front-end calls.

    @register_strategy("brute")             # --knn-search brute, on every front-end
    class BruteForce(Retriever):
        @classmethod
        def from_options(cls, opts, datastore): return cls(datastore, k=opts.k, sim_func=opts.knn_sim_func)

    knn = knnlm.build(opts)                 # RetrievalOptions -> KNNLM (knnlm/retrieval/factory.py)

A strategy searches (`faiss`, `exact`, a researcher's own); a wrapper composes over whichever
strategy was chosen (RetoMaton, adaptive retrieval) when its options are set, in registration
order. A module defining strategies is imported by `--knn-user-module PATH` (fairseq's
`--user-dir` idea) or named by a `knnlm.retrievers` entry point of an installed package.
"""

import importlib
import importlib.util
import logging
import os
import sys

from ..errors import ConfigError

logger = logging.getLogger(__name__)

_STRATEGIES = {}
_VARIANTS = {}  # name -> [(when(opts), cls)]: the same strategy served another way
_WRAPPERS = {}
_LOADED = {"builtins": False, "entry_points": False}
ENTRY_POINT_GROUP = "knnlm.retrievers"


def register_strategy(name, when=None):
    """Class decorator: `--knn-search NAME` builds this class with `cls.from_options(opts, datastore)`.

    The class may define `validate_options(opts)` (a classmethod that raises ConfigError before
    anything is loaded). With `when` (a function of the options), the class is a variant of the
    strategy NAME, built instead of it when `when(opts)` holds (FAISS search over an index kept in
    parts, or with --knn-executor, is the `faiss` strategy served by several searchers)."""

    def decorate(cls):
        if not hasattr(cls, "from_options"):
            raise TypeError(f"strategy {name!r}: {cls.__name__} needs a from_options(opts, datastore) classmethod")
        if when is not None:
            cls.strategy_name = name
            _VARIANTS.setdefault(name, []).append((when, cls))
            return cls
        old = _STRATEGIES.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"two strategies named {name!r}: {old.__module__}.{old.__qualname__} and "
                              f"{cls.__module__}.{cls.__qualname__}")
        cls.strategy_name = name
        _STRATEGIES[name] = cls
        return cls

    return decorate


def register_wrapper(name):
    """Class decorator for a strategy over another: `cls.enabled(opts)` says whether the options
    ask for it, `cls.wrap(base, opts)` builds it, `cls.validate_options(opts, export=None)` checks them."""

    def decorate(cls):
        for attr in ("enabled", "wrap", "validate_options"):
            if not hasattr(cls, attr):
                raise TypeError(f"wrapper {name!r}: {cls.__name__} needs a classmethod {attr}")
        cls.wrapper_name = name
        _WRAPPERS[name] = cls
        return cls

    return decorate


def _load_builtins():
    if not _LOADED["builtins"]:
        _LOADED["builtins"] = True
        importlib.import_module("knnlm.retrieval.builtin")


def load_entry_points():
    """Import the modules installed packages name under the `knnlm.retrievers` entry point group."""
    if _LOADED["entry_points"]:
        return
    _LOADED["entry_points"] = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:  # noqa: BLE001 - one broken plugin must not hide the others' names
            raise ConfigError(f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}) failed to import: {e}") from e


def load_user_module(path):
    """Import a file (`my_strategy.py`) or package directory so its registrations run; once per path."""
    if not path:
        return
    path = os.path.abspath(os.path.expanduser(str(path)))
    if not os.path.exists(path):
        raise ConfigError(f"--knn-user-module {path}: no such file or directory")
    directory, base = os.path.split(path.rstrip(os.sep))
    name = "knnlm_user_" + os.path.splitext(base)[0].replace("-", "_").replace(".", "_")
    if name in sys.modules:
        return sys.modules[name]
    target = os.path.join(path, "__init__.py") if os.path.isdir(path) else path
    if not os.path.isfile(target):
        raise ConfigError(f"--knn-user-module {path}: a directory without __init__.py")
    spec = importlib.util.spec_from_file_location(name, target,
                                                  submodule_search_locations=[path] if os.path.isdir(path) else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


def load_from_argv(argv):
    """Import `--knn-user-module PATH` from a command line before its parser is built, so the
    module's strategies are valid `--knn-search` choices (fairseq does the same for --user-dir)."""
    for i, arg in enumerate(argv):
        if arg == "--knn-user-module" and i + 1 < len(argv):
            load_user_module(argv[i + 1])
        elif arg.startswith("--knn-user-module="):
            load_user_module(arg.split("=", 1)[1])


def strategy_names():
    _load_builtins()
    load_entry_points()
    return sorted(_STRATEGIES)


def get_strategy(name, opts=None):
    """The class registered as `name` (with options: the variant they ask for, if any)."""
    names = strategy_names()
    if name not in _STRATEGIES:
        raise ConfigError(f"--knn-search {name!r} is not a registered strategy (known: {', '.join(names)}); a "
                          f"strategy of your own is registered with @knnlm.register_strategy in a module passed "
                          f"by --knn-user-module PATH")
    if opts is not None:
        for when, cls in _VARIANTS.get(name, ()):
            if when(opts):
                return cls
    return _STRATEGIES[name]


def wrappers():
    _load_builtins()
    return list(_WRAPPERS.values())
