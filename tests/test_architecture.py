"""The package's layers import only downward: a module may import its own package and the
layers below it, never a sibling or a layer above. docs/architecture.md describes the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autoseg"
#: layer rank of each top-level package (or module) of autoseg; equal ranks are siblings.
LAYERS = {
    "core": 0,
    "data": 1,
    "planning": 1,
    "phantoms": 1,
    "model": 2,
    "training": 3,
    "inference": 3,
    "deploy": 4,
    "workflows": 5,
    "selection": 5,
    "visual": 5,
    "tuning": 6,
    "commands": 7,
    "cli": 8,
}


#: data's sub-packages import downward too: io < preprocessing < evaluation, qc (siblings).
SUBLAYERS = {"data": {"io": 0, "preprocessing": 1, "evaluation": 2, "qc": 2}}
#: no package (top-level or sub-package) holds more than about a fifth of autoseg's lines (issue 24).
MAX_PACKAGE_SHARE = 0.22


def top_level(module: str) -> str:
    """``autoseg.data.io.images`` -> ``data``; ``autoseg`` itself -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every ``autoseg`` module a file imports, at module level or inside functions, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "autoseg":
            if node.module == "autoseg":
                found += [(node.lineno, f"autoseg.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "autoseg"]
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py")


def test_every_package_has_a_layer():
    tops = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in modules()}
    assert tops <= set(LAYERS), f"give these a layer in LAYERS and docs/architecture.md: {sorted(tops - set(LAYERS))}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_go_down(path: Path):
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    wrong = []
    for line, module in imports_of(path):
        target = top_level(module)
        if target == own:
            continue
        if target not in LAYERS or LAYERS[target] >= LAYERS[own]:
            wrong.append(
                f"line {line}: {own} (layer {LAYERS[own]}) imports {module} (layer {LAYERS.get(target, 'top')})"
            )
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    "path",
    [p for p in modules() if p.relative_to(PACKAGE).parts[0] in SUBLAYERS and len(p.relative_to(PACKAGE).parts) > 2],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_sub_packages_import_only_down(path: Path):
    package, own = path.relative_to(PACKAGE).parts[:2]
    ranks = SUBLAYERS[package]
    wrong = []
    for line, module in imports_of(path):
        parts = module.split(".")
        if len(parts) < 3 or parts[1] != package or parts[2] == own:
            continue
        if parts[2] not in ranks or ranks[parts[2]] >= ranks[own]:
            wrong.append(f"line {line}: {package}.{own} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_every_sub_package_has_a_rank():
    for package, ranks in SUBLAYERS.items():
        found = {p.name for p in (PACKAGE / package).iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
        loose = {p.name for p in (PACKAGE / package).glob("*.py") if p.name != "__init__.py"}
        assert found == set(ranks) and not loose, (package, sorted(found ^ set(ranks)), sorted(loose))


def test_no_package_holds_more_than_a_fifth_of_the_lines():
    def lines(folder: Path) -> int:
        return sum(len(p.read_text(encoding="utf-8").splitlines()) for p in folder.rglob("*.py"))

    def has_modules(folder: Path) -> bool:
        return any(p.name != "__init__.py" for p in folder.glob("*.py"))

    # a package of sub-packages only (data: io, preprocessing, evaluation, qc) is a namespace: its rooms count
    total = lines(PACKAGE)
    packages = [p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]
    packages += [s for p in packages for s in p.iterdir() if (s / "__init__.py").is_file()]
    packages = [p for p in packages if has_modules(p)]
    big = {
        str(p.relative_to(PACKAGE)): round(lines(p) / total, 3)
        for p in packages
        if lines(p) > MAX_PACKAGE_SHARE * total
    }
    assert not big, big


def test_no_cycle_inside_a_package():
    graph: dict[str, set[str]] = {}
    for path in modules():
        name = ".".join(("autoseg", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        graph[name] = {m for _, m in imports_of(path) if m != name}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(nxt) :], nxt]))
            if nxt in graph and not state.get(nxt):
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from autoseg.inference.predictor import Predictor\n")
    assert imports_of(bad) == [(1, "autoseg.inference.predictor")]
    assert LAYERS[top_level("autoseg.inference.predictor")] >= LAYERS["training"]


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_sixty_lines():
    """Issue 12: a function that needs more is several functions (option declarations included)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
