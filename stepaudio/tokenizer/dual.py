"""The Step-Audio dual-codebook tokenizer: linguistic + semantic codes, interleaved.

One object owns the two models and is shared by every session; per-utterance state lives in
streams (`streaming.py`), so many sessions tokenize concurrently against one copy of the weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..audio import StreamingResampler, check_sample_rate, energy_normalize, iter_audio_blocks
from ..errors import AudioError, ModelError
from ..models import S3_ONNX_FILE
from .interleave import interleave_ids, token_text
from .linguistic import LinguisticTokenizer
from .preprocess import SR, preprocess
from .semantic import MAX_SEGMENT, SemanticTokenizer

if TYPE_CHECKING:
    from ..config import TokenizerConfig
    from .streaming import AudioTokenStream



@dataclass
class TokenizeResult:
    vq02: list[int] = field(default_factory=list)
    vq06: list[int] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return interleave_ids(self.vq02, self.vq06)

    @property
    def text(self) -> str:
        return token_text(self.vq02, self.vq06)


class StepAudioTokenizer:
    """Loads `Step-Audio-Tokenizer/` unchanged (real or tiny)."""

    def __init__(
        self,
        tokenizer_dir: str | os.PathLike[str],
        device: str = "cpu",
        onnx_providers: list[str] | None = None,
        semantic_step_ms: int = 480,
        semantic_context_ms: int = 2400,
        semantic_lookahead_ms: int = 120,
    ) -> None:
        self.dir = Path(tokenizer_dir)
        if not self.dir.is_dir():
            raise ModelError(f"{self.dir}: tokenizer folder not found")
        self.linguistic = LinguisticTokenizer(self.dir, device=device)
        self.semantic = SemanticTokenizer(
            self.dir / S3_ONNX_FILE,
            providers=onnx_providers,
            step_ms=semantic_step_ms,
            context_ms=semantic_context_ms,
            lookahead_ms=semantic_lookahead_ms,
        )

    @classmethod
    def from_config(cls, tokenizer_dir: str | os.PathLike[str], cfg: TokenizerConfig) -> StepAudioTokenizer:
        return cls(
            tokenizer_dir,
            device=cfg.device,
            onnx_providers=cfg.onnx_providers,
            semantic_step_ms=cfg.semantic_step_ms,
            semantic_context_ms=cfg.semantic_context_ms,
            semantic_lookahead_ms=cfg.semantic_lookahead_ms,
        )

    # -- offline -------------------------------------------------------------------------------
    def codes16k(self, wav16k: np.ndarray) -> TokenizeResult:
        """Codes of an already pre-processed 16 kHz signal (the reference's `wav2token` core)."""
        vq02 = self.linguistic.encode(wav16k)
        vq06 = self.semantic.encode(wav16k)
        return TokenizeResult([int(c) for c in vq02], [int(c) for c in vq06])

    def tokenize(self, wav: np.ndarray, sr: int, trim: bool = False) -> TokenizeResult:
        """Whole-utterance tokenization; trim=False is the chat path, True the TTS-prompt path."""
        return self.codes16k(preprocess(wav, check_sample_rate(sr), trim=trim))

    def tokenize_file(self, path: str | os.PathLike[str], block_s: float = 30.0) -> TokenizeResult:
        """The chat path for a file of any length in bounded memory.

        Two passes: the first finds the peak of the 16 kHz signal (energy normalisation needs
        it), the second feeds 30 s pieces to both code streams. The linguistic stream is exact
        across pieces and the semantic model is run per 30 s as the reference does, so the
        result equals `tokenize` on the whole file.
        """
        sr, blocks = iter_audio_blocks(path, block_s)
        rs = StreamingResampler(sr, SR)
        peak = 0.0
        n = 0
        for b in blocks:
            y = rs.process(b)
            n += len(y)
            if len(y):
                peak = max(peak, float(np.abs(y).max()))
        tail = rs.flush()
        n += len(tail)
        if len(tail):
            peak = max(peak, float(np.abs(tail).max()))
        if n == 0:
            raise AudioError(f"{path}: contains no samples")
        sr, blocks = iter_audio_blocks(path, block_s)
        rs = StreamingResampler(sr, SR)
        ling = self.linguistic.new_stream()
        vq02: list[int] = []
        vq06: list[int] = []
        pending = np.zeros(0, dtype=np.float32)

        def take(x: np.ndarray, final: bool) -> np.ndarray:
            x = energy_normalize(x, peak)
            vq02.extend(int(c) for c in self.linguistic.feed(ling, x, is_final=final))
            return x

        for b in blocks:
            pending = np.concatenate([pending, take(rs.process(b), False)])
            while len(pending) >= MAX_SEGMENT:
                vq06.extend(int(c) for c in self.semantic.encode(pending[:MAX_SEGMENT]))
                pending = pending[MAX_SEGMENT:]
        pending = np.concatenate([pending, take(rs.flush(), True)])
        vq06.extend(int(c) for c in self.semantic.encode(pending))
        return TokenizeResult(vq02, vq06)

    # -- streaming -----------------------------------------------------------------------------
    def open_stream(self, provisional: bool = True) -> AudioTokenStream:
        """A stream whose final codes equal the offline ones; ``provisional`` adds early,
        inexact ids to what :meth:`AudioTokenStream.feed` returns (see ``streaming.py``)."""
        from .streaming import AudioTokenStream

        return AudioTokenStream(self, provisional=provisional)

    def tokenize_streaming(self, wav: np.ndarray, sr: int, chunk_ms: int = 100) -> TokenizeResult:
        """Feed a whole signal in live-sized chunks and return the stream's final codes (what
        `tokenize --stream` shows: they must equal the offline codes)."""
        if chunk_ms <= 0:
            raise AudioError("chunk_ms must be positive")
        stream = self.open_stream(provisional=False)
        step = max(1, int(sr * chunk_ms / 1000))
        for i in range(0, len(wav), step):
            stream.feed(wav[i : i + step], sr)
        stream.finish()
        assert stream.result is not None
        return stream.result
