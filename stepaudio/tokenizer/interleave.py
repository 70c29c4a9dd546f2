"""The 2:3 interleave of linguistic and semantic codes, and the LLM's view of them.

Two vq02 frames (60 ms each) and three vq06 frames (40 ms each) cover the same 120 ms, so the
models see groups `[c02, c02, c06, c06, c06]`; ids are `65536 + c02` and `65536 + 1024 + c06`, text
is `<audio_N>` with N the id minus 65536. A trailing partial group is dropped, as the reference does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

AUDIO_ID_BASE = 65536
VQ02_SIZE = 1024
VQ06_SIZE = 4096
AUDIO_VOCAB = VQ02_SIZE + VQ06_SIZE  # 5120 <audio_N> tokens
GROUP_VQ02 = 2
GROUP_VQ06 = 3
GROUP_IDS = GROUP_VQ02 + GROUP_VQ06

_AUDIO_TOKEN = re.compile(r"<audio_(\d+)>")


def vq02_id(code: int) -> int:
    return AUDIO_ID_BASE + int(code)


def vq06_id(code: int) -> int:
    return AUDIO_ID_BASE + VQ02_SIZE + int(code)


def group_count(n02: int, n06: int) -> int:
    return min(n06 // GROUP_VQ06, n02 // GROUP_VQ02)


def interleave_ids(vq02: Sequence[int], vq06: Sequence[int]) -> list[int]:
    """`wav2token`'s id sequence."""
    ids: list[int] = []
    for g in range(group_count(len(vq02), len(vq06))):
        ids.extend(vq02_id(c) for c in vq02[g * GROUP_VQ02 : (g + 1) * GROUP_VQ02])
        ids.extend(vq06_id(c) for c in vq06[g * GROUP_VQ06 : (g + 1) * GROUP_VQ06])
    return ids


def ids_to_text(ids: Sequence[int]) -> str:
    """`<audio_N>` string of audio ids (what the chat prompt embeds)."""
    out = []
    for i in ids:
        n = int(i) - AUDIO_ID_BASE
        if not 0 <= n < AUDIO_VOCAB:
            raise ValueError(f"id {i} is not an audio token id")
        out.append(f"<audio_{n}>")
    return "".join(out)


def token_text(vq02: Sequence[int], vq06: Sequence[int]) -> str:
    """`merge_vq0206_to_token_str`: same groups as `interleave_ids`, as text."""
    return ids_to_text(interleave_ids(vq02, vq06))


def text_to_ids(text: str) -> list[int]:
    """Parse an `<audio_N>` string back to ids; anything else in it is an error."""
    ids = []
    pos = 0
    for m in _AUDIO_TOKEN.finditer(text):
        if m.start() != pos:
            raise ValueError(f"unexpected text at offset {pos}: {text[pos:m.start()][:20]!r}")
        n = int(m.group(1))
        if n >= AUDIO_VOCAB:
            raise ValueError(f"<audio_{n}> is outside the {AUDIO_VOCAB}-token audio vocabulary")
        ids.append(AUDIO_ID_BASE + n)
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"unexpected text at offset {pos}: {text[pos:][:20]!r}")
    return ids


class Interleaver:
    """Incremental interleave: codes arrive from two streams at different times; whole groups
    leave as soon as both halves exist."""

    def __init__(self) -> None:
        self.vq02: list[int] = []
        self.vq06: list[int] = []
        self.groups = 0

    def push(self, vq02: Sequence[int] = (), vq06: Sequence[int] = ()) -> list[int]:
        self.vq02.extend(int(c) for c in vq02)
        self.vq06.extend(int(c) for c in vq06)
        total = group_count(len(self.vq02), len(self.vq06))
        new = interleave_ids(
            self.vq02[self.groups * GROUP_VQ02 : total * GROUP_VQ02],
            self.vq06[self.groups * GROUP_VQ06 : total * GROUP_VQ06],
        )
        self.groups = total
        return new
