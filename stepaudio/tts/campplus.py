"""Speaker embedding: the CAM++ ONNX (`campplus.onnx`) on mean-normalised Kaldi fbank.

As the reference frontend: 80-bin `torchaudio.compliance.kaldi.fbank` of the raw 16 kHz waveform
in [-1, 1] (no ×32768, no energy normalisation, dither 0, Kaldi defaults otherwise), minus its
mean over time, fed as (1, frames, 80) to the first ONNX input; the first output is the 192-d
x-vector. Inputs are passed by position because exports name them differently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stepaudio.errors import AudioError, ModelError

SAMPLE_RATE = 16000
FBANK_BINS = 80
#: Kaldi needs one 25 ms window to make a frame.
MIN_SAMPLES = 400


def campplus_fbank(wav16k: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Waveform (N,) or (1, N) at 16 kHz → mean-normalised fbank (frames, 80), float32."""
    import torchaudio.compliance.kaldi as kaldi  # pure-Python part of torchaudio

    wav = torch.as_tensor(np.asarray(wav16k), dtype=torch.float32).reshape(1, -1)
    if wav.shape[1] < MIN_SAMPLES:
        raise AudioError(f"speaker prompt too short for CAM++: {wav.shape[1]} samples at 16 kHz "
                         f"(need at least {MIN_SAMPLES})")
    feat = kaldi.fbank(wav, num_mel_bins=FBANK_BINS, dither=0, sample_frequency=SAMPLE_RATE)
    return feat - feat.mean(dim=0, keepdim=True)


class CAMPPlus:
    """`campplus.onnx` on CPU onnxruntime, one intra-op thread as the reference configures it."""

    def __init__(self, onnx_path: Path | str, providers: list[str] | None = None) -> None:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise ModelError(f"{path}: CAM++ speaker model not found")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts,
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{path}: cannot load CAM++ ({err})") from None
        inputs = self.session.get_inputs()
        if not inputs:
            raise ModelError(f"{path}: CAM++ model has no inputs")
        self.input_name = inputs[0].name

    def embed_fbank(self, fbank: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Normalised fbank (frames, 80) or (1, frames, 80) → embedding (1, dim), float32."""
        feat = np.asarray(fbank, dtype=np.float32)
        if feat.ndim == 2:
            feat = feat[None]
        if feat.ndim != 3 or feat.shape[-1] != FBANK_BINS:
            raise AudioError(f"CAM++ expects (1, frames, {FBANK_BINS}) features, got {feat.shape}")
        out = self.session.run(None, {self.input_name: feat})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(1, -1))

    def __call__(self, wav16k: torch.Tensor | np.ndarray) -> torch.Tensor:
        """16 kHz waveform in [-1, 1] → embedding (1, dim)."""
        return self.embed_fbank(campplus_fbank(wav16k))
