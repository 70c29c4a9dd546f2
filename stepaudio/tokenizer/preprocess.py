"""The reference's pre-processing: 16 kHz, energy normalisation, optional silence trim.

The chat path feeds everything the user said (no trim); TTS speaker prompts are trimmed with the
reference's exact rule, because the TTS model was trained on prompts cut that way.
"""

from __future__ import annotations

import math

import librosa
import numpy as np

from ..audio import energy_normalize, resample, to_mono_float32
from ..errors import AudioError

SR = 16000


def trim_silence(wav16k: np.ndarray, sr: int = SR, keep_left_s: float = 0.05,
                 keep_right_s: float = 0.22, hop: int = 240) -> np.ndarray:
    """librosa trim at 20 dB, keep 50 ms before, pad/cut to a multiple of 240 samples + 270 ms."""
    _, (i0, i1) = librosa.effects.trim(wav16k, top_db=20, frame_length=512, hop_length=128)
    num_frames = math.ceil((i1 - i0) / hop)
    left = int(keep_left_s * sr)
    start = i0 - left
    out = wav16k[start:] if start > 0 else np.pad(wav16k, (-start, 0))
    out_len = int(num_frames * hop + (keep_left_s + keep_right_s) * sr)
    if out_len < len(out):
        return out[:out_len].astype(np.float32)
    return np.pad(out, (0, out_len - len(out))).astype(np.float32)


def preprocess(wav: np.ndarray, sr: int, trim: bool = False) -> np.ndarray:
    """Any-rate mono/stereo PCM -> the 16 kHz signal both code streams read."""
    x = to_mono_float32(wav)
    if x.size == 0:
        raise AudioError("audio: contains no samples")
    x = energy_normalize(resample(x, sr, SR))
    if trim:
        x = trim_silence(x)
    return x
