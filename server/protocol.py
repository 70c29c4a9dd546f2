"""The wire protocol: OpenAI Realtime-compatible JSON events, both dialects, plus ``stepaudio.*``.

Everything a WebSocket frame can contain is defined here and nowhere else (``docs/protocol.md`` is
the prose version): the client events we accept, the server events we send, the session
configuration in its two shapes (beta: flat ``input_audio_format``…; GA: nested ``audio.input``…),
the audio formats on the wire (pcm16 24 kHz, G.711 μ-law / A-law 8 kHz) and the error codes.

Parsing never raises on client input: :func:`parse_client_event` returns either a typed event or a
:class:`ProtocolError` whose message names the offending field, so one bad frame costs the client an
``error`` event and nothing else.

Dialect rule (beta vs GA names): a session starts in the dialect its handshake announces
(:func:`dialect_from_handshake`: the ``OpenAI-Beta: realtime=v1`` header or the
``openai-beta.realtime-v1`` subprotocol mean beta, as the official SDKs send them; otherwise GA), and
every ``session.update`` that uses fields of only one dialect switches the session to it
(:func:`session_update_dialect`). Server events are built once, with the beta names, and rendered per
dialect by :meth:`ServerEvent.to_wire`; an event that one dialect does not have renders to ``None``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)

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

    def to_event(self) -> ErrorEvent:
        return ErrorEvent(error=self)


# ---------------------------------------------------------------------------------------------------
# Audio formats and G.711 codecs


AudioKind = Literal["pcm16", "g711_ulaw", "g711_alaw"]
_GA_FORMAT = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
_FORMAT_FROM_GA = {v: k for k, v in _GA_FORMAT.items()}


class AudioFormat(BaseModel):
    """An audio format on the wire: always mono; pcm16 little-endian at 24 kHz, G.711 at 8 kHz."""

    model_config = ConfigDict(frozen=True)

    kind: AudioKind = "pcm16"

    @property
    def rate(self) -> int:
        return 24000 if self.kind == "pcm16" else 8000

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.kind == "pcm16" else 1

    def ms(self, num_bytes: int) -> float:
        """Duration of ``num_bytes`` of this format (playback accounting counts bytes sent)."""
        return 1000.0 * num_bytes / (self.bytes_per_sample * self.rate)

    def render(self, dialect: Dialect) -> Any:
        if dialect == "beta":
            return self.kind
        out: dict[str, Any] = {"type": _GA_FORMAT[self.kind]}
        if self.kind == "pcm16":
            out["rate"] = self.rate
        return out


def _ulaw_encode_table() -> np.ndarray:
    # Sun Microsystems' g711.c (what CPython's audioop implemented), vectorised over all int16.
    x = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    code = (seg << 4) | ((mag >> (seg + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_encode_table() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32) >> 3
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag)
    low = np.where(seg < 2, (mag >> 1) & 0xF, (mag >> np.maximum(seg, 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | low)
    return (code ^ mask).astype(np.uint8)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW_ENC, _ULAW_DEC = _ulaw_encode_table(), _ulaw_decode_table()
_ALAW_ENC, _ALAW_DEC = _alaw_encode_table(), _alaw_decode_table()


def ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> G.711 μ-law bytes (bit-exact with the old ``audioop.lin2ulaw``)."""
    return _ULAW_ENC[np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768]


def ulaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    return _ULAW_DEC[np.frombuffer(codes, dtype=np.uint8) if isinstance(codes, bytes) else codes]


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> G.711 A-law bytes (bit-exact with the old ``audioop.lin2alaw``)."""
    return _ALAW_ENC[np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768]


def alaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    return _ALAW_DEC[np.frombuffer(codes, dtype=np.uint8) if isinstance(codes, bytes) else codes]


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0
    return np.rint(x).astype(np.int16)


def encode_audio(samples: np.ndarray, fmt: AudioFormat) -> bytes:
    """Mono float32 samples, already at ``fmt.rate``, -> wire bytes (before base64)."""
    pcm = float_to_int16(samples)
    if fmt.kind == "pcm16":
        return pcm.astype("<i2").tobytes()
    return (ulaw_encode(pcm) if fmt.kind == "g711_ulaw" else alaw_encode(pcm)).tobytes()


def encode_audio_b64(samples: np.ndarray, fmt: AudioFormat) -> str:
    return base64.b64encode(encode_audio(samples, fmt)).decode("ascii")


def decode_audio(
    raw: bytes, fmt: AudioFormat, event_id: str | None = None
) -> np.ndarray | ProtocolError:
    """Wire bytes -> mono float32 at ``fmt.rate``; an odd byte count of pcm16 is an error."""
    if fmt.kind == "pcm16":
        if len(raw) % 2:
            return ProtocolError(
                code="invalid_audio",
                message=f"audio: pcm16 needs an even number of bytes, got {len(raw)} "
                "(16-bit little-endian mono samples)",
                param="audio",
                event_id=event_id,
            )
        pcm = np.frombuffer(raw, dtype="<i2")
    elif fmt.kind == "g711_ulaw":
        pcm = ulaw_decode(raw)
    else:
        pcm = alaw_decode(raw)
    return pcm.astype(np.float32) / 32768.0


def decode_base64(
    text: str, param: str = "audio", event_id: str | None = None
) -> bytes | ProtocolError:
    """Strict base64 (standard alphabet, padded, no whitespace): anything else is a client bug."""
    if not text:
        return ProtocolError(
            code="invalid_audio", message=f"{param}: is empty", param=param, event_id=event_id
        )
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return ProtocolError(
            code="invalid_base64",
            message=f"{param}: not valid base64 (standard alphabet with '=' padding expected)",
            param=param,
            event_id=event_id,
        )


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
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict) and set(v) == {"id"} and isinstance(v["id"], str):
        return v["id"]
    raise ValueError('expected a voice name or {"id": name}')


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
MaxTokens = Annotated[Any, BeforeValidator(_max_tokens_value)]
Modalities = list[Literal["text", "audio"]]

# Step-Audio TTS instruction tags: "(高兴1)(粤语)"; the model accepts tags beyond its trained list.
_INSTRUCTION = re.compile(r"(?:[（(][^()（）]{1,16}[)）]){0,8}")


def _instruction_value(v: str | None) -> str | None:
    if v is not None and not _INSTRUCTION.fullmatch(v):
        raise ValueError('expected up to 8 parenthesised tags such as "(高兴1)(粤语)", or ""')
    return v


Instruction = Annotated[str | None, AfterValidator(_instruction_value)]


# ---------------------------------------------------------------------------------------------------
# Session configuration: wire shapes (both dialects) and the effective configuration


class TurnDetectionIn(_Wire):
    type: Literal["server_vad", "semantic_vad"] | None = None
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    prefix_padding_ms: Int | None = Field(None, ge=0, le=5000)
    silence_duration_ms: Int | None = Field(None, ge=100, le=10000)
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: Int | None = Field(None, ge=1000)
    eagerness: Literal["low", "medium", "high", "auto"] | None = None


class TranscriptionIn(_Wire):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None
    # GA-only knobs of OpenAI's transcription models: accepted, not used.
    delay: str | None = None
    keywords: list[str] | None = None
    languages: list[str] | None = None


class NoiseReductionIn(_Wire):
    type: Literal["near_field", "far_field"] | None = None
    strength: float | None = None


class FormatIn(_Wire):
    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
    rate: Int | None = None

    @field_validator("rate")
    @classmethod
    def _rate(cls, v: int | None) -> int | None:
        if v is not None and v != 24000:
            raise ValueError("only 24000 is supported for audio/pcm (G.711 is always 8000)")
        return v


class AudioInputIn(_Wire):
    format: FormatIn | None = None
    noise_reduction: NoiseReductionIn | None = None
    transcription: TranscriptionIn | None = None
    turn_detection: TurnDetectionIn | None = None


class AudioOutputIn(_Wire):
    format: FormatIn | None = None
    voice: Voice = None
    speed: float | None = Field(None, ge=0.25, le=1.5)


class AudioIn(_Wire):
    input: AudioInputIn | None = None
    output: AudioOutputIn | None = None


class StepAudioOptionsIn(_Wire):
    """The ``stepaudio`` object of ``session.update``: Step-Audio knobs standard clients never send."""

    instruction: Instruction = None
    pause_ms: Int | None = Field(None, ge=50, le=5000)
    min_barge_in_ms: Int | None = Field(None, ge=0, le=5000)
    speculative: bool | None = None
    events: bool | None = None


_BETA_ONLY = frozenset(
    {
        "modalities",
        "input_audio_format",
        "output_audio_format",
        "input_audio_transcription",
        "input_audio_noise_reduction",
        "turn_detection",
        "max_response_output_tokens",
        "speed",
        "client_secret",
    }
)
_GA_ONLY = frozenset(
    {
        "type",
        "audio",
        "output_modalities",
        "max_output_tokens",
        "include",
        "truncation",
        "prompt",
        "reasoning",
        "parallel_tool_calls",
    }
)


class SessionPatch(_Wire):
    """``session.update``'s ``session`` in either dialect; only the fields present are applied.

    Fields marked "accepted" are OpenAI features this server does not implement: they are taken (so
    stock clients work) and ignored, and listed in docs/protocol.md.
    """

    # Both dialects
    instructions: str | None = None
    voice: Voice = None
    tools: list[Any] | None = None
    tool_choice: Any = None  # accepted
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    model: str | None = None  # accepted (echoed back)
    tracing: Any = None  # accepted
    id: str | None = None  # accepted: clients echo session.created back
    object: str | None = None  # accepted
    expires_at: Int | None = None  # accepted
    stepaudio: StepAudioOptionsIn | None = None
    # Beta only
    modalities: Modalities | None = None
    input_audio_format: AudioKind | None = None
    output_audio_format: AudioKind | None = None
    input_audio_transcription: TranscriptionIn | None = None
    input_audio_noise_reduction: NoiseReductionIn | None = None
    turn_detection: TurnDetectionIn | None = None
    max_response_output_tokens: MaxTokens = None
    speed: float | None = Field(None, ge=0.25, le=1.5)
    client_secret: Any = None  # accepted
    # GA only
    type: Literal["realtime"] | None = None
    audio: AudioIn | None = None
    output_modalities: Modalities | None = None
    max_output_tokens: MaxTokens = None
    include: Any = None  # accepted
    truncation: Any = None  # accepted
    prompt: Any = None  # accepted
    reasoning: Any = None  # accepted
    parallel_tool_calls: Any = None  # accepted


class TurnDetection(BaseModel):
    """Effective turn detection; ``None`` in :class:`SessionConfig` means manual turns."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    #: End of turn after this much silence. 750, not OpenAI's 500: speculation hides the wait.
    silence_duration_ms: int = 750
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None  # accepted, not acted on
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"

    #: semantic_vad has no semantic model here: eagerness picks the end-of-turn silence.
    EAGERNESS_SILENCE_MS: ClassVar[dict[str, int]] = {
        "low": 1500,
        "medium": 750,
        "auto": 750,
        "high": 400,
    }

    @property
    def end_of_turn_ms(self) -> int:
        if self.type == "semantic_vad":
            return self.EAGERNESS_SILENCE_MS[self.eagerness]
        return self.silence_duration_ms

    def render(self, dialect: Dialect) -> dict[str, Any]:
        if self.type == "semantic_vad":
            return {
                "type": self.type,
                "eagerness": self.eagerness,
                "create_response": self.create_response,
                "interrupt_response": self.interrupt_response,
            }
        return {
            "type": self.type,
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
            "idle_timeout_ms": self.idle_timeout_ms,
        }


class Transcription(BaseModel):
    model: str = TRANSCRIPTION_MODEL
    language: str | None = None
    prompt: str | None = None


class StepAudioOptions(BaseModel):
    """Step-Audio extras with their defaults (the ``stepaudio`` object of the session)."""

    #: TTS instruction tags put before every reply's text, e.g. "(高兴1)(粤语)".
    instruction: str = ""
    #: A silence this long starts a speculative reply on the user's audio so far.
    pause_ms: int = 250
    #: User speech must last this long while the bot talks to interrupt it (filters "uh-huh").
    min_barge_in_ms: int = 300
    speculative: bool = True
    #: Send ``stepaudio.*`` events (state changes, timings, speculation, profile).
    events: bool = True


class SessionConfig(BaseModel):
    """The effective session configuration, one shape for both dialects (rendered per dialect)."""

    id: str = Field(default_factory=lambda: new_id("sess"))
    model: str = "step-audio-chat"
    instructions: str = DEFAULT_INSTRUCTIONS
    voice: str = DEFAULT_VOICE
    audio_output: bool = True  # modalities: audio (+ its transcript) or text only
    input_format: AudioFormat = AudioFormat()
    output_format: AudioFormat = AudioFormat()
    transcription: Transcription | None = Field(default_factory=Transcription)
    noise_reduction: NoiseReductionIn | None = None  # accepted, not applied
    turn_detection: TurnDetection | None = Field(default_factory=TurnDetection)
    temperature: float | None = None  # None: the model's default sampling
    max_output_tokens: int | Literal["inf"] = "inf"
    speed: float = 1.0
    stepaudio: StepAudioOptions = Field(default_factory=StepAudioOptions)

    @property
    def speaker(self) -> str:
        """The Step-Audio speaker: OpenAI voice names fall back to the default speaker."""
        return DEFAULT_VOICE if self.voice in OPENAI_VOICES else self.voice

    @property
    def tts_instruction(self) -> str:
        """Tags for the TTS: the session's instruction plus a speed tag derived from ``speed``."""
        s = self.speed
        tag = (
            "(慢速2)"
            if s <= 0.7
            else "(慢速1)"
            if s < 0.95
            else "(快速2)"
            if s >= 1.3
            else ("(快速1)" if s > 1.05 else "")
        )
        return self.stepaudio.instruction + (
            tag if tag and tag not in self.stepaudio.instruction else ""
        )

    def render(self, dialect: Dialect) -> dict[str, Any]:
        td = self.turn_detection.render(dialect) if self.turn_detection else None
        tr = self.transcription.model_dump() if self.transcription else None
        nr = self.noise_reduction.model_dump(exclude_none=True) if self.noise_reduction else None
        common: dict[str, Any] = {"id": self.id, "object": "realtime.session", "model": self.model}
        if dialect == "beta":
            return {
                **common,
                "modalities": ["text", "audio"] if self.audio_output else ["text"],
                "instructions": self.instructions,
                "voice": self.voice,
                "input_audio_format": self.input_format.render("beta"),
                "output_audio_format": self.output_format.render("beta"),
                "input_audio_transcription": tr,
                "input_audio_noise_reduction": nr,
                "turn_detection": td,
                "tools": [],
                "tool_choice": "auto",
                "temperature": self.temperature if self.temperature is not None else 0.7,
                "max_response_output_tokens": self.max_output_tokens,
                "speed": self.speed,
                "tracing": None,
                "stepaudio": self.stepaudio.model_dump(),
            }
        return {
            "type": "realtime",
            **common,
            "output_modalities": ["audio"] if self.audio_output else ["text"],
            "instructions": self.instructions,
            "audio": {
                "input": {
                    "format": self.input_format.render("ga"),
                    "transcription": tr,
                    "noise_reduction": nr,
                    "turn_detection": td,
                },
                "output": {
                    "format": self.output_format.render("ga"),
                    "voice": self.voice,
                    "speed": self.speed,
                },
            },
            "tools": [],
            "tool_choice": "auto",
            "max_output_tokens": self.max_output_tokens,
            "tracing": None,
            "stepaudio": self.stepaudio.model_dump(),
        }


def session_update_dialect(patch: SessionPatch) -> Dialect | None | ProtocolError:
    """Which dialect a ``session.update`` speaks: ``None`` when its fields exist in both."""
    present = patch.model_fields_set
    beta, ga = present & _BETA_ONLY, present & _GA_ONLY
    if beta and ga:
        return ProtocolError(
            code="mixed_dialect",
            message=f"session.update mixes beta fields ({', '.join(sorted(beta))}) with GA fields "
            f"({', '.join(sorted(ga))}); use one shape",
            param="session",
        )
    return "beta" if beta else "ga" if ga else None


def _merge_turn_detection(
    cur: TurnDetection | None, new: TurnDetectionIn | None
) -> TurnDetection | None:
    if new is None:
        return None
    # A patch without a type (or with the current type) refines the current settings; another type
    # starts from that type's defaults.
    base = (
        cur
        if cur is not None and new.type in (None, cur.type)
        else TurnDetection(type=new.type or "server_vad")
    )
    fields = {k: getattr(new, k) for k in new.model_fields_set if k != "type"}
    return base.model_copy(update={k: v for k, v in fields.items() if v is not None})


def _merge_transcription(
    cur: Transcription | None, new: TranscriptionIn | None
) -> Transcription | None:
    if new is None:
        return None
    base = cur or Transcription()
    upd = {k: getattr(new, k) for k in ("model", "language", "prompt") if k in new.model_fields_set}
    if upd.get("model") is None:
        upd.pop("model", None)
    return base.model_copy(update=upd)


def apply_session_update(
    config: SessionConfig, patch: SessionPatch, event_id: str | None = None
) -> SessionConfig | ProtocolError:
    """The configuration after ``patch``; all or nothing (an error leaves ``config`` as it was).

    Nested objects merge field by field; ``null`` turns a feature off (``turn_detection`` → manual
    turns, transcription off), ``""`` clears ``instructions``.
    """
    err = session_update_dialect(patch)
    if isinstance(err, ProtocolError):
        return err.model_copy(update={"event_id": event_id})
    s = patch.model_fields_set
    upd: dict[str, Any] = {}

    def fail(code: str, message: str, param: str) -> ProtocolError:
        return ProtocolError(code=code, message=message, param=param, event_id=event_id)

    if "tools" in s and patch.tools:
        return fail(
            "unsupported_feature", "session.tools: this server has no tool calling", "session.tools"
        )
    if "instructions" in s:
        upd["instructions"] = patch.instructions or ""
    if "voice" in s and patch.voice:
        upd["voice"] = patch.voice
    if "temperature" in s:
        upd["temperature"] = patch.temperature
    if "model" in s and patch.model:
        upd["model"] = patch.model
    for key in ("modalities", "output_modalities"):
        if key in s and getattr(patch, key) is not None:
            mods = set(getattr(patch, key))
            if not mods:
                return fail("invalid_value", f"session.{key}: must not be empty", f"session.{key}")
            upd["audio_output"] = "audio" in mods
    for key in ("max_response_output_tokens", "max_output_tokens"):
        if key in s and getattr(patch, key) is not None:
            upd["max_output_tokens"] = getattr(patch, key)
    # Beta, flat
    if "input_audio_format" in s and patch.input_audio_format:
        upd["input_format"] = AudioFormat(kind=patch.input_audio_format)
    if "output_audio_format" in s and patch.output_audio_format:
        upd["output_format"] = AudioFormat(kind=patch.output_audio_format)
    if "input_audio_transcription" in s:
        upd["transcription"] = _merge_transcription(
            config.transcription, patch.input_audio_transcription
        )
    if "input_audio_noise_reduction" in s:
        upd["noise_reduction"] = patch.input_audio_noise_reduction
    if "turn_detection" in s:
        upd["turn_detection"] = _merge_turn_detection(config.turn_detection, patch.turn_detection)
    if "speed" in s and patch.speed is not None:
        upd["speed"] = patch.speed
    # GA, nested
    if patch.audio is not None:
        ain, aout = patch.audio.input, patch.audio.output
        if ain is not None:
            si = ain.model_fields_set
            if ain.format is not None:
                upd["input_format"] = AudioFormat(kind=_FORMAT_FROM_GA[ain.format.type])
            if "transcription" in si:
                upd["transcription"] = _merge_transcription(config.transcription, ain.transcription)
            if "noise_reduction" in si:
                upd["noise_reduction"] = ain.noise_reduction
            if "turn_detection" in si:
                upd["turn_detection"] = _merge_turn_detection(
                    config.turn_detection, ain.turn_detection
                )
        if aout is not None:
            if aout.format is not None:
                upd["output_format"] = AudioFormat(kind=_FORMAT_FROM_GA[aout.format.type])
            if aout.voice:
                upd["voice"] = aout.voice
            if aout.speed is not None:
                upd["speed"] = aout.speed
    if patch.stepaudio is not None:
        sa = {k: getattr(patch.stepaudio, k) for k in patch.stepaudio.model_fields_set}
        upd["stepaudio"] = config.stepaudio.model_copy(
            update={k: v for k, v in sa.items() if v is not None}
        )
    return config.model_copy(update=upd)


# ---------------------------------------------------------------------------------------------------
# Conversation items (in: conversation.item.create; out: every event that carries an item)


ContentType = Literal["input_text", "input_audio", "text", "output_text", "audio", "output_audio"]


class ContentIn(_Wire):
    type: ContentType
    text: str | None = None
    audio: str | None = None  # base64 in the session's input format
    transcript: str | None = None
    id: str | None = None


class ItemIn(_Wire):
    """A client-created item. Only messages: function calls need tools, which this server lacks."""

    id: str | None = Field(None, max_length=64)
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


# ---------------------------------------------------------------------------------------------------
# Client events


class ResponseAudioOutputIn(_Wire):
    format: FormatIn | None = None
    voice: Voice = None


class ResponseAudioIn(_Wire):
    output: ResponseAudioOutputIn | None = None


class StepAudioResponseIn(_Wire):
    instruction: Instruction = None


class ResponseParams(_Wire):
    """``response.create``'s ``response``: per-response overrides of the session."""

    instructions: str | None = None
    voice: Voice = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    conversation: Literal["auto"] | None = None
    metadata: dict[str, str] | None = None
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
    event_id: str | None = Field(None, max_length=128)


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
    previous_item_id: str | None = None
    item: ItemIn


class ConversationItemTruncate(ClientEventBase):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: Int = Field(0, ge=0)
    audio_end_ms: Int = Field(ge=0)


class ConversationItemDelete(ClientEventBase):
    type: Literal["conversation.item.delete"]
    item_id: str


class ConversationItemRetrieve(ClientEventBase):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class ResponseCreate(ClientEventBase):
    type: Literal["response.create"]
    response: ResponseParams | None = None


class ResponseCancel(ClientEventBase):
    type: Literal["response.cancel"]
    response_id: str | None = None


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
        else:
            out += ("." if out else "") + str(part)
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
        return json.dumps(value, ensure_ascii=False)[:60]
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
    event_id = obj.get("event_id") if isinstance(obj.get("event_id"), str) else None
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
    cls = CLIENT_EVENTS.get(etype)
    if cls is None:
        hint = " (that is a server event)" if etype.startswith(_SERVER_ONLY_PREFIXES) else ""
        return ProtocolError(
            code="unknown_event_type",
            message=f"unknown event type {etype[:80]!r}{hint}; expected one of {', '.join(sorted(CLIENT_EVENTS))}",
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


def dialect_from_handshake(
    headers: Mapping[str, str] | None = None,
    subprotocols: Sequence[str] = (),
    query: Mapping[str, str] | None = None,
) -> Dialect:
    """The dialect a connection starts in: what the official SDKs announce when they connect.

    The beta SDK sends ``OpenAI-Beta: realtime=v1`` (browsers, which cannot set headers, offer the
    ``openai-beta.realtime-v1`` subprotocol); GA clients send neither. ``?dialect=beta|ga`` on the
    URL overrides both, for hand-written clients.
    """
    if query:
        forced = query.get("dialect")
        if forced in ("beta", "ga"):
            return forced  # type: ignore[return-value]
    for key, value in (headers or {}).items():
        if key.lower() == "openai-beta" and "realtime=v1" in value.replace(" ", "").lower():
            return "beta"
    if any(p.lower() == "openai-beta.realtime-v1" for p in subprotocols):
        return "beta"
    return "ga"


# ---------------------------------------------------------------------------------------------------
# Server events


#: Beta name -> GA name, for the events that were renamed.
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
        return None if wire is None else json.dumps(wire, ensure_ascii=False, separators=(",", ":"))


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
    profile: Literal["tiny", "real"]
    note: str
    models: dict[str, str] = Field(default_factory=dict)

    TINY_NOTE: ClassVar[str] = "tiny random-weight checkpoints: babble is expected"
