"""The package's layering, read from the source: imports at the top, one way, no cycles.

    data -> model -> derivatives -> losses -> train step -> sharded step -> run loop -> CLI
    and back in: Potential -> evaluation, vibrations, study

An import inside a function is allowed only for the optional heavy programs of data generation
(`OPTIONAL`, installed by the `data` extra), in `phljax/datagen/` and `phljax/optional.py`, and for
those of the size-scaling set (`SCALE_OPTIONAL`, the `scale` extra) in `phljax/datagen/` only;
anything else there would hide a cycle.
"""

from __future__ import annotations

import ast
import os

from conftest import REPO

PACKAGE = os.path.join(REPO, "phljax")
#: third-party packages that phljax/datagen may import inside functions (the `data` extra)
OPTIONAL = {"pyscf", "geometric", "sella"}
#: third-party packages that only phljax/datagen may import inside functions (the `scale` extra)
SCALE_OPTIONAL = {"tblite", "rdkit"}
#: modules that must not import these (lower layers must not know about higher ones)
LAYERS = {
    "phljax.units": set(),
    "phljax.distributed": {"phljax"},  # imports no phljax at all
    "phljax.files": {"phljax"},  # the crash-safe write every layer uses: imports no phljax
    "phljax.data": {"phljax.models", "phljax.derivatives", "phljax.losses", "phljax.train", "phljax.potential"},
    "phljax.models": {"phljax.derivatives", "phljax.losses", "phljax.train", "phljax.potential", "phljax.evaluation"},
    "phljax.derivatives": {"phljax"},  # model-agnostic: any energy(positions)
    "phljax.losses": {"phljax.train", "phljax.potential", "phljax.evaluation"},
    "phljax.train.step": {"phljax.train.sharded", "phljax.train.loop", "phljax.distributed", "phljax.evaluation"},
    "phljax.train.sharded": {"phljax.train.loop", "phljax.evaluation"},
    "phljax.potential": {"phljax.train", "phljax.evaluation", "phljax.study"},
    "phljax.evaluation": {"phljax.train", "phljax.study"},
}


def _modules():
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                yield rel.removesuffix(".__init__"), path


def _imports(tree: ast.AST):
    """(module name, lineno, inside a function) for every import statement."""
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.module, child.lineno, in_function))
            visit(child, inside)

    visit(tree, False)
    return out


def _parsed():
    return {name: _imports(ast.parse(open(path).read(), path)) for name, path in _modules()}


def test_no_import_inside_a_function_except_optional_datagen_programs():
    offenders = []
    for module, imports in _parsed().items():
        for name, line, in_function in imports:
            if not in_function:
                continue
            top = name.split(".")[0]
            datagen = module.startswith("phljax.datagen")
            optional_home = datagen or module == "phljax.optional"
            allowed = (optional_home and top in OPTIONAL) or (datagen and top in SCALE_OPTIONAL)
            if not allowed:
                offenders.append(f"{module}:{line} imports {name} inside a function")
    assert offenders == []


def test_phljax_imports_form_no_cycle_and_follow_the_layers():
    graph = {
        module: {name for name, _, _ in imports if name == "phljax" or name.startswith("phljax.")}
        for module, imports in _parsed().items()
    }
    # `from phljax.train import seeds` names a submodule: resolve to the most specific known module
    known = set(graph)

    def resolve(name):
        return name if name in known else name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in known else name

    graph = {m: {resolve(n) for n in deps if resolve(n) != m} for m, deps in graph.items()}
    for module, forbidden in LAYERS.items():
        for dep in graph.get(module, set()) | {d for m, ds in graph.items() if m.startswith(module + ".") for d in ds}:
            bad = [f for f in forbidden if dep == f or dep.startswith(f + ".")]
            assert not bad, f"{module} imports {dep}, a layer above it"
    # no cycles among modules (a package's __init__ re-exporting its children is not an edge back)
    edges = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in edges.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])
