"""The documentation that is generated stays generated: docs/config.md matches the config model."""

from __future__ import annotations

from pathlib import Path

from stepaudio.config import Config
from stepaudio.configdoc import render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_config_reference_is_up_to_date():
    assert (DOCS / "config.md").read_text(encoding="utf-8") == render(), (
        "docs/config.md is out of date: run `stepaudio config-doc -o docs/config.md`")


def test_config_reference_lists_every_field_with_its_default():
    page = render()
    for section, field in Config.model_fields.items():
        for key, info in field.annotation.model_fields.items():
            assert f"| `{section}.{key}` |" in page
            assert info.description, f"{section}.{key} has no description to document"
