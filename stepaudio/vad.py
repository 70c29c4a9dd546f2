"""Streaming voice activity detection over Silero VAD, one state per session, batched across sessions.

The model is the ONNX export that the ``silero-vad`` wheel ships (no download, no hub): onnxruntime
runs it with one thread, with a batch dimension, so one call serves every session that has a frame
ready. The LSTM state and the 64-sample context live outside the model, in a :class:`VADState` per
session, which is what makes batching possible (the package's own wrappers keep one hidden state per
model object). When onnxruntime is missing the TorchScript model in the same wheel is used instead;
both take ``(batch, 64 + 512)`` samples and a ``(2, batch, 128)`` state.

Times are milliseconds of 16 kHz audio consumed since the stream began (the input clock, not the wall
clock), so events are reproducible from a recording and independent of how the audio was chunked.
"""

from __future__ import annotations

import importlib.resources
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from .audio import StreamingResampler, check_sample_rate
from .errors import AudioError, ModelError

SAMPLE_RATE = 16000
FRAME_SAMPLES = 512
CONTEXT_SAMPLES = 64
FRAME_MS = 1000.0 * FRAME_SAMPLES / SAMPLE_RATE  # 32 ms
STATE_SHAPE = (2, 128)  # per stream; the model takes (2, batch, 128)

Backend = Literal["auto", "onnx", "jit"]


@dataclass(frozen=True)
class VADParams:
    """Decision rules on top of the per-frame speech probability.

    Hysteresis (``threshold`` to enter speech, ``neg_threshold`` to leave it) keeps a probability
    hovering around one value from toggling; the durations filter clicks and coughs (start) and the
    gaps between words (end). The end event is deliberately early (100 ms): the controller measures
    the user's pause from ``at_ms`` and decides on its own, longer timers (speculation, end of turn).
    """

    threshold: float = 0.5
    #: Leave speech below this; ``None`` = ``threshold - 0.15`` as silero's own iterator does.
    neg_threshold: float | None = None
    min_speech_ms: float = 128.0
    min_silence_ms: float = 100.0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"VAD threshold must be in (0, 1), got {self.threshold}")
        if self.neg_threshold is not None and not 0.0 <= self.neg_threshold <= self.threshold:
            raise ValueError(
                f"VAD neg_threshold must be in [0, threshold={self.threshold}], got {self.neg_threshold}"
            )
        if self.min_speech_ms < 0 or self.min_silence_ms < 0:
            raise ValueError("VAD durations must not be negative")

    @property
    def exit_threshold(self) -> float:
        if self.neg_threshold is not None:
            return self.neg_threshold
        return max(self.threshold - 0.15, 0.01)

    @property
    def min_speech_frames(self) -> int:
        return max(1, math.ceil(self.min_speech_ms / FRAME_MS))

    @property
    def min_silence_frames(self) -> int:
        return max(1, math.ceil(self.min_silence_ms / FRAME_MS))


@dataclass(frozen=True)
class VADEvent:
    """Speech began or ended at ``at_ms``; the decision was taken once audio reached ``detected_ms``."""

    kind: Literal["speech_start", "speech_end"]
    at_ms: float
    detected_ms: float


@dataclass
class VADState:
    """The model's recurrent state for one stream: LSTM (h, c) and the last 64 input samples."""

    rnn: np.ndarray = field(default_factory=lambda: np.zeros(STATE_SHAPE, dtype=np.float32))
    context: np.ndarray = field(default_factory=lambda: np.zeros(CONTEXT_SAMPLES, dtype=np.float32))

    def reset(self) -> None:
        self.rnn[:] = 0.0
        self.context[:] = 0.0


def _model_file(name: str) -> str:
    try:
        path = importlib.resources.files("silero_vad.data").joinpath(name)
    except ModuleNotFoundError:
        raise ModelError("silero-vad is not installed (pip install silero-vad)") from None
    if not path.is_file():
        raise ModelError(f"the silero-vad package has no {name} (reinstall silero-vad)")
    return str(path)


class SileroVAD:
    """The Silero VAD network, shared by every session; stateless between calls.

    One process holds one of these; it is not thread-safe (run it from one worker thread).
    """

    def __init__(self, backend: Backend = "auto") -> None:
        self.backend: str
        if backend in ("auto", "onnx"):
            try:
                import onnxruntime as ort
            except ImportError:
                if backend == "onnx":
                    raise ModelError("onnxruntime is not installed") from None
            else:
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1
                opts.inter_op_num_threads = 1
                opts.log_severity_level = (
                    3  # the export carries unused initializers; not our problem
                )
                self._sess = ort.InferenceSession(
                    _model_file("silero_vad.onnx"),
                    sess_options=opts,
                    providers=["CPUExecutionProvider"],
                )
                self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
                self.backend = "onnx"
                return
        if backend not in ("auto", "jit"):
            raise ValueError(f"unknown VAD backend {backend!r} (auto, onnx or jit)")
        import torch

        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            self._jit = torch.jit.load(_model_file("silero_vad.jit"), map_location="cpu")._model
        self._jit.eval()
        self.backend = "jit"

    def step_batch(self, states: Sequence[VADState], frames: np.ndarray) -> np.ndarray:
        """Speech probability of one 512-sample frame per stream, advancing each stream's state.

        ``frames`` is ``(len(states), 512)`` float32 at 16 kHz. Rows are independent: the result for
        a stream is the same as running it alone (tests check this), so sessions can be grouped in
        any way that suits the scheduler.
        """
        n = len(states)
        frames = np.asarray(frames, dtype=np.float32)
        if frames.shape != (n, FRAME_SAMPLES):
            raise AudioError(
                f"VAD expects frames of shape ({n}, {FRAME_SAMPLES}), got {frames.shape}"
            )
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        x = np.empty((n, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        rnn = np.empty((2, n, 128), dtype=np.float32)
        for i, st in enumerate(states):
            x[i, :CONTEXT_SAMPLES] = st.context
            rnn[:, i] = st.rnn
        x[:, CONTEXT_SAMPLES:] = frames
        if self.backend == "onnx":
            out, new_rnn = self._sess.run(None, {"input": x, "state": rnn, "sr": self._sr})
        else:
            import torch

            with torch.inference_mode():
                o, s = self._jit(torch.from_numpy(x), torch.from_numpy(rnn))
            out, new_rnn = o.numpy(), s.numpy()
        for i, st in enumerate(states):
            st.rnn[:] = new_rnn[:, i]
            st.context[:] = frames[i, -CONTEXT_SAMPLES:]
        return np.asarray(out, dtype=np.float32).reshape(n)


class SpeechSegmenter:
    """Turns a stream of per-frame probabilities into speech start / end events (no model inside).

    Kept apart from the model so the decision rules can be tested with scripted probabilities.
    """

    def __init__(self, params: VADParams | None = None) -> None:
        self.params = params or VADParams()
        self.frames = 0  # frames seen
        self.speaking = False
        self._run = 0  # consecutive frames for the pending transition
        self._run_start = 0
        self.last_prob = 0.0

    @property
    def now_ms(self) -> float:
        return self.frames * FRAME_MS

    @property
    def settled_ms(self) -> float:
        """Audio before this point keeps its current speech/silence reading: a transition still
        pending (a run of frames that may yet become a start or an end event) begins here. The
        server feeds the tokenizer only up to it, so a turn's tokens end exactly where its speech
        ended."""
        return self._run_start * FRAME_MS if self._run else self.now_ms

    def feed(self, prob: float) -> VADEvent | None:
        p = self.params
        idx = self.frames
        self.frames += 1
        self.last_prob = float(prob)
        if not self.speaking:
            if prob >= p.threshold:
                if self._run == 0:
                    self._run_start = idx
                self._run += 1
                if self._run >= p.min_speech_frames:
                    self.speaking = True
                    self._run = 0
                    return VADEvent("speech_start", self._run_start * FRAME_MS, self.now_ms)
            else:
                self._run = 0
            return None
        if prob < p.exit_threshold:
            if self._run == 0:
                self._run_start = idx
            self._run += 1
            if self._run >= p.min_silence_frames:
                self.speaking = False
                self._run = 0
                return VADEvent("speech_end", self._run_start * FRAME_MS, self.now_ms)
        else:
            self._run = 0
        return None


class StreamingVAD:
    """One session's VAD: audio in at any rate and chunking, events out on the input-audio clock.

    Feed audio with :meth:`push`; run frames either alone (:meth:`process`) or together with other
    sessions (:func:`run_batch`), which is what the server's VAD worker does every tick.
    """

    def __init__(
        self, model: SileroVAD, params: VADParams | None = None, sample_rate: int = SAMPLE_RATE
    ) -> None:
        self.model = model
        self.sample_rate = check_sample_rate(sample_rate)
        self.resampler = StreamingResampler(self.sample_rate, SAMPLE_RATE)
        self.state = VADState()
        self.segmenter = SpeechSegmenter(params)
        self._buf = np.zeros(0, dtype=np.float32)

    @property
    def params(self) -> VADParams:
        return self.segmenter.params

    @params.setter
    def params(self, params: VADParams) -> None:
        """New thresholds apply from the next frame (a ``session.update`` mid-stream)."""
        self.segmenter.params = params

    @property
    def speaking(self) -> bool:
        return self.segmenter.speaking

    @property
    def now_ms(self) -> float:
        """Audio analysed so far (the resampler's look-ahead is still pending, under 1 ms)."""
        return self.segmenter.now_ms

    @property
    def last_prob(self) -> float:
        return self.segmenter.last_prob

    def push(self, samples: np.ndarray) -> None:
        """Queue mono float32 samples at this stream's sample rate."""
        out = self.resampler.process(np.asarray(samples, dtype=np.float32))
        if len(out):
            self._buf = np.concatenate([self._buf, out]) if len(self._buf) else out

    def ready_frames(self) -> int:
        return len(self._buf) // FRAME_SAMPLES

    def pop_frame(self) -> np.ndarray:
        if len(self._buf) < FRAME_SAMPLES:
            raise AudioError("no full VAD frame is buffered")
        frame, self._buf = self._buf[:FRAME_SAMPLES], self._buf[FRAME_SAMPLES:]
        return frame

    def feed_prob(self, prob: float) -> VADEvent | None:
        return self.segmenter.feed(prob)

    def process(self, samples: np.ndarray | None = None) -> list[VADEvent]:
        """Push ``samples`` (if any) and analyse every full frame, this stream alone."""
        if samples is not None:
            self.push(samples)
        return run_batch([self])[0]

    def reset(self) -> None:
        """Forget everything (``input_audio_buffer.clear`` does not need this; a new stream does)."""
        self.resampler = StreamingResampler(self.sample_rate, SAMPLE_RATE)
        self.state = VADState()
        self.segmenter = SpeechSegmenter(self.params)
        self._buf = np.zeros(0, dtype=np.float32)


def run_batch(streams: Sequence[StreamingVAD]) -> list[list[VADEvent]]:
    """Analyse every buffered frame of every stream, one model call per frame position.

    Streams with more frames pending than others simply take part in more calls. All streams must
    share one model. Returns each stream's events in order.
    """
    events: list[list[VADEvent]] = [[] for _ in streams]
    if not streams:
        return events
    model = streams[0].model
    if any(s.model is not model for s in streams):
        raise ValueError("run_batch: streams must share one SileroVAD")
    while True:
        active = [i for i, s in enumerate(streams) if s.ready_frames()]
        if not active:
            return events
        frames = np.stack([streams[i].pop_frame() for i in active])
        probs = model.step_batch([streams[i].state for i in active], frames)
        for i, prob in zip(active, probs, strict=True):
            ev = streams[i].feed_prob(float(prob))
            if ev is not None:
                events[i].append(ev)


def measure_frame_cost(model: SileroVAD, batch: int, repeats: int = 200) -> float:
    """Seconds of model time per frame per stream at this batch size (for docs and benchmarks)."""
    rng = np.random.default_rng(0)
    states = [VADState() for _ in range(batch)]
    frames = (0.05 * rng.standard_normal((batch, FRAME_SAMPLES))).astype(np.float32)
    for _ in range(10):
        model.step_batch(states, frames)
    t0 = time.perf_counter()
    for _ in range(repeats):
        model.step_batch(states, frames)
    return (time.perf_counter() - t0) / repeats / batch
