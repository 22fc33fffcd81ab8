"""The house stays standing: kflow's import graph, read from the source with ``ast`` (every import, at module level
or inside a function), has no circle, never runs up the layer order of docs/ARCHITECTURE.md, keeps the two domains
apart and keeps the study harness out of what ships; no library file is over 600 lines."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

KFLOW = Path(__file__).resolve().parents[1] / "kflow"
MAX_LINES = 600

# Lowest first: a module may import from its own layer or a lower one. A name matches a module when it is the
# module or a package above it; the longest match wins; "=name" matches that module only (a package's __init__).
LAYERS = [
    ("=kflow",),  # __version__
    ("kflow.utils", "kflow.core"),  # domain-free: helpers, the K-Flow engine and the training loop
    ("kflow.vision",),  # image domain
    ("kflow.molecular.geometry", "kflow.molecular.so3"),  # rigid-body maths
    ("kflow.molecular.data",),  # crystals -> clusters -> stores -> data sets
    ("kflow.molecular.evaluation",),  # metrics, contacts, packing similarity
    ("kflow.molecular.physics",),  # force fields: MMFF relaxation (lattice energies)
    ("kflow.molecular.model",),  # the rigid flow, network, objective, config, sampling
    ("kflow.molecular.baselines",),  # shell, PyXtal, PackMol
    ("kflow.molecular.crystal",),  # crystal structure prediction
    ("kflow.molecular.assemble",),  # the application behind `kflow assemble`
    ("kflow.molecular.artifacts", "kflow.molecular.workflow", "kflow.molecular.pretraining",
     "kflow.molecular.commands"),  # run folders, one function per step, the pretrained recipe, command lines
    ("kflow.molecular.study",),  # the study harness, above everything it measures
    ("=kflow.molecular",),  # the public face: re-exports
    ("kflow.cli", "kflow.__main__"),  # the `kflow` command
]
DOMAINS = ("kflow.vision", "kflow.molecular")  # neither imports the other
SHIPPING = ("kflow.molecular.assemble", "kflow.molecular.commands")  # must not reach the study harness
STUDY = "kflow.molecular.study"


def module_files(root: Path = KFLOW) -> dict[str, Path]:
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _owner(name: str, mods) -> str | None:
    """The module that ``name`` (a module or a name inside one) refers to: the longest known prefix."""
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, source: str, mods) -> set[str]:
    """kflow modules ``module`` imports anywhere in ``source`` (function-level imports included)."""
    is_package = mods[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                base_name = ".".join(base + ([node.module] if node.module else []))
            else:
                base_name = node.module or ""
            targets = [f"{base_name}.{alias.name}" if f"{base_name}.{alias.name}" in mods else base_name
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "kflow" or target.startswith("kflow."):
                owner = _owner(target, mods)
                if owner and owner != module:
                    found.add(owner)
    return found


def import_graph(root: Path = KFLOW) -> dict[str, set[str]]:
    mods = module_files(root)
    return {m: imports_of(m, p.read_text(encoding="utf-8"), mods) for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str, layers=LAYERS) -> int | None:
    best, best_len = None, -1
    for index, names in enumerate(layers):
        for name in names:
            exact = name.startswith("=")
            name = name.lstrip("=")
            hit = module == name or (not exact and module.startswith(name + "."))
            if hit and len(name) > best_len:
                best, best_len = index, len(name)
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(module, layers):
                bad.append(f"{module} (layer {layer_of(module, layers)}) imports {target} "
                           f"(layer {layer_of(target, layers)})")
    return bad


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ------------------------------------------------------------------------------------------ the checks can fail
def test_the_checks_catch_a_circle_an_upward_import_and_a_reach_into_the_study():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    layers = [("low",), ("high",)]
    assert upward_imports({"low.x": {"high.y"}, "high.y": {"low.x"}}, layers) == [
        "low.x (layer 0) imports high.y (layer 1)"]
    assert layer_of("kflow.molecular", LAYERS) != layer_of("kflow.molecular.data", LAYERS)  # "=": the facade only
    assert STUDY in reachable({"ship": {"mid"}, "mid": {STUDY}}, "ship")


def test_imports_inside_functions_and_relative_imports_count(tmp_path):
    package = tmp_path / "kflow"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from kflow.sub import high\n")
    (package / "sub" / "high.py").write_text("from .. import low\n")
    graph = import_graph(package)
    assert graph["kflow.low"] == {"kflow.sub.high"} and graph["kflow.sub.high"] == {"kflow.low"}
    assert find_cycle(graph) is not None


# ------------------------------------------------------------------------------------------- the house itself
@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_no_import_circle(graph):
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_module_has_a_layer(graph):
    missing = [m for m in graph if layer_of(m) is None]
    assert not missing, f"add these modules to LAYERS (tests/test_architecture.py, docs/ARCHITECTURE.md): {missing}"


def test_no_import_runs_up_the_layers(graph):
    assert upward_imports(graph) == []


def test_the_domains_do_not_import_each_other(graph):
    crossing = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
                for a in DOMAINS for b in DOMAINS if a != b and _in(m, a) and _in(t, b)]
    assert crossing == []


def test_shipping_code_imports_nothing_from_the_study(graph):
    for module in graph:
        if any(_in(module, ship) for ship in SHIPPING):
            assert not any(_in(t, STUDY) for t in reachable(graph, module) | {module}), module


def test_no_library_file_is_over_600_lines():
    long = {str(p.relative_to(KFLOW.parent)): n for p in KFLOW.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
