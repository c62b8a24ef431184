"""The package's layering (docs/ARCHITECTURE.md), kept true; imports inside functions count:
- no import cycle anywhere in nmt_moe;
- the MoE layer stays usable on its own: nothing under moe/ imports anything outside moe/ (so not models,
  data, training, decoding, serving or cli);
- models/ imports only moe/ and the tokenizer's constants (nmt_moe.data.tokenizer's UPPER_CASE names);
- nothing in the package imports nmt_moe.cli: it is the top layer, called only by the `nmt-moe` entry point;
- no test file imports another test file (shared code is in tests/helpers/ and conftest.py)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nmt_moe"
TESTS = Path(__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in `path`, wherever it stands: `import a.b` -> ("a.b", []),
    `from a import b, c` -> ("a", ["b", "c"]); relative imports resolved against the file's package."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    statements = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            statements += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from . import x / from ..y import z
                parent = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                module = f"{parent}.{module}" if module else parent
            statements.append((module, [alias.name for alias in node.names]))
    return statements


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The nmt_moe modules `path` imports, wherever in the file the import stands."""
    found = set()
    for module, names in import_statements(path):
        found |= {name for name in [module, *(f"{module}.{n}" for n in names)] if name in modules}
    return found


def in_layer(module: str, layer: str) -> bool:
    """Whether `module` is the package or module `layer` or lies under it."""
    return module == layer or module.startswith(layer + ".")


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) - {name} for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (depth-first search; packages import their
    __init__ implicitly, which is not counted: only what a file names)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_in_the_package() -> None:
    graph = {name: {m for m in deps if m != "nmt_moe"} for name, deps in import_graph().items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_moe_imports_only_itself() -> None:
    """Stricter than "not models, data, training, decoding, serving or cli": nothing outside moe/ at all."""
    outside = {
        (name, dep)
        for name, deps in import_graph().items()
        if name.startswith("nmt_moe.moe")
        for dep in deps
        if not dep.startswith("nmt_moe.moe")
    }
    assert not outside


def models_violations(statements: dict[str, list[tuple[str, list[str]]]], modules: set[str]) -> list[str]:
    """Imports by nmt_moe.models.* of package code other than models/, moe/ and the tokenizer's constants."""
    found = []
    for name, imports in sorted(statements.items()):
        if not in_layer(name, "nmt_moe.models"):
            continue
        for module, names in imports:
            # `from nmt_moe import moe` imports the module nmt_moe.moe; `from nmt_moe.x import y`: from x
            targets = dict.fromkeys(f"{module}.{n}" if f"{module}.{n}" in modules else module for n in names)
            for target in targets or [module]:
                if not in_layer(target, "nmt_moe") or in_layer(target, "nmt_moe.models"):
                    continue
                if in_layer(target, "nmt_moe.moe"):
                    continue
                if target == "nmt_moe.data.tokenizer" and names and all(n.isupper() for n in names):
                    continue  # PAD_ID and the like: constants of the tokenizer contract
                found.append(f"{name} imports {target} {names}")
    return found


def package_statements() -> tuple[dict[str, list[tuple[str, list[str]]]], set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: import_statements(path) for name, path in paths.items()}, set(paths)


def test_models_import_only_moe_and_the_tokenizer_constants() -> None:
    statements, modules = package_statements()
    assert not models_violations(statements, modules)


def test_the_models_rule_catches_other_imports() -> None:
    modules = {"nmt_moe", "nmt_moe.moe", "nmt_moe.data", "nmt_moe.data.tokenizer", "nmt_moe.training.module"}
    allowed = {
        "nmt_moe.models.x": [
            ("torch", ["nn"]), ("nmt_moe.moe", ["MoELayer"]), ("nmt_moe", ["moe"]),
            ("nmt_moe.data.tokenizer", ["PAD_ID", "EOS_ID"]), ("nmt_moe.models.y", ["Z"]),
        ]
    }  # fmt: skip
    assert models_violations(allowed, modules) == []
    for bad in [("nmt_moe.data.tokenizer", ["Tokenizer"]), ("nmt_moe.data.tokenizer", []),
                ("nmt_moe.training.module", ["X"]), ("nmt_moe", ["data"]),
                ("nmt_moe.data.tokenizer", ["PAD_ID", "Tokenizer"])]:  # fmt: skip
        assert len(models_violations({"nmt_moe.models.x": [bad]}, modules)) == 1, bad


def cli_importers(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, cli module) for every import of nmt_moe.cli or its submodules from outside it."""
    return {
        (name, dep)
        for name, deps in graph.items()
        if not in_layer(name, "nmt_moe.cli")
        for dep in deps
        if in_layer(dep, "nmt_moe.cli")
    }


def test_nothing_in_the_package_imports_the_cli() -> None:
    scripts = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"nmt-moe": "nmt_moe.cli:main"}  # the one caller of nmt_moe.cli
    assert not cli_importers(import_graph())


def test_the_cli_rule_catches_an_import() -> None:
    graph = {"nmt_moe.cli": {"nmt_moe.cli.train"}, "nmt_moe.cli.train": set(), "nmt_moe.serving.app": set()}
    assert not cli_importers(graph)
    graph["nmt_moe.serving.app"] = {"nmt_moe.cli.errors"}
    assert cli_importers(graph) == {("nmt_moe.serving.app", "nmt_moe.cli.errors")}


def imported_test_modules(source: str) -> list[str]:
    """The test modules (test_*) and conftests that Python `source` imports."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
            if node.level or not node.module:  # from . import test_x
                names += [alias.name for alias in node.names]
    return [name for name in names if any(p.startswith("test_") or p == "conftest" for p in name.split("."))]


def test_no_test_file_imports_another() -> None:
    """Test modules are collected, not imported (--import-mode=importlib); what they share is in helpers/."""
    found = {
        str(path.relative_to(TESTS)): names
        for path in sorted(TESTS.rglob("*.py"))
        if (names := imported_test_modules(path.read_text()))
    }
    assert not found


def test_the_test_import_rule_catches_an_import() -> None:
    source = "import helpers.data\nfrom helpers.training import test_data\nfrom test_beam import toy_batch\n"
    source += (
        "def f():\n    from conftest import MULTI30K\n    from .test_x import y\n    import data.test_cache\n"
    )
    assert sorted(imported_test_modules(source)) == ["conftest", "data.test_cache", "test_beam", "test_x"]


# The layers of docs/ARCHITECTURE.md, lowest first: a module imports only from its own layer or below.
LAYERS: list[set[str]] = [
    {"nmt_moe.moe", "nmt_moe.data", "nmt_moe.atomic_files", "nmt_moe.allocator"},
    {"nmt_moe.models"},
    {
        "nmt_moe.model_files",
        "nmt_moe.sharded_checkpoint",
        "nmt_moe.checkpoint",
        "nmt_moe.averaging",
        "nmt_moe.plan",
    },
    {"nmt_moe.decoding", "nmt_moe.evaluation", "nmt_moe.scoring", "nmt_moe.routing"},
    {"nmt_moe.training", "nmt_moe.serving"},
    {"nmt_moe.cli"},
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of the unit holding `module` (None for the package root `nmt_moe` itself)."""
    for index, units in enumerate(LAYERS):
        if any(in_layer(module, unit) for unit in units):
            return index
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, and modules no layer holds (a new unit must be placed in LAYERS)."""
    found = []
    for name, deps in sorted(graph.items()):
        if name == "nmt_moe":
            continue
        own = layer_of(name)
        if own is None:
            found.append(f"{name} is in no layer of LAYERS")
            continue
        found += [f"{name} (layer {own}) imports {dep}" for dep in sorted(deps) if (layer_of(dep) or 0) > own]
    return found


def test_every_module_imports_only_its_own_layer_or_below() -> None:
    assert upward_imports(import_graph()) == []


def test_the_layer_rule_catches_an_upward_import_and_an_unplaced_module() -> None:
    graph = {"nmt_moe.models.seq2seq": {"nmt_moe.moe.layer"}, "nmt_moe.decoding.beam": {"nmt_moe.models"}}
    assert upward_imports(graph) == []
    graph["nmt_moe.models.seq2seq"].add("nmt_moe.decoding.beam")
    graph["nmt_moe.newthing"] = set()
    assert upward_imports(graph) == [
        "nmt_moe.models.seq2seq (layer 1) imports nmt_moe.decoding.beam",
        "nmt_moe.newthing is in no layer of LAYERS",
    ]
