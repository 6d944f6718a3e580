"""The docs site's generated page is current, and every shipped page is in its navigation."""

from pathlib import Path

import yaml

from rayrlhf.jobs.config.reference import markdown

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_reference_is_current():
    page = ROOT / "docs" / "configuration_reference.md"
    assert page.read_text() == markdown(), (
        "docs/configuration_reference.md is out of date: "
        "python -m rayrlhf.jobs.config.reference docs/configuration_reference.md"
    )


def test_reference_lists_nested_fields_with_their_docstrings():
    text = markdown()
    assert "### `policy.lora`" in text
    row = next(line for line in text.splitlines() if line.startswith("| `every_minutes` |"))
    assert "`30.0`" in row and "float" in row


def _pages(nav) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    items = nav.values() if isinstance(nav, dict) else nav
    return set().union(*(_pages(item) for item in items))


def test_every_page_is_in_the_navigation():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    on_disk = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert on_disk == _pages(nav), "add the page to mkdocs.yml's nav (or remove it from there)"
