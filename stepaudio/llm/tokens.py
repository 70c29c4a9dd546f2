"""Token ids fixed by the Step-Audio vocabulary, and the ``<audio_N>`` text form of audio ids.

Kept free of transformers so prompt builders and the audio side can share them cheaply.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

BOS_ID = 1
#: ``</s>``: the tokenizer's own eos, which the models never emit; generation stops on EOT_ID.
EOS_PIECE_ID = 2
EOT_ID = 3
BOT_ID = 4
AUDIO_TOKEN_OFFSET = 65536

BOS = "<s>"
EOT = "<|EOT|>"
BOT = "<|BOT|>"

_AUDIO_RUN = re.compile(r"(?:<audio_\d+>)+")
_AUDIO_ONE = re.compile(r"<audio_(\d+)>")


def audio_ids_to_token_str(ids: Iterable[int]) -> str:
    """``[65548, 66566]`` -> ``"<audio_12><audio_1030>"`` (the LLM ids of ``wav2token``)."""
    parts = []
    for token_id in ids:
        token_id = int(token_id)
        if token_id < AUDIO_TOKEN_OFFSET:
            raise ValueError(
                f"audio token id {token_id} is below {AUDIO_TOKEN_OFFSET}; pass LLM ids "
                "(65536 + code), not raw codes"
            )
        parts.append(f"<audio_{token_id - AUDIO_TOKEN_OFFSET}>")
    return "".join(parts)


def is_audio_token_str(text: str) -> bool:
    """True for a non-empty run of ``<audio_N>`` tokens and nothing else."""
    return bool(_AUDIO_RUN.fullmatch(text))


def audio_token_str_to_ids(text: str) -> list[int]:
    """Inverse of :func:`audio_ids_to_token_str`."""
    if not is_audio_token_str(text):
        raise ValueError("expected a run of <audio_N> tokens")
    return [AUDIO_TOKEN_OFFSET + int(code) for code in _AUDIO_ONE.findall(text)]
