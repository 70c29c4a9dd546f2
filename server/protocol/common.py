"""Shared pieces of the wire protocol: dialects, defaults, ids, the error model, field types.

Kept apart so that every other protocol module (audio, session config, items, events) can use them
without importing each other.
"""

from __future__ import annotations

import re
import secrets
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    from server.protocol.server_events import ErrorEvent

Dialect = Literal["beta", "ga"]

#: Largest client frame accepted (OpenAI allows 15 MiB of audio per append; base64 adds a third).
DEFAULT_MAX_EVENT_BYTES = 21 * 1024 * 1024
#: OpenAI refuses to commit less than this much audio; so do we (a shorter turn is a click).
MIN_COMMIT_MS = 100
DEFAULT_VOICE = "Tingting"
DEFAULT_INSTRUCTIONS = "适配用户的语言，用简短口语化的文字回答"
TRANSCRIPTION_MODEL = "step-audio-chat-asr"
#: OpenAI's built-in voice names: stock clients send them, we answer with the default speaker.
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar"}
)


# ---------------------------------------------------------------------------------------------------
# Bounds on what a client may send and what the server echoes (docs/protocol.md, "Limits")

#: Ids a client names (items, responses): OpenAI's are 32 characters.
MAX_ID_CHARS = 64
#: ``event_id``: echoed in the ``error`` event of a bad event.
MAX_EVENT_ID_CHARS = 128
#: Voice names and other short names (session ``model``, transcription ``model``).
MAX_NAME_CHARS = 64
#: Instructions (system prompt): the chat model's whole context window in characters.
MAX_INSTRUCTIONS_CHARS = 32768
#: Transcription ``prompt`` and ``language``.
MAX_PROMPT_CHARS = 4096
MAX_LANGUAGE_CHARS = 32
#: ``metadata`` (OpenAI's limits): pairs, key and value lengths.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
#: An ``error`` event: its message, param and event_id are cut to these lengths.
MAX_ERROR_MESSAGE_CHARS = 512
MAX_ERROR_PARAM_CHARS = 128
#: A client value or name quoted inside an error message is cut to this many characters.
MAX_QUOTED_CHARS = 60

Id = Annotated[str, Field(max_length=MAX_ID_CHARS)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]


def cut(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters (an ellipsis marks a cut)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quoted(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """A client string quoted in an error message: repr'd, then cut."""
    return cut(repr(value), limit)


def new_id(prefix: str) -> str:
    """``event_…`` / ``item_…`` / ``resp_…`` ids as OpenAI shapes them (clients log and match them)."""
    return f"{prefix}_{secrets.token_hex(10)}"


# ---------------------------------------------------------------------------------------------------
# Errors


ErrorType = Literal["invalid_request_error", "server_error"]


class ProtocolError(BaseModel):
    """What went wrong with one client event; becomes an ``error`` event, the session lives on.

    Codes (the full table is in docs/protocol.md): ``invalid_json``, ``invalid_event``,
    ``unknown_event_type``, ``unknown_parameter``, ``missing_required_parameter``, ``invalid_type``,
    ``invalid_value``, ``message_too_large``, ``invalid_base64``, ``invalid_audio``,
    ``unsupported_feature``, ``mixed_dialect`` and the state errors the controller returns.
    """

    model_config = ConfigDict(extra="forbid")

    type: ErrorType = "invalid_request_error"
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None

    @field_validator("message")
    @classmethod
    def _cut_message(cls, v: str) -> str:
        # whatever a message quotes from the client, the error stays small
        return cut(v, MAX_ERROR_MESSAGE_CHARS)

    @field_validator("param")
    @classmethod
    def _cut_param(cls, v: str | None) -> str | None:
        return None if v is None else cut(v, MAX_ERROR_PARAM_CHARS)

    @field_validator("event_id")
    @classmethod
    def _cut_event_id(cls, v: str | None) -> str | None:
        return None if v is None else cut(v, MAX_EVENT_ID_CHARS)

    def to_event(self) -> ErrorEvent:
        from server.protocol.server_events import ErrorEvent

        return ErrorEvent(error=self)


# ---------------------------------------------------------------------------------------------------
# Wire-model helpers


def _int_from_integral_float(v: Any) -> Any:
    # JSON from JavaScript or Python often carries 1200.0 for 1200: accept it, refuse 1200.5 and "1200".
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return v


Int = Annotated[int, BeforeValidator(_int_from_integral_float)]


class _Wire(BaseModel):
    """Client-side shapes: strict types (no "300" for 300) and unknown fields refused (typos)."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _voice_value(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"id"} and isinstance(v["id"], str):
        v = v["id"]
    if v is None or isinstance(v, str):
        if v is not None and len(v) > MAX_NAME_CHARS:
            raise ValueError(f"a voice name has at most {MAX_NAME_CHARS} characters")
        return v
    raise ValueError('expected a voice name or {"id": name}')


def _metadata_value(v: Any) -> Any:
    if isinstance(v, dict):
        if len(v) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} key-value pairs")
        for key, value in v.items():
            if isinstance(key, str) and len(key) > MAX_METADATA_KEY_CHARS:
                raise ValueError(f"keys have at most {MAX_METADATA_KEY_CHARS} characters")
            if isinstance(value, str) and len(value) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(f"values have at most {MAX_METADATA_VALUE_CHARS} characters")
    return v


def _max_tokens_value(v: Any) -> Any:
    v = _int_from_integral_float(v)
    if (
        v is None
        or v == "inf"
        or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096)
    ):
        return v
    raise ValueError('expected an integer from 1 to 4096 or "inf"')


Voice = Annotated[str | None, BeforeValidator(_voice_value)]
Metadata = Annotated[dict[str, str] | None, BeforeValidator(_metadata_value)]
Instructions = Annotated[str | None, Field(max_length=MAX_INSTRUCTIONS_CHARS)]
MaxTokens = Annotated[Any, BeforeValidator(_max_tokens_value)]
Modalities = list[Literal["text", "audio"]]

# Step-Audio TTS instruction tags: "(高兴1)(粤语)"; the model accepts tags beyond its trained list.
_INSTRUCTION = re.compile(r"(?:[（(][^()（）]{1,16}[)）]){0,8}")


def _instruction_value(v: str | None) -> str | None:
    if v is not None and not _INSTRUCTION.fullmatch(v):
        raise ValueError('expected up to 8 parenthesised tags such as "(高兴1)(粤语)", or ""')
    return v


Instruction = Annotated[str | None, AfterValidator(_instruction_value)]

