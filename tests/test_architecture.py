"""The package's shape, checked from its source: layered imports without cycles, short functions, no private names
borrowed across modules.

Layers, lowest first (a module imports only from its own layer or lower ones; imports inside functions count):
registry (presets, the one resolver, shipped files, atomic writes) < config < nn < weights < models < processing <
data < engine < pipelines < cli. ``weights`` sits below ``models``: it reads and maps checkpoints for a model class
it is given and never imports one, so ``Blip2Qformer.from_pretrained`` can call it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "blip2"
LAYERS = [
    ("registry", ("blip2.registry", "blip2.resources", "blip2.files")),
    ("config", ("blip2.config",)),
    ("nn", ("blip2.nn",)),
    ("weights", ("blip2.weights",)),
    ("models", ("blip2.models",)),
    ("processing", ("blip2.processing",)),
    ("data", ("blip2.data",)),
    ("engine", ("blip2.engine",)),
    ("pipelines", ("blip2.pipelines",)),
    ("serve", ("blip2.serve",)),
    ("cli", ("blip2.cli", "blip2.__main__", "blip2")),  # ``blip2`` itself: the public names, re-exported
]
MAX_FUNCTION_LINES = 60


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its ``__init__``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest prefix naming ``module``'s layer."""
    best, best_length = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return best


def imported_names(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, str | None, int]]:
    """(target module, imported name or None, line) for every import of a blip2 module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None, node.lineno) if submodule in modules else
                             (base, alias.name, node.lineno))
    result = []
    for target, name, line in found:
        if target != "blip2" and not target.startswith("blip2."):
            continue
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        result.append((target, name, line))
    return result


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {module: {target for target, _, _ in imported_names(module, path, modules) if target != module}
            for module, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer() -> None:
    for module in module_files():
        layer_of(module)


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_no_import_from_a_lower_layer_to_a_higher_one() -> None:
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert upward == []


def test_no_private_name_is_imported_across_modules() -> None:
    modules = module_files()
    borrowed = [
        f"{module}:{line} imports {name} from {target}"
        for module, path in modules.items()
        for target, name, line in imported_names(module, path, modules)
        if name is not None and name.startswith("_") and target != module
    ]
    assert borrowed == []


def long_functions(package: Path = PACKAGE, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > limit:
                    found.append(f"{path.relative_to(package.parent)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_sixty_lines() -> None:
    assert long_functions() == []


# --- the checks themselves catch what they are for ----------------------------------------------------------------
def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("module, layer", [
    ("blip2.registry", "registry"), ("blip2.weights.hf", "weights"), ("blip2.models.stage1", "models"),
    ("blip2.engine.trainer", "engine"), ("blip2", "cli"),
])
def test_layers_are_found_by_prefix(module: str, layer: str) -> None:
    assert LAYERS[layer_of(module)][0] == layer


def test_relative_and_function_level_imports_are_seen(tmp_path) -> None:
    source = tmp_path / "mod.py"
    source.write_text("def f():\n    from blip2.engine import trainer\n    from .loader import _first\n")
    modules = {"blip2.weights.mod": source, "blip2.engine.trainer": source, "blip2.weights.loader": source}
    found = imported_names("blip2.weights.mod", source, modules)
    assert ("blip2.engine.trainer", None, 2) in found
    assert ("blip2.weights.loader", "_first", 3) in found


def test_the_length_counter_counts_lines(tmp_path) -> None:
    package = tmp_path / "blip2"
    package.mkdir()
    lines = [f"    x{i} = {i}" for i in range(60)]
    (package / "long.py").write_text("def long_one():\n" + "\n".join(lines) + "\n\n\ndef short_one():\n"
                                     + "\n".join(lines[:59]) + "\n")
    assert long_functions(package) == ["blip2/long.py:1 long_one (61 lines)"]
