"""Streaming VAD over the silero model shipped in the wheel, on real recordings."""

from __future__ import annotations

import numpy as np
import pytest

from stepaudio.audio import load_audio, resample
from stepaudio.vad import (
    FRAME_MS,
    FRAME_SAMPLES,
    SileroVAD,
    SpeechSegmenter,
    StreamingVAD,
    VADEvent,
    VADParams,
    VADState,
    measure_frame_cost,
    run_batch,
)


@pytest.fixture(scope="module")
def model() -> SileroVAD:
    return SileroVAD()


def padded(audio_dir, name: str, silence_s: float = 1.0) -> tuple[np.ndarray, int]:
    wav, sr = load_audio(audio_dir / name)
    pad = np.zeros(int(silence_s * sr), dtype=np.float32)
    return np.concatenate([pad, wav, pad]), sr


def stream_events(
    model: SileroVAD, wav: np.ndarray, sr: int, chunk: int, params: VADParams | None = None
):
    vad = StreamingVAD(model, params, sample_rate=sr)
    events: list[VADEvent] = []
    for i in range(0, len(wav), chunk):
        events += vad.process(wav[i : i + chunk])
    return events


def test_model_loads_offline_from_the_wheel_with_onnxruntime(model):
    assert model.backend == "onnx"


@pytest.mark.parametrize(
    "name", ["prompt_wav_lixueqin.wav", "multilingual1.wav", "Tingting_prompt.wav"]
)
def test_speech_in_a_real_recording_is_found_between_silences(model, audio_dir, name):
    wav, sr = padded(audio_dir, name)
    events = stream_events(model, wav, sr, chunk=sr // 50)  # 20 ms network chunks
    assert events, "no speech found in a speech recording"
    assert [e.kind for e in events[:1]] == ["speech_start"] and events[-1].kind == "speech_end"
    assert all(a.kind != b.kind for a, b in zip(events, events[1:], strict=False))  # alternating
    total_ms = 1000 * len(wav) / sr
    assert 1000 <= events[0].at_ms <= 1000 + 900  # the recordings start talking within 0.8 s
    assert events[-1].at_ms <= total_ms - 900  # the trailing second of silence is silence
    assert events[-1].at_ms >= total_ms - 1000 - 700
    for e in events:  # decisions come after the fact, by the configured durations
        assert e.detected_ms > e.at_ms


def test_silence_and_faint_noise_give_no_events(model):
    rng = np.random.default_rng(0)
    quiet = np.concatenate([np.zeros(16000), 0.003 * rng.standard_normal(48000)]).astype(np.float32)
    vad = StreamingVAD(model)
    assert vad.process(quiet) == []
    assert vad.now_ms == pytest.approx(len(quiet) // FRAME_SAMPLES * FRAME_MS)
    assert vad.last_prob < 0.2


def test_events_do_not_depend_on_how_audio_is_chunked(model, audio_dir):
    wav, sr = padded(audio_dir, "prompt_wav_yuqian.wav", 0.5)
    a = stream_events(model, wav, sr, chunk=137)
    b = stream_events(model, wav, sr, chunk=sr // 4)
    assert a == b and len(a) >= 4  # the recording has a pause in the middle


def test_batched_step_equals_each_stream_alone(model, audio_dir):
    clips = []
    for name in ["prompt_wav_lixueqin.wav", "multilingual1.wav", "Tingting_prompt.wav"]:
        wav, sr = load_audio(audio_dir / name)
        clips.append(resample(wav, sr, 16000)[: 40 * FRAME_SAMPLES].reshape(40, FRAME_SAMPLES))
    clips.append(np.zeros((40, FRAME_SAMPLES), dtype=np.float32))
    alone = []
    for clip in clips:
        st = VADState()
        alone.append([model.step_batch([st], frame[None])[0] for frame in clip])
    states = [VADState() for _ in clips]
    together = [model.step_batch(states, np.stack([c[i] for c in clips])) for i in range(40)]
    np.testing.assert_allclose(np.array(together).T, np.array(alone), atol=1e-5)


def test_run_batch_serves_streams_with_different_amounts_of_audio(model, audio_dir):
    wav, sr = padded(audio_dir, "multilingual1.wav", 0.5)
    solo = stream_events(model, wav, sr, chunk=len(wav))
    streams = [StreamingVAD(model, sample_rate=sr) for _ in range(3)]
    got: list[list[VADEvent]] = [[], [], []]
    chunks = [sr // 50, sr // 10, sr // 3]  # every session sends at its own pace
    pos = [0, 0, 0]
    while any(p < len(wav) for p in pos):
        for i, s in enumerate(streams):
            s.push(wav[pos[i] : pos[i] + chunks[i]])
            pos[i] += chunks[i]
        for i, evs in enumerate(run_batch(streams)):
            got[i] += evs
    assert got == [solo, solo, solo]


def test_telephony_rate_input_is_resampled(model, audio_dir):
    wav, sr = padded(audio_dir, "prompt_wav_lixueqin.wav")
    wav8 = resample(wav, sr, 8000)
    events = stream_events(model, wav8, 8000, chunk=160)
    assert events and events[0].kind == "speech_start" and 1000 <= events[0].at_ms <= 2000


def test_segmenter_hysteresis_and_durations():
    seg = SpeechSegmenter(
        VADParams(threshold=0.5, neg_threshold=0.3, min_speech_ms=64, min_silence_ms=96)
    )
    probs = [0.1, 0.9, 0.1]  # a one-frame blip is not speech
    probs += [0.9, 0.9, 0.4, 0.4]  # two frames start speech; 0.4 sits between the thresholds
    probs += [0.2, 0.2, 0.9]  # too short a dip to end it
    probs += [0.1, 0.1, 0.1, 0.6]  # three frames under 0.3 end it
    events = [e for p in probs if (e := seg.feed(p)) is not None]
    assert events == [
        VADEvent("speech_start", 3 * FRAME_MS, 5 * FRAME_MS),
        VADEvent("speech_end", 10 * FRAME_MS, 13 * FRAME_MS),
    ]


def test_params_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        VADParams(threshold=1.5)
    with pytest.raises(ValueError, match="neg_threshold"):
        VADParams(threshold=0.5, neg_threshold=0.7)
    assert VADParams(threshold=0.5).exit_threshold == pytest.approx(0.35)


def test_torchscript_fallback_agrees_with_onnx(model, audio_dir):
    jit = SileroVAD("jit")
    wav, sr = load_audio(audio_dir / "multilingual1.wav")
    frames = resample(wav, sr, 16000)[: 20 * FRAME_SAMPLES].reshape(20, FRAME_SAMPLES)
    a, b = VADState(), VADState()
    pa = [model.step_batch([a], f[None])[0] for f in frames]
    pb = [jit.step_batch([b], f[None])[0] for f in frames]
    np.testing.assert_allclose(pa, pb, atol=1e-4)


def test_per_frame_cost_is_well_under_real_time(model):
    # A frame is 32 ms of audio; even a loaded 2-core box must be far below that.
    assert measure_frame_cost(model, batch=1, repeats=20) < 0.005
    assert measure_frame_cost(model, batch=16, repeats=5) < 0.005
