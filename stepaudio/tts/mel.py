"""The flow's mel features (the yaml's `feat_extractor`, matcha's `mel_spectrogram`).

The prompt speech is described to the flow in exactly these features, so they must match what the
checkpoint was trained on: reflect-pad (n_fft - hop)/2 each side, |STFT| (center=False, periodic
Hann) with a 1e-9 floor inside the square root, librosa Slaney mel filters, natural log clamped at
1e-5. All settings come from the yaml.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=8)
def _mel_basis(sampling_rate: int, n_fft: int, num_mels: int, fmin: float, fmax: float | None) -> torch.Tensor:
    import librosa  # imported here: slow to import and only needed once per setting

    basis = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=num_mels, fmin=fmin, fmax=fmax)
    return torch.from_numpy(np.asarray(basis)).float()


def mel_spectrogram(y: torch.Tensor | np.ndarray, n_fft: int, num_mels: int, sampling_rate: int,
                    hop_size: int, win_size: int, fmin: float, fmax: float | None,
                    center: bool = False) -> torch.Tensor:
    """Waveform (B, N) or (N,) in [-1, 1] → log-mel (B, num_mels, frames), frames = N // hop."""
    y = torch.as_tensor(y, dtype=torch.float32)
    if y.dim() == 1:
        y = y.unsqueeze(0)
    pad = int((n_fft - hop_size) / 2)
    y = torch.nn.functional.pad(y.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(win_size, device=y.device)
    spec = torch.view_as_real(torch.stft(y, n_fft, hop_length=hop_size, win_length=win_size,
                                         window=window, center=center, pad_mode="reflect",
                                         normalized=False, onesided=True, return_complex=True))
    spec = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
    basis = _mel_basis(int(sampling_rate), int(n_fft), int(num_mels), fmin, fmax).to(y.device)
    return torch.log(torch.clamp(torch.matmul(basis, spec), min=1e-5))
