import io

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from stepaudio.audio import (
    StreamingResampler,
    energy_normalize,
    load_audio,
    resample,
    to_mono_float32,
)
from stepaudio.errors import AudioError


def _signal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.mark.parametrize("sr", [8000, 22050, 24000, 44100, 48000])
def test_resample_matches_torchaudio_sinc_hann(sr):
    x = _signal(sr // 2 + 37, seed=sr)
    ref = torchaudio.transforms.Resample(sr, 16000)(torch.from_numpy(x)[None])[0].numpy()
    ours = resample(x, sr, 16000)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 24000, 44100])
def test_streaming_resampler_equals_one_shot_for_any_chunking(sr):
    x = _signal(sr + 1234, seed=1)
    whole = resample(x, sr, 16000)
    rs = StreamingResampler(sr, 16000)
    rng = np.random.default_rng(2)
    parts, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 3000))
        parts.append(rs.process(x[i : i + n]))
        i += n
    parts.append(rs.flush())
    got = np.concatenate(parts)
    assert got.shape == whole.shape
    np.testing.assert_allclose(got, whole, atol=1e-6)


def test_int16_bytes_and_arrays_are_scaled_like_soundfile():
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    expected = pcm.astype(np.float32) / 32768
    np.testing.assert_array_equal(to_mono_float32(pcm.tobytes()), expected)
    np.testing.assert_array_equal(to_mono_float32(pcm), expected)


def test_stereo_is_averaged_in_either_layout():
    left = np.linspace(-1, 1, 1000, dtype=np.float32)
    right = np.zeros(1000, dtype=np.float32)
    frames_first = np.stack([left, right], axis=1)
    np.testing.assert_allclose(to_mono_float32(frames_first), left / 2)
    np.testing.assert_allclose(to_mono_float32(frames_first.T), left / 2)


@pytest.mark.parametrize(
    "bad, msg",
    [
        (np.array([0.1, np.nan], dtype=np.float32), "NaN"),
        (np.array([0.1, np.inf], dtype=np.float32), "NaN or infinite"),
        (b"\x00\x01\x02", "even number of bytes"),
        (np.zeros((2, 2, 2), dtype=np.float32), "shape"),
        (np.array(["a"]), "unsupported sample type"),
    ],
)
def test_bad_samples_give_a_clear_error(bad, msg):
    with pytest.raises(AudioError, match=msg):
        to_mono_float32(bad)


def test_load_audio_rejects_missing_corrupt_and_empty_files(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        load_audio(tmp_path / "missing.wav")
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk")
    with pytest.raises(AudioError, match="not a readable sound file"):
        load_audio(corrupt)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.int16), 16000)
    with pytest.raises(AudioError, match="no samples"):
        load_audio(empty)


def test_load_audio_downmixes_stereo_int16(tmp_path):
    data = np.stack([np.full(100, 8192, np.int16), np.zeros(100, np.int16)], axis=1)
    buf = io.BytesIO()
    sf.write(buf, data, 22050, format="WAV", subtype="PCM_16")
    buf.seek(0)
    wav, sr = load_audio(buf)
    assert sr == 22050 and wav.shape == (100,)
    np.testing.assert_allclose(wav, 0.125)


def test_energy_normalize_follows_the_reference_floor():
    quiet = np.full(10, 0.001, dtype=np.float32)
    np.testing.assert_allclose(energy_normalize(quiet), 0.001 / 0.01 * 0.999)
    loud = np.array([0.5, -0.25], dtype=np.float32)
    np.testing.assert_allclose(energy_normalize(loud), [0.999, -0.4995])
