"""Server events, built once with their beta names and rendered per dialect by ``to_wire``."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol.audio import AudioFormat
from server.protocol.common import DEFAULT_VOICE, Dialect, ProtocolError, new_id
from server.protocol.items import Item
from server.protocol.session_config import SessionConfig

GA_NAMES = {
    "response.audio.delta": "response.output_audio.delta",
    "response.audio.done": "response.output_audio.done",
    "response.audio_transcript.delta": "response.output_audio_transcript.delta",
    "response.audio_transcript.done": "response.output_audio_transcript.done",
    "response.text.delta": "response.output_text.delta",
    "response.text.done": "response.output_text.done",
    "conversation.item.created": "conversation.item.added",
}
GA_ONLY_EVENTS = frozenset({"conversation.item.done"})


def _render(value: Any, dialect: Dialect) -> Any:
    if hasattr(value, "render"):
        return value.render(dialect)
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_render(v, dialect) for v in value]
    return value


class ServerEvent(BaseModel):
    """A server event, built with its beta name and rendered per dialect by :meth:`to_wire`."""

    model_config = ConfigDict(extra="forbid")

    type: str
    event_id: str = Field(default_factory=lambda: new_id("event"))

    def wire_type(self, dialect: Dialect) -> str | None:
        if dialect == "ga":
            return GA_NAMES.get(self.type, self.type)
        return None if self.type in GA_ONLY_EVENTS else self.type

    def to_wire(self, dialect: Dialect) -> dict[str, Any] | None:
        name = self.wire_type(dialect)
        if name is None:
            return None
        out: dict[str, Any] = {"type": name, "event_id": self.event_id}
        for key in type(self).model_fields:
            if key not in ("type", "event_id"):
                out[key] = _render(getattr(self, key), dialect)
        return out

    def to_json(self, dialect: Dialect) -> str | None:
        wire = self.to_wire(dialect)
        if wire is None:
            return None
        text = json.dumps(wire, ensure_ascii=False, separators=(",", ":"))
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate got this far: escape it, never fail
                text = json.dumps(wire, separators=(",", ":"))
        return text


class ErrorEvent(ServerEvent):
    type: Literal["error"] = "error"
    error: ProtocolError


class SessionCreated(ServerEvent):
    type: Literal["session.created"] = "session.created"
    session: SessionConfig


class SessionUpdated(ServerEvent):
    type: Literal["session.updated"] = "session.updated"
    session: SessionConfig


class SpeechStarted(ServerEvent):
    """The user started talking: clients stop playback and drop queued audio on this event."""

    type: Literal["input_audio_buffer.speech_started"] = "input_audio_buffer.speech_started"
    audio_start_ms: int
    item_id: str


class SpeechStopped(ServerEvent):
    type: Literal["input_audio_buffer.speech_stopped"] = "input_audio_buffer.speech_stopped"
    audio_end_ms: int
    item_id: str


class InputAudioBufferCommitted(ServerEvent):
    type: Literal["input_audio_buffer.committed"] = "input_audio_buffer.committed"
    previous_item_id: str | None = None
    item_id: str


class InputAudioBufferCleared(ServerEvent):
    type: Literal["input_audio_buffer.cleared"] = "input_audio_buffer.cleared"


class ConversationItemCreated(ServerEvent):
    """Beta ``conversation.item.created``; GA ``conversation.item.added``."""

    type: Literal["conversation.item.created"] = "conversation.item.created"
    previous_item_id: str | None = None
    item: Item


class ConversationItemDone(ServerEvent):
    """GA only: the item is final (beta clients get nothing)."""

    type: Literal["conversation.item.done"] = "conversation.item.done"
    previous_item_id: str | None = None
    item: Item


class ConversationItemRetrieved(ServerEvent):
    type: Literal["conversation.item.retrieved"] = "conversation.item.retrieved"
    item: Item


class TranscriptionCompleted(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.completed"] = (
        "conversation.item.input_audio_transcription.completed"
    )
    item_id: str
    content_index: int = 0
    transcript: str
    usage: dict[str, Any] | None = None


class TranscriptionFailed(ServerEvent):
    type: Literal["conversation.item.input_audio_transcription.failed"] = (
        "conversation.item.input_audio_transcription.failed"
    )
    item_id: str
    content_index: int = 0
    error: ProtocolError


class ConversationItemTruncated(ServerEvent):
    type: Literal["conversation.item.truncated"] = "conversation.item.truncated"
    item_id: str
    content_index: int = 0
    audio_end_ms: int


class ConversationItemDeleted(ServerEvent):
    type: Literal["conversation.item.deleted"] = "conversation.item.deleted"
    item_id: str


class Usage(BaseModel):
    """Token usage of a response: input = the prompt, output = text + audio tokens generated."""

    input_text_tokens: int = 0
    input_audio_tokens: int = 0
    output_text_tokens: int = 0
    output_audio_tokens: int = 0

    def render(self, dialect: Dialect) -> dict[str, Any]:
        inp = self.input_text_tokens + self.input_audio_tokens
        out = self.output_text_tokens + self.output_audio_tokens
        return {
            "total_tokens": inp + out,
            "input_tokens": inp,
            "output_tokens": out,
            "input_token_details": {
                "text_tokens": self.input_text_tokens,
                "audio_tokens": self.input_audio_tokens,
                "cached_tokens": 0,
            },
            "output_token_details": {
                "text_tokens": self.output_text_tokens,
                "audio_tokens": self.output_audio_tokens,
            },
        }


ResponseStatus = Literal["in_progress", "completed", "cancelled", "failed", "incomplete"]


class Response(BaseModel):
    """A response as ``response.created`` / ``response.done`` carry it."""

    id: str = Field(default_factory=lambda: new_id("resp"))
    status: ResponseStatus = "in_progress"
    #: cancelled: "turn_detected" (barge-in) or "client_cancelled"; incomplete: "max_output_tokens".
    reason: str | None = None
    error: ProtocolError | None = None
    output: list[Item] = Field(default_factory=list)
    usage: Usage | None = None
    audio_output: bool = True
    output_format: AudioFormat = AudioFormat()
    voice: str = DEFAULT_VOICE
    max_output_tokens: int | Literal["inf"] = "inf"
    metadata: dict[str, str] | None = None

    def render(self, dialect: Dialect) -> dict[str, Any]:
        details: dict[str, Any] | None = None
        if self.status in ("cancelled", "incomplete", "failed"):
            details = {"type": self.status, "reason": self.reason}
            if self.error is not None:
                details["error"] = {
                    "type": self.error.type,
                    "code": self.error.code,
                    "message": self.error.message,
                }
        out: dict[str, Any] = {
            "id": self.id,
            "object": "realtime.response",
            "status": self.status,
            "status_details": details,
            "output": [i.render(dialect) for i in self.output],
            "conversation_id": "conv_default",
            "usage": self.usage.render(dialect) if self.usage else None,
            "metadata": self.metadata,
            "max_output_tokens": self.max_output_tokens,
        }
        if dialect == "beta":
            out["modalities"] = ["text", "audio"] if self.audio_output else ["text"]
            out["output_audio_format"] = self.output_format.render("beta")
            out["voice"] = self.voice
        else:
            out["output_modalities"] = ["audio"] if self.audio_output else ["text"]
            out["audio"] = {
                "output": {"format": self.output_format.render("ga"), "voice": self.voice}
            }
        return out


class ResponseCreated(ServerEvent):
    type: Literal["response.created"] = "response.created"
    response: Response


class ResponseDone(ServerEvent):
    type: Literal["response.done"] = "response.done"
    response: Response


class OutputItemAdded(ServerEvent):
    type: Literal["response.output_item.added"] = "response.output_item.added"
    response_id: str
    output_index: int = 0
    item: Item


class OutputItemDone(ServerEvent):
    type: Literal["response.output_item.done"] = "response.output_item.done"
    response_id: str
    output_index: int = 0
    item: Item


class Part(BaseModel):
    type: Literal["audio", "text"] = "audio"
    transcript: str | None = None
    text: str | None = None

    def render(self, dialect: Dialect) -> dict[str, Any]:
        if self.type == "audio":
            return {"type": "audio", "transcript": self.transcript or ""}
        return {"type": "text", "text": self.text or ""}


class _InContent(ServerEvent):
    response_id: str
    item_id: str
    output_index: int = 0
    content_index: int = 0


class ContentPartAdded(_InContent):
    type: Literal["response.content_part.added"] = "response.content_part.added"
    part: Part


class ContentPartDone(_InContent):
    type: Literal["response.content_part.done"] = "response.content_part.done"
    part: Part


class AudioDelta(_InContent):
    """Beta ``response.audio.delta``; GA ``response.output_audio.delta``. ``delta`` is base64."""

    type: Literal["response.audio.delta"] = "response.audio.delta"
    delta: str


class AudioDone(_InContent):
    type: Literal["response.audio.done"] = "response.audio.done"


class AudioTranscriptDelta(_InContent):
    type: Literal["response.audio_transcript.delta"] = "response.audio_transcript.delta"
    delta: str


class AudioTranscriptDone(_InContent):
    type: Literal["response.audio_transcript.done"] = "response.audio_transcript.done"
    transcript: str


class TextDelta(_InContent):
    type: Literal["response.text.delta"] = "response.text.delta"
    delta: str


class TextDone(_InContent):
    type: Literal["response.text.done"] = "response.text.done"
    text: str


# --- stepaudio.* extensions: same in both dialects; standard clients ignore unknown types.

ControllerState = Literal["silence", "user_speaking", "user_paused", "bot_replying"]


class StateChanged(ServerEvent):
    """The turn-taking state machine moved (docs/protocol.md draws it)."""

    type: Literal["stepaudio.state"] = "stepaudio.state"
    state: ControllerState
    previous: ControllerState
    reason: str
    at_ms: int


class SpeculationEvent(ServerEvent):
    """A speculative reply started on the user's audio so far, was cancelled, or was committed."""

    type: Literal["stepaudio.speculation"] = "stepaudio.speculation"
    action: Literal["started", "cancelled", "committed"]
    speculation_id: str
    item_id: str
    audio_end_ms: int
    reason: str | None = None


class Timings(ServerEvent):
    """Per-stage timings of one response, in milliseconds (names in docs/protocol.md)."""

    type: Literal["stepaudio.timings"] = "stepaudio.timings"
    response_id: str
    speculative: bool
    timings_ms: dict[str, float]


class ProfileInfo(ServerEvent):
    """What the server runs, sent once after ``session.created`` (e.g. tiny random-weight models)."""

    type: Literal["stepaudio.profile"] = "stepaudio.profile"
    profile: Literal["tiny", "real", "random", "zero-cost stages"]
    note: str
    models: dict[str, str] = Field(default_factory=dict)

    TINY_NOTE: ClassVar[str] = "tiny random-weight checkpoints: babble is expected"
