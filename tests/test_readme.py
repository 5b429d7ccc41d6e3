"""The README's run-config reference stays the table generated from the config's keys."""

from pathlib import Path

from fedmetanas_core.config import markdown_table


def test_readme_lists_every_run_config_key_with_its_default():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate with: python -m fedmetanas_core.config"
