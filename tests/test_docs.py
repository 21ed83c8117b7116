"""Every hookspec is documented, every implementation matches a spec, every built-in
plugin has a docs page."""

import inspect
import re
from pathlib import Path

import lscape.hookspecs as hookspecs
from lscape.manager import build_registry, get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]


def _specs():
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "lscape_spec")]


def test_every_hookspec_is_in_docs_hooks_md_with_its_signature():
    text = (ROOT / "docs" / "hooks.md").read_text()
    for name in _specs():
        # the annotations are strings (postponed evaluation): the page writes them unquoted
        sig = str(inspect.signature(getattr(hookspecs, name))).replace("'", "")
        assert f"### `{name}{sig}`" in text, f"docs/hooks.md lacks a section for {name}{sig}"


def test_every_hookspec_has_a_docstring():
    for name in _specs():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_plugin_manager_has_no_pending_implementations():
    pm = get_plugin_manager()
    build_registry(pm)
    pm.check_pending()


def test_every_builtin_plugin_has_a_docs_page_or_is_core():
    reg = build_registry(get_plugin_manager(entry_points=False))
    pages = {p.stem for p in (ROOT / "docs" / "plugins").glob("*.md")}
    missing = sorted(n for n in reg.activatable() if n not in pages)
    assert not missing, f"docs/plugins/ has no page for {missing}"


def test_readme_shows_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert re.search(r"pip install .*torch==", text) and "lscape run" in text and "pytest" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest" in ci
