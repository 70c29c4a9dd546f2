"""Which streaming token → wav a synthesizer runs, behind one interface.

- ``cosyvoice``: CosyVoice's own streaming recipe (:mod:`stepaudio.tts.streaming_cosyvoice`),
  checked against CosyVoice's code; first audio after 103 tokens (2.5 s of speech). The default
  for the published checkpoints: the recipe their vocoders were released with.
- ``low-latency``: the project's windows (:mod:`stepaudio.tts.streaming`), first audio after
  about 14 tokens; checked against offline synthesis on random weights only, not yet on the
  published ones. The default for the tiny checkpoints (fast CPU tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from stepaudio.tts.speakers import SpeakerFeatures
from stepaudio.tts.streaming import ChunkStats, StreamingToken2Wav, StreamOptions, Token2WavModels
from stepaudio.tts.streaming_cosyvoice import (
    CosyVoiceStreamOptions,
    CosyVoiceToken2Wav,
    CosyVoiceWindows,
)
from stepaudio.tts.vocoder_work import ChunkWork, DecodeFn, EncodeFn, Solver

StreamingMode = Literal["cosyvoice", "low-latency"]
STREAMING_MODES: tuple[str, ...] = ("cosyvoice", "low-latency")


class Token2WavStream(Protocol):
    """What a synthesizer (or a scheduler) needs of one utterance's streaming token → wav."""

    stats: list[ChunkStats]
    hift: Any  # the HiFT generator (its sampling_rate)

    def push(self, tokens: Sequence[int]) -> None: ...

    def finish(self) -> None: ...

    def ready(self) -> bool: ...

    def next_chunk(self) -> np.ndarray: ...

    def chunk_work(self) -> ChunkWork: ...

    def drain(self) -> list[np.ndarray]: ...

    @property
    def done(self) -> bool: ...

    @property
    def total_frames(self) -> int: ...

    @property
    def committed_frames(self) -> int: ...


def resolve_mode(mode: str, model_root: Path | None = None) -> StreamingMode:
    """``auto`` → ``low-latency`` for a tiny checkpoint root, else ``cosyvoice``."""
    if mode == "auto":
        from stepaudio.tiny import MARKER_FILE

        tiny = model_root is not None and (Path(model_root) / MARKER_FILE).is_file()
        return "low-latency" if tiny else "cosyvoice"
    if mode not in STREAMING_MODES:
        raise ValueError(f"streaming mode must be auto, {' or '.join(STREAMING_MODES)}, "
                         f"not {mode!r}")
    return mode  # type: ignore[return-value]


def open_token2wav(mode: StreamingMode, model: Token2WavModels, speaker: SpeakerFeatures, *,
                   low_latency: StreamOptions, cosyvoice: CosyVoiceStreamOptions, seed: int,
                   solver: Solver | None = None, decode: DecodeFn | None = None,
                   encode: EncodeFn | None = None) -> Token2WavStream:
    """One utterance's stream in ``mode``, with the stream's (optional) captured graphs."""
    if mode == "cosyvoice":
        return CosyVoiceToken2Wav(model, speaker, cosyvoice, seed=seed, solver=solver,
                                  decode=decode, encode=encode)
    return StreamingToken2Wav(model, speaker, low_latency, seed=seed, solver=solver,
                              decode=decode, encode=encode)


def window_shapes(mode: StreamingMode, model: Token2WavModels, *,
                  low_latency: Sequence[StreamOptions], cosyvoice: CosyVoiceStreamOptions
                  ) -> tuple[list[int], list[int], int]:
    """(flow target frames, HiFT frames, most target tokens one window encodes) of the mode's
    standard windows: the CUDA graphs to capture ahead of the first reply. ``low_latency``:
    every chunking in use (a reply's first clause and later ones may differ)."""
    if mode == "cosyvoice":
        win = CosyVoiceWindows.for_models(model.flow, model.hift, cosyvoice)
        flow_frames, hift_frames = win.graph_shapes()
        return flow_frames, hift_frames, win.max_chunk_tokens()
    flow: list[int] = []
    hift: list[int] = []
    conf = model.flow.mel_feat_conf
    per_token = float(conf["sampling_rate"]) / float(conf["hop_size"]) / model.flow.input_frame_rate
    most = 0
    for opt in low_latency:
        shapes = opt.schedule()
        for n in [f for f, _ in shapes] + [opt.window_frames]:
            flow += [] if n in flow else [n]
        # last chunks take the steady HiFT window
        for n in [h for _, h in shapes] + [opt.hift_window_frames]:
            hift += [] if n in hift else [n]
        most = max(most, int(opt.window_frames / per_token) + 4 + 2 * opt.token_margin)
    return flow, hift, most
