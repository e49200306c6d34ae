"""The README's result tables are rendered from the committed benchmark JSON (benchmarks/update_readme.py)."""

import importlib.util

from helpers import REPO


def load_updater():
    spec = importlib.util.spec_from_file_location("update_readme", REPO / "benchmarks" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_committed_results():
    updater = load_updater()
    text = (REPO / "README.md").read_text()
    current = updater.blocks(text)
    for name, body in updater.expected_blocks(text).items():
        assert current[name] == body, f"README block {name!r} is stale: run python benchmarks/update_readme.py"


def test_readme_states_the_two_commands():
    text = (REPO / "README.md").read_text()
    assert "make demo" in text and "make test" in text
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
