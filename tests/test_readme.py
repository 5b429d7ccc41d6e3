"""The README stays short and keeps its commands; the run-config reference in docs/configuration.md stays the table
generated from the config's keys; docs/internals.md's "Adding a method" names the module that defines METHODS."""

from pathlib import Path

from fedmetanas_core.run.config import markdown_table

ROOT = Path(__file__).resolve().parents[1]


def test_configuration_page_lists_every_run_config_key_with_its_default():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert markdown_table() in page, (
        "regenerate the table in docs/configuration.md with: python -m fedmetanas_core.run.config"
    )


def test_readme_reads_in_five_minutes_and_keeps_its_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300, "move detail to a docs/ page and link it"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in ci
    for needed in (
        "python -m pytest -q\n",  # what .ci/run runs
        'python -m pytest -q -m "not slow"',  # the documented fast loop
        "pip install -e . && fedmetanas run",
        "## Searching for a device",
        "(docs/configuration.md",
        "(docs/internals.md",
        "(docs/results.md",
    ):
        assert needed in readme, needed


def _adding_a_method_section(page: str) -> str:
    start = page.index("## Adding a method")
    end = page.find("\n## ", start + 1)
    return page[start : end if end >= 0 else len(page)]


def test_adding_a_method_names_the_module_whose_methods_the_key_check_uses(monkeypatch):
    """Following docs/internals.md must leave a new method accepted: the module it names defines METHODS,
    and the `method` key's check, the CLI and the preset tables read that module's list."""
    import ast
    import importlib
    import re

    from fedmetanas_core.run.config import RunConfig, resolve_method_tables
    from harness import cli

    root = Path(__file__).resolve().parents[1]
    section = _adding_a_method_section((root / "docs" / "internals.md").read_text())
    named = set(re.findall(r"`(\w+)\.METHODS`", section))
    code = set(re.findall(r"# fedmetanas_core/([\w/]+)\.py\nMETHODS = ", section))  # e.g. run/config_keys
    assert len(named) == 1 and {c.rsplit("/", 1)[-1] for c in code} == named and len(code) == 1, (named, code)
    module_path = code.pop()
    tree = ast.parse((root / "fedmetanas_core" / f"{module_path}.py").read_text())
    defined = [
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "METHODS" for t in n.targets)
    ]
    assert defined, f"fedmetanas_core/{module_path}.py does not define METHODS (it only imports it)"

    module = importlib.import_module("fedmetanas_core." + module_path.replace("/", "."))
    monkeypatch.setattr(module, "METHODS", (*module.METHODS, "fedsgd"))
    assert RunConfig.from_flat({"method": "fedsgd"}).method == "fedsgd"
    assert resolve_method_tables({"method": "fedsgd", "fedsgd.seed": 3})["seed"] == 3
    overrides = cli.parse_run_config(["fedsgd.seed=3 seed=4"])
    assert overrides == {"seed": 4}  # a plain key replaces what the new method's table said
