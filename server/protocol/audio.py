"""Audio on the wire: the formats a session may use, and base64 / PCM / G.711 conversion.

The G.711 tables themselves live in :mod:`stepaudio.audio` (they are plain DSP, useful outside the
server); this module only maps the protocol's format names onto them.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from server.protocol.common import Dialect, ProtocolError
from stepaudio.audio import alaw_decode, alaw_encode, float_to_int16, ulaw_decode, ulaw_encode

__all__ = [
    "AudioFormat",
    "AudioKind",
    "alaw_decode",
    "alaw_encode",
    "decode_audio",
    "decode_base64",
    "encode_audio",
    "encode_audio_b64",
    "float_to_int16",
    "ulaw_decode",
    "ulaw_encode",
]

AudioKind = Literal["pcm16", "g711_ulaw", "g711_alaw"]
_GA_FORMAT: dict[AudioKind, str] = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
_FORMAT_FROM_GA: dict[str, AudioKind] = {v: k for k, v in _GA_FORMAT.items()}


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

    @classmethod
    def from_ga(cls, mime: str) -> AudioFormat:
        """The format a GA ``{"type": "audio/pcm"}`` names (the parser has checked the name)."""
        return cls(kind=_FORMAT_FROM_GA[mime])

    def render(self, dialect: Dialect) -> Any:
        if dialect == "beta":
            return self.kind
        out: dict[str, Any] = {"type": _GA_FORMAT[self.kind]}
        if self.kind == "pcm16":
            out["rate"] = self.rate
        return out



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


