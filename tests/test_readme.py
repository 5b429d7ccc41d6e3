"""The README's run-config reference stays the table generated from the config's keys."""

from pathlib import Path

from fedmetanas_core.config import markdown_table


def test_readme_lists_every_run_config_key_with_its_default():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate with: python -m fedmetanas_core.config"


def _adding_a_method_section(readme: str) -> str:
    start = readme.index("## Adding a method")
    return readme[start : readme.index("\n## ", start + 1)]


def test_readme_adding_a_method_names_the_module_whose_methods_the_key_check_uses(monkeypatch):
    """Following the README must leave a new method accepted: the module it names defines METHODS,
    and the `method` key's check, the CLI and the preset tables read that module's list."""
    import ast
    import importlib
    import re

    from fedmetanas_core.config import RunConfig, resolve_method_tables
    from harness import cli

    root = Path(__file__).resolve().parents[1]
    section = _adding_a_method_section((root / "README.md").read_text())
    named = set(re.findall(r"`(\w+)\.METHODS`", section))
    code = set(re.findall(r"# fedmetanas_core/(\w+)\.py\nMETHODS = ", section))
    assert len(named) == 1 and named == code, (named, code)
    module_name = named.pop()
    tree = ast.parse((root / "fedmetanas_core" / f"{module_name}.py").read_text())
    defined = [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "METHODS" for t in n.targets)
    ]
    assert defined, f"fedmetanas_core/{module_name}.py does not define METHODS (it only imports it)"

    module = importlib.import_module(f"fedmetanas_core.{module_name}")
    monkeypatch.setattr(module, "METHODS", (*module.METHODS, "fedsgd"))
    assert RunConfig.from_flat({"method": "fedsgd"}).method == "fedsgd"
    assert resolve_method_tables({"method": "fedsgd", "fedsgd.seed": 3})["seed"] == 3
    overrides = cli.parse_run_config(["fedsgd.seed=3 seed=4"])
    assert overrides == {"seed": 4}  # a plain key replaces what the new method's table said
