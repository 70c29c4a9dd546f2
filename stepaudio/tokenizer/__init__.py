"""The dual-codebook audio tokenizer (linguistic vq02 + semantic vq06, interleaved 2:3).

Names are resolved lazily: importing the light modules (interleave, semantic) must not pay for the
funasr import that the linguistic model needs.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "StepAudioTokenizer": ".dual",
    "TokenizeResult": ".dual",
    "AudioTokenStream": ".streaming",
    "TokenizerStreams": ".streaming",
    "ids_to_text": ".interleave",
    "interleave_ids": ".interleave",
    "text_to_ids": ".interleave",
    "token_text": ".interleave",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name], __name__), name)
