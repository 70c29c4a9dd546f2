"""Session configuration: the ``session.update`` wire shapes of both dialects, the effective
configuration they patch, and the merge rules (all or nothing)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from server.protocol.audio import AudioFormat, AudioKind
from server.protocol.common import (
    DEFAULT_INSTRUCTIONS,
    DEFAULT_VOICE,
    MAX_LANGUAGE_CHARS,
    MAX_PROMPT_CHARS,
    OPENAI_VOICES,
    TRANSCRIPTION_MODEL,
    Dialect,
    Instruction,
    Instructions,
    Int,
    MaxTokens,
    Modalities,
    Name,
    ProtocolError,
    Voice,
    _Wire,
    new_id,
)

if TYPE_CHECKING:
    from server.protocol.client_events import ResponseParams
    from stepaudio.config import SessionDefaults


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
    model: Name | None = None
    language: str | None = Field(None, max_length=MAX_LANGUAGE_CHARS)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
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
    instructions: Instructions = None
    voice: Voice = None
    tools: list[Any] | None = None
    tool_choice: Any = None  # accepted
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    model: Name | None = None  # accepted (echoed back)
    tracing: Any = None  # accepted
    id: Name | None = None  # accepted: clients echo session.created back
    object: Name | None = None  # accepted
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


def speaker_of(voice: str) -> str:
    """The Step-Audio speaker of a voice: OpenAI's voice names fall back to the default one."""
    return DEFAULT_VOICE if voice in OPENAI_VOICES else voice


@dataclass(frozen=True)
class ReplySettings:
    """The session settings one reply uses, frozen at its start (plus ``response.create``'s
    overrides): :meth:`SessionConfig.reply_settings`."""

    instructions: str
    speaker: str
    voice: str
    tts_instruction: str
    audio_output: bool
    output_format: AudioFormat
    temperature: float | None
    max_output_tokens: int | None
    max_output_tokens_wire: int | Literal["inf"]
    metadata: dict[str, str] | None = None


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
        return speaker_of(self.voice)

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

    def reply_settings(self, params: ResponseParams | None = None) -> ReplySettings:
        """What one reply runs with: this configuration, with ``response.create``'s overrides."""
        instructions, voice, audio = self.instructions, self.voice, self.audio_output
        fmt, temp, maxt = self.output_format, self.temperature, self.max_output_tokens
        tags, metadata = self.tts_instruction, None
        if params is not None:
            if params.instructions is not None:
                instructions = params.instructions
            if params.voice:
                voice = params.voice
            mods = params.modalities or params.output_modalities
            if mods:
                audio = "audio" in mods
            if params.output_audio_format:
                fmt = AudioFormat(kind=params.output_audio_format)
            if params.audio and params.audio.output:
                if params.audio.output.format is not None:
                    fmt = AudioFormat.from_ga(params.audio.output.format.type)
                if params.audio.output.voice:
                    voice = params.audio.output.voice
            if params.temperature is not None:
                temp = params.temperature
            for m in (params.max_response_output_tokens, params.max_output_tokens):
                if m is not None:
                    maxt = m
            if params.stepaudio and params.stepaudio.instruction is not None:
                tags = params.stepaudio.instruction
            metadata = params.metadata
        return ReplySettings(
            instructions=instructions, speaker=speaker_of(voice), voice=voice,
            tts_instruction=tags, audio_output=audio, output_format=fmt, temperature=temp,
            max_output_tokens=None if maxt == "inf" else int(maxt), max_output_tokens_wire=maxt,
            metadata=metadata)

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


def default_session_config(s: SessionDefaults) -> SessionConfig:
    """A new session's configuration from the ``session`` section of the server config."""
    base = SessionConfig()
    td = base.turn_detection
    assert td is not None
    upd: dict[str, Any] = {
        "voice": s.voice,
        "turn_detection": td.model_copy(update={
            "silence_duration_ms": s.silence_duration_ms,
            "prefix_padding_ms": s.prefix_padding_ms,
            "threshold": s.vad_threshold,
        }),
        "stepaudio": base.stepaudio.model_copy(update={
            "pause_ms": s.pause_ms, "min_barge_in_ms": s.min_barge_in_ms,
            "speculative": s.speculative}),
    }
    if s.instructions is not None:
        upd["instructions"] = s.instructions
    if s.max_output_tokens is not None:
        upd["max_output_tokens"] = s.max_output_tokens
    if not s.transcription:
        upd["transcription"] = None
    return base.model_copy(update=upd)


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
    upd: dict[str, Any] = {k: getattr(new, k) for k in ("model", "language", "prompt")
                           if k in new.model_fields_set}
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
                upd["input_format"] = AudioFormat.from_ga(ain.format.type)
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
                upd["output_format"] = AudioFormat.from_ga(aout.format.type)
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


