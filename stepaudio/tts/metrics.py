"""How far streaming output is from offline output, in the terms a listener cares about.

Waveforms are compared as 80-bin log-mels (the flow's own features: 1024-point STFT, hop 256,
natural log), not sample by sample: two renderings can differ in fine phase and still sound the
same, while a seam (a jump in level or spectrum at a chunk join) shows up as a local log-mel
difference. Distances are mean absolute differences in natural-log units (0.1 ≈ 0.9 dB).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stepaudio.tts.mel import mel_spectrogram

HOP = 256


def logmel(wav: np.ndarray, sr: int = 22050) -> torch.Tensor:
    """(80, frames) log-mel of a mono waveform, frames = len // 256."""
    y = torch.as_tensor(np.asarray(wav, dtype=np.float32)).reshape(1, -1)
    return mel_spectrogram(y, 1024, 80, sr, HOP, 1024, 0, 8000)[0]


@dataclass(frozen=True)
class StreamDistance:
    """Mean |Δ log-mel| overall, within ``radius`` frames of chunk joins, and away from them."""

    overall: float
    at_joins: float
    away: float
    frames: int

    def describe(self) -> str:
        return (f"log-mel |Δ| mean {self.overall:.3f} (joins {self.at_joins:.3f}, "
                f"elsewhere {self.away:.3f}) over {self.frames} frames")


def stream_distance(streamed: np.ndarray, offline: np.ndarray, joins: Sequence[int],
                    radius: int = 4, sr: int = 22050) -> StreamDistance:
    """Compare two renderings of the same tokens; ``joins`` are chunk boundaries in mel frames."""
    n = min(len(streamed), len(offline))
    a, b = logmel(streamed[:n], sr), logmel(offline[:n], sr)
    per_frame = (a - b).abs().mean(dim=0).numpy()
    near = np.zeros(per_frame.shape[0], dtype=bool)
    for j in joins:
        near[max(0, j - radius): j + radius] = True
    at = float(per_frame[near].mean()) if near.any() else 0.0
    away = float(per_frame[~near].mean()) if (~near).any() else 0.0
    return StreamDistance(float(per_frame.mean()), at, away, int(per_frame.shape[0]))


def seam_ratio(wav: np.ndarray, joins: Sequence[int], radius: int = 2, sr: int = 22050) -> float:
    """Spectral flux (mean |Δ log-mel| between neighbouring frames) at joins / elsewhere.

    About 1 when joins change the spectrum no more than speech itself does from frame to frame;
    a click or a level step at the joins makes it clearly larger.
    """
    m = logmel(wav, sr)
    flux = (m[:, 1:] - m[:, :-1]).abs().mean(dim=0).numpy()
    near = np.zeros(flux.shape[0], dtype=bool)
    for j in joins:
        near[max(0, j - radius): j + radius] = True
    if not near.any() or near.all():
        return 1.0
    return float(flux[near].mean() / max(flux[~near].mean(), 1e-9))
