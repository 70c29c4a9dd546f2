"""Client events and the parser: one WebSocket message in, a typed event or a
:class:`ProtocolError` out, never an exception."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator

from server.protocol.audio import AudioKind, decode_base64
from server.protocol.common import (
    DEFAULT_MAX_EVENT_BYTES,
    MAX_EVENT_ID_CHARS,
    MAX_QUOTED_CHARS,
    Dialect,
    Id,
    Instruction,
    Instructions,
    Int,
    MaxTokens,
    Metadata,
    Modalities,
    ProtocolError,
    Voice,
    _Wire,
    cut,
)
from server.protocol.items import ItemIn, _check_item
from server.protocol.session_config import FormatIn, SessionPatch


class ResponseAudioOutputIn(_Wire):
    format: FormatIn | None = None
    voice: Voice = None


class ResponseAudioIn(_Wire):
    output: ResponseAudioOutputIn | None = None


class StepAudioResponseIn(_Wire):
    instruction: Instruction = None


class ResponseParams(_Wire):
    """``response.create``'s ``response``: per-response overrides of the session."""

    instructions: Instructions = None
    voice: Voice = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    conversation: Literal["auto"] | None = None
    metadata: Metadata = None
    tools: list[Any] | None = None
    tool_choice: Any = None  # accepted
    stepaudio: StepAudioResponseIn | None = None
    # beta
    modalities: Modalities | None = None
    output_audio_format: AudioKind | None = None
    max_response_output_tokens: MaxTokens = None
    # GA
    output_modalities: Modalities | None = None
    audio: ResponseAudioIn | None = None
    max_output_tokens: MaxTokens = None
    prompt: Any = None  # accepted
    reasoning: Any = None  # accepted
    parallel_tool_calls: Any = None  # accepted

    @field_validator("conversation", mode="before")
    @classmethod
    def _conversation(cls, v: Any) -> Any:
        if v not in (None, "auto"):
            raise ValueError('only "auto" is supported (out-of-band responses are not)')
        return v


class ClientEventBase(_Wire):
    type: str
    event_id: str | None = Field(None, max_length=MAX_EVENT_ID_CHARS)


class SessionUpdate(ClientEventBase):
    type: Literal["session.update"]
    session: SessionPatch


class InputAudioBufferAppend(ClientEventBase):
    type: Literal["input_audio_buffer.append"]
    audio: str
    _raw: bytes = PrivateAttr(b"")

    @property
    def raw(self) -> bytes:
        """The decoded audio bytes (the parser checked the base64 and filled this in)."""
        return self._raw


class InputAudioBufferCommit(ClientEventBase):
    type: Literal["input_audio_buffer.commit"]


class InputAudioBufferClear(ClientEventBase):
    type: Literal["input_audio_buffer.clear"]


class ConversationItemCreate(ClientEventBase):
    type: Literal["conversation.item.create"]
    previous_item_id: Id | None = None
    item: ItemIn


class ConversationItemTruncate(ClientEventBase):
    type: Literal["conversation.item.truncate"]
    item_id: Id
    content_index: Int = Field(0, ge=0)
    audio_end_ms: Int = Field(ge=0)


class ConversationItemDelete(ClientEventBase):
    type: Literal["conversation.item.delete"]
    item_id: Id


class ConversationItemRetrieve(ClientEventBase):
    type: Literal["conversation.item.retrieve"]
    item_id: Id


class ResponseCreate(ClientEventBase):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(ClientEventBase):
    type: Literal["response.cancel"]
    response_id: Id | None = None


ClientEvent = (
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ConversationItemTruncate
    | ConversationItemDelete
    | ConversationItemRetrieve
    | ResponseCreate
    | ResponseCancel
)

CLIENT_EVENTS: dict[str, type[ClientEventBase]] = {
    cls.model_fields["type"].annotation.__args__[0]: cls  # type: ignore[union-attr]
    for cls in (
        SessionUpdate,
        InputAudioBufferAppend,
        InputAudioBufferCommit,
        InputAudioBufferClear,
        ConversationItemCreate,
        ConversationItemTruncate,
        ConversationItemDelete,
        ConversationItemRetrieve,
        ResponseCreate,
        ResponseCancel,
    )
}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _param(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:  # a client's unknown field name may be of any length
            out += ("." if out else "") + cut(str(part), MAX_QUOTED_CHARS)
    return out


def _from_validation_error(err: ValidationError, etype: str, event_id: str | None) -> ProtocolError:
    first = err.errors(include_url=False)[0]
    param = _param(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return ProtocolError(
            code="unknown_parameter",
            message=f"{etype}: Unknown parameter: '{param}'.",
            param=param,
            event_id=event_id,
        )
    if kind == "missing":
        return ProtocolError(
            code="missing_required_parameter",
            message=f"{etype}: Missing required parameter: '{param}'.",
            param=param,
            event_id=event_id,
        )
    msg = first["msg"].removeprefix("Value error, ")
    code = "invalid_type" if kind.endswith("_type") else "invalid_value"
    return ProtocolError(
        code=code,
        message=f"{etype}: invalid '{param}': {msg} (got {_shown(first.get('input'))})",
        param=param,
        event_id=event_id,
    )


def _shown(value: Any) -> str:
    """A short rendering of an offending value for an error message."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, (str, int, float, bool, type(None))):
        return cut(json.dumps(value, ensure_ascii=False), MAX_QUOTED_CHARS)
    return type(value).__name__


_SERVER_ONLY_PREFIXES = (
    "session.created",
    "session.updated",
    "error",
    "response.output",
    "response.audio",
)


def parse_client_event(
    data: str | bytes, max_bytes: int = DEFAULT_MAX_EVENT_BYTES
) -> ClientEvent | ProtocolError:
    """One WebSocket message -> a typed client event, or the error to send back. Never raises."""
    try:
        return _parse(data, max_bytes)
    except Exception as exc:  # noqa: BLE001 - the contract is "never raises"; say what happened
        return ProtocolError(
            code="invalid_event", message=f"could not read the event: {type(exc).__name__}: {exc}"
        )


def _parse(data: str | bytes, max_bytes: int) -> ClientEvent | ProtocolError:
    size = len(data)
    if isinstance(data, str) and max_bytes >= size > max_bytes // 4:
        # Only text near the limit is measured in bytes: a character is 1 to 4 bytes of UTF-8.
        size = len(data.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return ProtocolError(
            code="message_too_large",
            message=f"event of {size} bytes is over the limit of {max_bytes} bytes; send audio in smaller appends",
        )
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return ProtocolError(code="invalid_json", message="event is not UTF-8 text")
    try:
        obj = json.loads(data, parse_constant=_reject_constant)
    except RecursionError:
        return ProtocolError(code="invalid_json", message="event JSON is nested too deeply")
    except ValueError as exc:
        return ProtocolError(code="invalid_json", message=f"event is not valid JSON: {exc}")
    if not isinstance(obj, dict):
        return ProtocolError(
            code="invalid_event", message=f"event must be a JSON object, got {type(obj).__name__}"
        )
    surrogate = _lone_surrogate(obj) if _SURROGATE_ESCAPE.search(data) else None
    event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
    if surrogate is not None:
        where = f"'{surrogate}'" if surrogate else "a field name"
        return ProtocolError(
            code="invalid_value",
            message=f"{where} holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
            "without its pair), which is not a character; send valid Unicode",
            param=surrogate or None,
            event_id=None if surrogate == "event_id" else event_id,
        )
    etype = obj.get("type")
    if etype is None:
        return ProtocolError(
            code="missing_required_parameter",
            message="Missing required parameter: 'type'.",
            param="type",
            event_id=event_id,
        )
    if not isinstance(etype, str):
        return ProtocolError(
            code="invalid_type", message="'type' must be a string", param="type", event_id=event_id
        )
    if etype == "input_audio_buffer.append":
        fast = _fast_append(obj, event_id)
        if fast is not None:
            return fast
    cls = CLIENT_EVENTS.get(etype)
    if cls is None:
        hint = " (that is a server event)" if etype.startswith(_SERVER_ONLY_PREFIXES) else ""
        return ProtocolError(
            code="unknown_event_type",
            message=f"unknown event type {cut(etype, MAX_QUOTED_CHARS)!r}{hint}; expected one of {', '.join(sorted(CLIENT_EVENTS))}",
            param="type",
            event_id=event_id,
        )
    try:
        event = cls.model_validate(obj)
    except ValidationError as err:
        return _from_validation_error(err, etype, event_id)
    if isinstance(event, InputAudioBufferAppend):
        raw = decode_base64(event.audio, "audio", event_id)
        if isinstance(raw, ProtocolError):
            return raw
        event._raw = raw
    elif isinstance(event, ConversationItemCreate):
        problem = _check_item(event.item)
        if problem is not None:
            code = "unsupported_feature" if problem[0] == "item.type" else "invalid_value"
            return ProtocolError(
                code=code, message=f"{etype}: {problem[1]}", param=problem[0], event_id=event_id
            )
        for i, part in enumerate(event.item.content or []):
            if part.type == "input_audio" and part.audio is not None:
                raw = decode_base64(part.audio, f"item.content[{i}].audio", event_id)
                if isinstance(raw, ProtocolError):
                    return raw
    elif isinstance(event, ResponseCreate) and event.response is not None and event.response.tools:
        return ProtocolError(
            code="unsupported_feature",
            message=f"{etype}: response.tools: this server has no tool calling",
            param="response.tools",
            event_id=event_id,
        )
    return event  # type: ignore[return-value]


#: A JSON escape of a UTF-16 surrogate (only then can a parsed string hold a lone one).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _lone_surrogate(value: Any, path: str = "") -> str | None:
    """The path of the first string (or "" for a key) holding a lone surrogate, else None.

    Such a string decodes from JSON but cannot be encoded to UTF-8: echoed back in any server
    event, it would break the socket's send.
    """
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "value"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if _lone_surrogate(key) is not None:
                return ""
            found = _lone_surrogate(item, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


_APPEND_KEYS = frozenset({"type", "audio", "event_id"})


def _fast_append(obj: dict[str, Any], event_id: str | None
                 ) -> InputAudioBufferAppend | ProtocolError | None:
    """The well-formed append (dozens per second per session) without model validation.

    Anything unusual (extra keys, wrong types, a long event id) returns None and takes the
    validating path, so errors read the same either way.
    """
    audio = obj.get("audio")
    if not isinstance(audio, str) or not _APPEND_KEYS.issuperset(obj):
        return None
    eid = obj.get("event_id")
    if eid is not None and (not isinstance(eid, str) or len(eid) > 128):
        return None
    raw = decode_base64(audio, "audio", event_id)
    if isinstance(raw, ProtocolError):
        return raw
    event = InputAudioBufferAppend.model_construct(type="input_audio_buffer.append",
                                                   audio=audio, event_id=eid)
    event._raw = raw
    return event


def dialect_from_handshake(
    headers: Any = None,
    subprotocols: Sequence[str] = (),
    query: Mapping[str, str] | None = None,
) -> Dialect:
    """The dialect a connection starts in: what the official SDKs announce when they connect.

    The beta SDK sends ``OpenAI-Beta: realtime=v1`` (browsers, which cannot set headers, offer the
    ``openai-beta.realtime-v1`` subprotocol); GA clients send neither. ``?dialect=beta|ga`` on the
    URL overrides both, for hand-written clients. ``headers`` is a mapping or websockets'
    ``Headers``, whose repeated lines (``OpenAI-Beta`` twice) are all read.
    """
    if query:
        forced = query.get("dialect")
        if forced in ("beta", "ga"):
            return forced  # type: ignore[return-value]
    pairs = headers.raw_items() if hasattr(headers, "raw_items") else (headers or {}).items()
    for key, value in pairs:
        if key.lower() == "openai-beta" and "realtime=v1" in value.replace(" ", "").lower():
            return "beta"
    if any(p.lower() == "openai-beta.realtime-v1" for p in subprotocols):
        return "beta"
    return "ga"
