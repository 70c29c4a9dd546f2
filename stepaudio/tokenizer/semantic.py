"""Semantic ("vq06") codes: CosyVoice's S3 tokenizer ONNX on a whisper-style 128-bin log-mel.

25 Hz, 4096 codes. The model is full-attention over its input (the real one caps it at 30 s), so it
cannot stream natively; live audio is cut into segments on 120 ms boundaries (3 codes each, so the
2:3 interleave with the 16.7 Hz linguistic codes never drifts), each run with some already-seen audio
as left context and some held-back audio as right context, and only the codes of the new span kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import librosa
import numpy as np
import onnxruntime as ort
import torch

from ..errors import ModelError

SR = 16000
N_FFT = 400
HOP = 160
N_MELS = 128
SAMPLES_PER_CODE = 640  # 4 mel frames of 10 ms
GROUP_SAMPLES = 1920  # 120 ms: 3 codes, 2 linguistic frames
MAX_SEGMENT = 30 * SR  # the reference's cap
MIN_SEGMENT = 480  # the reference drops shorter pieces
MAX_NEW_CODES = 480  # 19.2 s of new audio per window, leaving room for context within 30 s


def codes_for_length(n: int) -> int:
    """Codes the S3 net yields for n samples: ceil(ceil((n // 160) / 2) / 2)."""
    frames = n // HOP
    half = (frames + 1) // 2
    return (half + 1) // 2


def offline_code_count(n: int) -> int:
    """Codes the reference yields for n samples: 30 s segments, pieces under 480 samples dropped."""
    total = 0
    for start in range(0, n, MAX_SEGMENT):
        piece = min(MAX_SEGMENT, n - start)
        if piece >= MIN_SEGMENT:
            total += codes_for_length(piece)
    return total


class LogMel:
    """whisper.log_mel_spectrogram(n_mels=128) in torch, without the whisper package."""

    def __init__(self) -> None:
        self.window = torch.hann_window(N_FFT)
        self.filters = torch.from_numpy(
            librosa.filters.mel(sr=SR, n_fft=N_FFT, n_mels=N_MELS).astype(np.float32)
        )

    def __call__(self, wav16k: np.ndarray, peak: float | None = None) -> np.ndarray:
        """`peak` (a log10 power seen earlier in the same utterance) raises the max-8 floor the way
        a whole-utterance pass would have; the window's own max is used otherwise."""
        return self.normalize(self.log10_power(wav16k), peak)

    def normalize(self, log_spec: torch.Tensor, peak: float | None = None) -> np.ndarray:
        top = log_spec.max()
        if peak is not None:
            top = torch.maximum(top, torch.tensor(peak, dtype=log_spec.dtype))
        log_spec = torch.maximum(log_spec, top - 8.0)
        return ((log_spec + 4.0) / 4.0).numpy()

    def log10_power(self, wav16k: np.ndarray) -> torch.Tensor:
        audio = torch.from_numpy(np.ascontiguousarray(wav16k, dtype=np.float32))
        with torch.no_grad():
            stft = torch.stft(audio, N_FFT, HOP, window=self.window, return_complex=True)
            mags = stft[..., :-1].abs() ** 2
            mel = self.filters @ mags
            return torch.clamp(mel, min=1e-10).log10()


@dataclass
class SemanticStream:
    """Per-session state: the audio not yet covered by emitted codes, plus left context."""

    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    offset: int = 0  # global sample index of audio[0]; always a multiple of GROUP_SAMPLES
    emitted: int = 0  # codes emitted so far
    total: int = 0  # samples received so far
    finished: bool = False
    peak: float = -10.0  # highest log10 mel power seen so far in this stream


class SemanticTokenizer:
    def __init__(
        self,
        onnx_path: Path,
        providers: list[str] | None = None,
        step_ms: int = 480,
        context_ms: int = 2400,
        lookahead_ms: int = 120,
    ) -> None:
        if not Path(onnx_path).is_file():
            raise ModelError(f"{onnx_path}: S3 tokenizer ONNX not found")
        for name, ms in (("step_ms", step_ms), ("context_ms", context_ms), ("lookahead_ms", lookahead_ms)):
            if ms < 0 or ms % 120:
                raise ModelError(f"semantic tokenizer: {name} must be a non-negative multiple of 120")
        if step_ms == 0:
            raise ModelError("semantic tokenizer: step_ms must be at least 120")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        available = set(ort.get_available_providers())
        chosen = [p for p in (providers or ["CPUExecutionProvider"]) if p in available]
        try:
            self.session = ort.InferenceSession(
                str(onnx_path), sess_options=opts, providers=chosen or ["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own untyped errors
            raise ModelError(f"{onnx_path}: cannot load S3 tokenizer ({err})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 2:
            raise ModelError(f"{onnx_path}: expected 2 inputs (feats, feats_length), got {len(inputs)}")
        # The reference passes inputs by position; names differ between exports.
        self.in_names = [inputs[0].name, inputs[1].name]
        self.logmel = LogMel()
        self.step = step_ms * SR // 1000
        self.context = context_ms * SR // 1000
        self.lookahead = lookahead_ms * SR // 1000

    # -- one segment -------------------------------------------------------------------------
    def run_segment(self, wav16k: np.ndarray, stream: SemanticStream | None = None) -> np.ndarray:
        """Codes for one piece of at most 30 s (the reference's `get_vq06_code` inner loop)."""
        log_spec = self.logmel.log10_power(wav16k)
        peak = None
        if stream is not None:
            stream.peak = max(stream.peak, float(log_spec.max()))
            peak = stream.peak
        feats = self.logmel.normalize(log_spec, peak)[None]
        lens = np.array([feats.shape[2]], dtype=np.int32)
        out = self.session.run(None, {self.in_names[0]: feats, self.in_names[1]: lens})[0]
        return np.asarray(out, dtype=np.int64).reshape(-1)

    def encode(self, wav16k: np.ndarray) -> np.ndarray:
        """Offline codes, exactly as the reference: 30 s pieces, pieces under 480 samples dropped."""
        parts = [
            self.run_segment(wav16k[s : s + MAX_SEGMENT])
            for s in range(0, len(wav16k), MAX_SEGMENT)
            if len(wav16k[s : s + MAX_SEGMENT]) >= MIN_SEGMENT
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    # -- streaming -----------------------------------------------------------------------------
    def new_stream(self) -> SemanticStream:
        return SemanticStream()

    def _window_codes(self, st: SemanticStream, upto_code: int, final: bool) -> np.ndarray:
        """Run windows [context | new span | right context] until codes reach upto_code."""
        outs = []
        while st.emitted < upto_code:
            first = st.emitted
            last = min(upto_code, first + MAX_NEW_CODES)
            win_start = max(0, first * SAMPLES_PER_CODE - self.context)
            win_start -= win_start % GROUP_SAMPLES
            window = st.audio[win_start - st.offset : win_start - st.offset + MAX_SEGMENT]
            codes = self.run_segment(window, st) if len(window) >= MIN_SEGMENT else np.zeros(0, np.int64)
            base = win_start // SAMPLES_PER_CODE
            out = codes[first - base : last - base]
            if len(out) < last - first and not (final and last == upto_code):
                raise ModelError("semantic tokenizer: the ONNX model returned fewer codes than expected")
            outs.append(out)
            st.emitted += len(out)
            # Forget audio that no later window can use as context.
            keep_from = max(0, st.emitted * SAMPLES_PER_CODE - self.context)
            keep_from -= keep_from % GROUP_SAMPLES
            if keep_from > st.offset:
                st.audio = st.audio[keep_from - st.offset :].copy()
                st.offset = keep_from
            if len(out) < last - first:
                break
        return np.concatenate(outs) if outs else np.zeros(0, dtype=np.int64)

    def feed(self, st: SemanticStream, wav16k: np.ndarray) -> np.ndarray:
        """New codes once `step` of audio past the last emitted code (plus lookahead) is here."""
        if st.finished:
            raise ModelError("semantic stream already finished")
        if len(wav16k):
            st.audio = np.concatenate([st.audio, np.asarray(wav16k, dtype=np.float32)])
            st.total += len(wav16k)
        ready = max(0, st.total - self.lookahead) // GROUP_SAMPLES * 3
        if ready - st.emitted < self.step // SAMPLES_PER_CODE:
            return np.zeros(0, dtype=np.int64)
        return self._window_codes(st, ready, final=False)

    def finish(self, st: SemanticStream) -> np.ndarray:
        """The remaining codes; the stream's total equals the offline count for the same audio."""
        if st.finished:
            raise ModelError("semantic stream already finished")
        st.finished = True
        target = offline_code_count(st.total)
        if target <= st.emitted:
            return np.zeros(0, dtype=np.int64)
        return self._window_codes(st, target, final=True)

