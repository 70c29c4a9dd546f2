"""Conversation items: what ``conversation.item.create`` may carry, and the server's copy that
every item-bearing event renders per dialect."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from server.protocol.common import Dialect, Id, _Wire, new_id

ContentType = Literal["input_text", "input_audio", "text", "output_text", "audio", "output_audio"]


class ContentIn(_Wire):
    type: ContentType
    text: str | None = None
    audio: str | None = None  # base64 in the session's input format
    transcript: str | None = None
    id: Id | None = None


class ItemIn(_Wire):
    """A client-created item. Only messages: function calls need tools, which this server lacks."""

    id: Id | None = None
    type: Literal["message", "function_call", "function_call_output"] = "message"
    object: Literal["realtime.item"] | None = None
    status: Literal["completed", "incomplete", "in_progress"] | None = None
    role: Literal["user", "assistant", "system"] | None = None
    content: list[ContentIn] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None


_ALLOWED_CONTENT = {
    "user": {"input_text", "input_audio"},
    "system": {"input_text"},
    "assistant": {"text", "output_text", "audio", "output_audio"},
}


def _check_item(item: ItemIn) -> tuple[str, str] | None:
    """(param, message) of the first thing wrong with a client item, or None."""
    if item.type != "message":
        return (
            "item.type",
            f"item.type {item.type!r} is not supported (this server has no tool calling)",
        )
    if item.role is None:
        return "item.role", "Missing required parameter: 'item.role'."
    if not item.content:
        return "item.content", "item.content: a message needs at least one content part"
    for i, part in enumerate(item.content):
        if part.type not in _ALLOWED_CONTENT[item.role]:
            allowed = ", ".join(sorted(_ALLOWED_CONTENT[item.role]))
            return (
                f"item.content[{i}].type",
                f"a {item.role} message takes {allowed}, not {part.type!r}",
            )
        if part.type == "input_audio":
            if not part.audio:
                return f"item.content[{i}].audio", "input_audio needs base64 audio"
        elif part.type in ("audio", "output_audio"):
            if part.transcript is None and part.text is None:
                return (
                    f"item.content[{i}].transcript",
                    "assistant audio is kept as its transcript: give one",
                )
        elif part.text is None:
            return f"item.content[{i}].text", f"{part.type} needs text"
    return None


class ContentPart(BaseModel):
    """One content part of an item as the server holds it (beta type names; GA renames on output)."""

    type: Literal["input_text", "input_audio", "text", "audio"]
    text: str | None = None
    transcript: str | None = None

    def render(self, dialect: Dialect, role: str) -> dict[str, Any]:
        kind: str = self.type
        if dialect == "ga" and role == "assistant":
            kind = {"text": "output_text", "audio": "output_audio"}[kind]
        out: dict[str, Any] = {"type": kind}
        if self.type in ("input_text", "text"):
            out["text"] = self.text or ""
        else:
            out["transcript"] = self.transcript
        return out


class Item(BaseModel):
    id: str = Field(default_factory=lambda: new_id("item"))
    role: Literal["user", "assistant", "system"]
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    content: list[ContentPart] = Field(default_factory=list)

    def render(self, dialect: Dialect) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "realtime.item",
            "type": "message",
            "status": self.status,
            "role": self.role,
            "content": [c.render(dialect, self.role) for c in self.content],
        }


def item_from_client(item: ItemIn) -> Item:
    """The server's copy of a validated client item (audio parts keep their transcript, if any)."""
    parts = []
    for p in item.content or []:
        if p.type == "input_audio":
            parts.append(ContentPart(type="input_audio", transcript=p.transcript))
        elif p.type in ("audio", "output_audio"):
            parts.append(
                ContentPart(
                    type="audio", transcript=p.transcript if p.transcript is not None else p.text
                )
            )
        elif p.type == "input_text":
            parts.append(ContentPart(type="input_text", text=p.text))
        else:
            parts.append(ContentPart(type="text", text=p.text))
    assert item.role is not None
    return Item(id=item.id or new_id("item"), role=item.role, status="completed", content=parts)


