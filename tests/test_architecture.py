"""The layers hold: the core imports no front-end, no framework and no experiment, and the
package has no import cycle. Checked twice: statically (every import statement, those inside
functions included) and by importing every core module in a fresh interpreter."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "knnlm"
# Subpackages of knnlm that are not the core: they may use fairseq and the experiments' tools.
NOT_CORE = ("knnlm.experiments", "knnlm.hf", "knnlm.explain.cli")
# What the core must never reach, not even lazily inside a function.
FORBIDDEN = ("fairseq", "fairseq_cli", "fairseq_plugins", "transformers", "tokenizers", *NOT_CORE)


def module_name(path):
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def all_modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_core(name):
    return not any(name == n or name.startswith(n + ".") for n in NOT_CORE)


def imports_of(name, path, modules):
    """Every module an import statement of `name` names (resolved; inside functions too)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.add(sub if sub in modules else mod)  # `from pkg import module` names the module
    return out


def test_the_core_imports_no_framework_front_end_or_experiment():
    modules = all_modules()
    core = [m for m in modules if is_core(m)]
    assert "knnlm.model" in core and "knnlm.retrieval.base" in core and "knnlm.experiments.demo" not in core
    bad = {m: sorted(i for i in imports_of(m, modules[m], modules)
                     if any(i == f or i.startswith(f + ".") for f in FORBIDDEN))
           for m in core}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"core modules that import a framework, a front-end or an experiment: {bad}"


def test_importing_every_core_module_loads_no_framework():
    core = sorted(m for m in all_modules() if is_core(m))
    code = (
        "import importlib, sys\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r} "
        f"or any(m == n or m.startswith(n + '.') for n in {NOT_CORE!r}))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO))
    assert p.returncode == 0, f"importing the core loaded {p.stdout.strip()}\n{p.stderr[-2000:]}"


def test_the_store_layer_imports_nothing_from_the_index_layer():
    """Datastores sit below indexes: an index is built from a datastore, never the reverse
    (knnlm-prune, which needs both, is knnlm.offline.prune)."""
    modules = all_modules()
    store = [m for m in modules if m == "knnlm.store" or m.startswith("knnlm.store.")]
    assert "knnlm.store.prune" in store
    bad = {m: sorted(i for i in imports_of(m, modules[m], modules) if i == "knnlm.index" or i.startswith("knnlm.index."))
           for m in store}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"store modules that import the index layer: {bad}"


def find_cycle(graph):
    """A list of modules forming a cycle in {module: {modules it imports}}, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def package_graph():
    modules = all_modules()
    return {m: {i for i in imports_of(m, p, modules) if i in modules and i != m} for m, p in modules.items()}


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(package_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("graph, cyclic", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"a"}}, True),
    ({"a": {"b", "c"}, "b": {"c"}, "c": {"d"}, "d": {"b"}}, True),
])
def test_the_cycle_finder_itself(graph, cyclic):
    assert (find_cycle(graph) is not None) == cyclic
