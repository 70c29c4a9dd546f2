"""docs/config.md, rendered from the config model itself.

Every option's default and meaning live once, in :mod:`stepaudio.config`; the reference page is
generated from there (``stepaudio config-doc -o docs/config.md``) and a test fails when the page
and the model drift apart.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import Config

HEADER = """\
# Configuration reference

<!-- Generated from stepaudio/config.py by `stepaudio config-doc -o docs/config.md`; do not edit
by hand (a test checks this page is up to date). -->

`stepaudio serve --config FILE.yaml` reads a YAML file of the sections below; every key is
optional and a key this page does not list is refused at start-up with a message naming it.
`configs/default.yaml` is the tiny CPU profile, `configs/step-audio.yaml` the real checkpoints on
GPUs. Secrets (API keys) never go in the YAML: the `*_api_key_env` keys name the environment
variable that holds them.
"""


def _type_name(annotation: Any) -> str:
    """A short, readable type: ``int``, ``path or null``, ``"tiny" | "real"``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(json.dumps(a, ensure_ascii=False) for a in args)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if origin is list:
        return f"list of {_type_name(args[0])}" if args else "list"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean",
                "Path": "path", "PosixPath": "path"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _bounds(field: Any) -> str:
    """The validator's limits (``ge``, ``lt``, ``multiple_of``) as a suffix of the type."""
    marks = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    parts = []
    for meta in field.metadata:
        for attr, mark in marks.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{mark} {value}")
        step = getattr(meta, "multiple_of", None)
        if step is not None:
            parts.append(f"multiple of {step}")
    return f", {', '.join(parts)}" if parts else ""


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "(required)"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render() -> str:
    """The whole page."""
    out = [HEADER]
    for name, section in Config.model_fields.items():
        model = section.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        out.append(f"## `{name}`\n")
        doc = (model.__doc__ or "").strip()
        if doc and not doc.startswith(("Usage docs", "A base class")):
            out.append(_cell(doc) + "\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for key, field in model.model_fields.items():
            out.append(f"| `{name}.{key}` | {_cell(_type_name(field.annotation) + _bounds(field))} | "
                       f"{_cell(_default(field))} | {_cell(field.description or '')} |")
        out.append("")
    return "\n".join(out)
