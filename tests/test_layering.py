"""Import layering (issue 27): who may import whom, read from every module's ``import`` statements.

The layers, bottom up: the core (``fedmetanas_core``, Flower-free), the Flower records
(``flower_records``), the two apps (``server_app``, ``client_app``, neither importing the other),
and the harness (``harness``: the CLI and the in-process grids) on top. Imports inside functions
and under ``TYPE_CHECKING`` count too: a lazy import is still a dependency. Also checked: no
module or test imports another module's private (``_name``) names. Inside the core, its
subpackages import only those below them (``CORE_ORDER``, as ``fedmetanas_core/__init__.py`` lists
them) but for a few listed edges, and its root holds only ``names.py`` beside them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedmetanas_core", "flower_records", "server_app", "client_app", "harness")
# package -> the first-party packages it may import (itself always)
ALLOWED = {
    "fedmetanas_core": set(),
    "flower_records": {"fedmetanas_core"},
    "server_app": {"fedmetanas_core", "flower_records"},
    "client_app": {"fedmetanas_core", "flower_records"},
    "harness": {"fedmetanas_core", "flower_records", "server_app", "client_app"},
}
# third-party top-level packages a layer must not import: the core is Flower-free (flwr_datasets,
# the partitioners' library, is a separate distribution and allowed)
FORBIDDEN_THIRD_PARTY = {"fedmetanas_core": {"flwr"}}


def imported_modules(path: Path, package: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import in ``path``; relative imports resolved
    against ``package`` (the module's dotted package, e.g. ``fedmetanas_core.data``)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                module = ".".join([*base, module] if module else base)
            out.append((node.lineno, module, [alias.name for alias in node.names]))
    return out


def _package_of(path: Path, root: Path) -> str:
    """The dotted package a module is in (the package itself for its ``__init__``)."""
    return ".".join(path.relative_to(root).parts[:-1])


def forbidden_edges(root: Path) -> list[str]:
    """Every import that breaks ``ALLOWED`` / ``FORBIDDEN_THIRD_PARTY``, as 'file:line: a -> b'."""
    problems = []
    for layer in PACKAGES:
        for path in sorted((root / layer).rglob("*.py")):
            for line, module, _ in imported_modules(path, _package_of(path, root)):
                top = module.split(".")[0]
                bad = (top in PACKAGES and top != layer and top not in ALLOWED[layer]) or top in (
                    FORBIDDEN_THIRD_PARTY.get(layer, set())
                )
                if bad:
                    problems.append(f"{path.relative_to(root)}:{line}: {layer} -> {module}")
    return problems


def private_imports(root: Path, folders: tuple[str, ...]) -> list[str]:
    """``from x import _name`` where x is another module (a package's own ``__init__`` may gather
    its submodules' names)."""
    problems = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            package = _package_of(path, root)
            for line, module, names in imported_modules(path, package):
                own = path.name == "__init__.py" and module.startswith(package + ".")
                for name in names:
                    if name.startswith("_") and not name.startswith("__") and not own:
                        problems.append(f"{path.relative_to(root)}:{line}: from {module} import {name}")
    return problems


def test_every_package_imports_only_the_layers_below_it():
    assert forbidden_edges(ROOT) == []


def test_no_module_or_test_imports_another_modules_private_names():
    assert private_imports(ROOT, (*PACKAGES, "tests", "benchmarks", "deploy")) == []


def test_the_checks_see_a_forbidden_edge_and_a_private_import(tmp_path):
    """The checker itself: on a small tree with one edge of each kind it reports exactly those
    (a lazy import inside a function, a relative import, a TYPE_CHECKING import, flwr in the core)."""
    files = {
        "fedmetanas_core/__init__.py": "",
        "fedmetanas_core/cli.py": "def main():\n    from server_app.strategy import check_strategy\n",
        "fedmetanas_core/data/__init__.py": "from ..method.training import RoundPlan\nimport flwr.app\n",
        "fedmetanas_core/method/training.py": "import flwr_datasets\n",
        "flower_records/__init__.py": "from fedmetanas_core.method.training import RoundPlan\n",
        "server_app/__init__.py": "",
        "server_app/local_grid.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import client_app.app\n",
        "client_app/__init__.py": "from flower_records import array_record\n",
        "harness/__init__.py": "import server_app.app, client_app.app\nfrom server_app.strategy import _array_record\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert forbidden_edges(tmp_path) == [
        "fedmetanas_core/cli.py:2: fedmetanas_core -> server_app.strategy",
        "fedmetanas_core/data/__init__.py:2: fedmetanas_core -> flwr.app",
        "server_app/local_grid.py:3: server_app -> client_app.app",
    ]
    assert private_imports(tmp_path, PACKAGES) == [
        "harness/__init__.py:2: from server_app.strategy import _array_record"
    ]


# the core's subpackages, bottom up, as fedmetanas_core/__init__.py lists them: each imports only
# those before it, except the listed (module, package) edges (see that docstring for why)
CORE_ORDER = ("names", "util", "threats", "run", "space", "data", "method", "federation", "deployment", "report")
CORE_EXCEPTIONS = {
    ("run/outputs.py", "method"),  # writes the derived genotype and network
    ("run/outputs.py", "space"),
    ("threats/attacks.py", "run"),  # RunConfig under TYPE_CHECKING
    ("method/budget.py", "deployment"),  # inside functions: a latency-ms budget's table
    ("method/budget.py", "federation"),  # inside a function: the run's space from its test split
}


def core_upward_imports(root: Path) -> list[str]:
    """Imports between the core's subpackages that go up ``CORE_ORDER`` and are not listed."""
    core = root / "fedmetanas_core"
    problems = []
    for path in sorted(core.rglob("*.py")):
        rel = path.relative_to(core)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for line, module, _ in imported_modules(path, _package_of(path, root)):
            parts = module.split(".")
            if parts[0] != "fedmetanas_core" or len(parts) < 2 or parts[1] == own:
                continue
            if CORE_ORDER.index(parts[1]) > CORE_ORDER.index(own) and (rel.as_posix(), parts[1]) not in CORE_EXCEPTIONS:
                problems.append(f"fedmetanas_core/{rel.as_posix()}:{line}: {own} -> {module}")
    return problems


def test_the_core_root_holds_only_its_subpackages_and_the_shared_names():
    core = ROOT / "fedmetanas_core"
    assert sorted(p.name for p in core.glob("*.py")) == ["__init__.py", "names.py"]
    packages = {p.parent.name for p in core.glob("*/__init__.py")}
    assert packages == set(CORE_ORDER) - {"names"}
    for name in packages:  # each says what it holds
        assert (core / name / "__init__.py").read_text().lstrip().startswith('"""'), name


def test_the_core_subpackages_import_only_those_below_them():
    assert core_upward_imports(ROOT) == []
