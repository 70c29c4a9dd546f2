"""The token side shared by the streaming token → wav modes: flow tokens pushed as TTS-3B writes
them, ``finish()`` when it stops, ``drain()`` for offline use. Each mode decides when a chunk is
``ready()`` and how ``next_chunk()`` computes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stepaudio.errors import ModelError


class TokenFeed:
    """Base of a streaming token → wav: ``tokens`` so far and whether they are ``finished``."""

    flow: Any

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finished = False

    def push(self, tokens: Sequence[int]) -> None:
        """Append flow tokens (0 … vocab-1); a bad one is refused before any is kept."""
        if self.finished:
            raise ModelError("streaming token2wav: push() after finish()")
        new = [int(t) for t in tokens]
        for t in new:
            if not 0 <= t < self.flow.vocab_size:
                raise ModelError(f"flow token {t} outside 0..{self.flow.vocab_size - 1}")
        self.tokens += new

    def finish(self) -> None:
        """No more tokens: what is left goes out in the next chunks."""
        self.finished = True

    def ready(self) -> bool:
        raise NotImplementedError

    def next_chunk(self) -> np.ndarray:
        raise NotImplementedError

    def drain(self) -> list[np.ndarray]:
        """Every chunk that is ready now (no cancellation points: for offline use and tests)."""
        out = []
        while self.ready():
            out.append(self.next_chunk())
        return out
