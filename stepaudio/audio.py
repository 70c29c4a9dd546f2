"""PCM conversion, resampling and file I/O shared by every stage.

Everything that touches raw audio goes through here, so that bad input (empty, NaN, corrupt files,
odd dtypes or layouts) is rejected in one place with one clear message, and so that the resampler the
tokenizer relies on is the reference's sinc-Hann kernel in both its offline and streaming forms.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf

from .errors import AudioError

MAX_CHANNELS = 32


def to_mono_float32(data: np.ndarray | bytes | bytearray | memoryview, *, what: str = "audio") -> np.ndarray:
    """Any PCM layout the users send -> mono float32 in [-1, 1].

    Bytes are little-endian int16 (the wire format). Integer arrays are scaled by their full range
    as torchaudio/soundfile load them; 2-D arrays are (frames, channels), or (channels, frames) when
    only that reading gives a plausible channel count; channels are averaged as the reference does.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        if len(raw) % 2:
            raise AudioError(f"{what}: int16 PCM must have an even number of bytes, got {len(raw)}")
        arr: np.ndarray = np.frombuffer(raw, dtype="<i2")
    else:
        arr = np.asarray(data)
    if arr.dtype == np.int16:
        arr = arr.astype(np.float32) / 32768.0
    elif arr.dtype == np.int32:
        arr = (arr.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif arr.dtype == np.uint8:  # 8-bit WAV is unsigned
        arr = (arr.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32, copy=False)
    else:
        raise AudioError(f"{what}: unsupported sample type {arr.dtype}")
    if arr.ndim == 2:
        if arr.shape[1] <= MAX_CHANNELS:
            arr = arr.mean(axis=1, dtype=np.float32) if arr.shape[1] > 1 else arr[:, 0]
        elif arr.shape[0] <= MAX_CHANNELS:
            arr = arr.mean(axis=0, dtype=np.float32) if arr.shape[0] > 1 else arr[0]
        else:
            raise AudioError(f"{what}: cannot tell channels from frames in shape {arr.shape}")
    elif arr.ndim != 1:
        raise AudioError(f"{what}: expected 1-D or 2-D samples, got shape {arr.shape}")
    if arr.size and not np.isfinite(arr).all():
        raise AudioError(f"{what}: contains NaN or infinite samples")
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_sample_rate(sr: int, *, what: str = "audio") -> int:
    if not isinstance(sr, (int, np.integer)) or isinstance(sr, bool) or not 1000 <= int(sr) <= 384000:
        raise AudioError(f"{what}: sample rate must be an integer between 1000 and 384000, got {sr!r}")
    return int(sr)


def load_audio(path: str | os.PathLike[str] | io.BytesIO) -> tuple[np.ndarray, int]:
    """Read a sound file (wav, flac, ogg, mp3 where libsndfile has it) as mono float32."""
    name = getattr(path, "name", None) or str(path)
    if not isinstance(path, io.BytesIO) and not Path(path).is_file():
        raise AudioError(f"{name}: no such file")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise AudioError(f"{name}: not a readable sound file ({err})") from None
    wav = to_mono_float32(data, what=name)
    if wav.size == 0:
        raise AudioError(f"{name}: contains no samples")
    return wav, check_sample_rate(sr, what=name)


def iter_audio_blocks(path: str | os.PathLike[str], block_s: float = 30.0) -> tuple[int, Iterator[np.ndarray]]:
    """Mono float32 blocks of a file, so that an hour-long recording never sits in memory whole."""
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as err:
        raise AudioError(f"{path}: not a readable sound file ({err})") from None
    sr = check_sample_rate(info.samplerate, what=str(path))
    blocksize = max(1, int(block_s * sr))

    def gen() -> Iterator[np.ndarray]:
        for block in sf.blocks(str(path), blocksize=blocksize, dtype="float32", always_2d=True):
            yield to_mono_float32(block, what=str(path))

    return sr, gen()


def write_wav(path: str | os.PathLike[str], wav: np.ndarray, sr: int) -> None:
    sf.write(str(path), np.asarray(wav, dtype=np.float32), sr, subtype="PCM_16")


def energy_normalize(wav: np.ndarray, peak: float | None = None) -> np.ndarray:
    """The reference's `x / max(max|x|, 0.01) * 0.999` (peak may come from a first pass)."""
    if peak is None:
        peak = float(np.max(np.abs(wav))) if wav.size else 0.0
    return (wav / max(peak, 0.01) * 0.999).astype(np.float32)


class StreamingResampler:
    """torchaudio's sinc-Hann resampler, fed in pieces, with output identical to the one-shot call.

    torchaudio pads the whole signal with `width` zeros on the left and `width + orig` on the right
    and runs a strided conv; every output block depends on a fixed window of input. Keeping that
    window between calls lets live audio of any chunk size be resampled exactly as the reference
    resamples a whole file (the 2:3 code alignment downstream depends on exact sample counts).
    Up-sampling works too (8 kHz telephony input: the reference asserts it away).
    """

    def __init__(self, orig_sr: int, new_sr: int = 16000) -> None:
        self.orig_sr = check_sample_rate(orig_sr)
        self.new_sr = check_sample_rate(new_sr)
        self.identity = self.orig_sr == self.new_sr
        self.n_in = 0
        self.n_out = 0
        if self.identity:
            return
        import torch  # imported here: the codecs and file I/O of this module do not need torch
        from torchaudio.functional.functional import _get_sinc_resample_kernel

        gcd = math.gcd(self.orig_sr, self.new_sr)
        self.kernel, self.width = _get_sinc_resample_kernel(
            self.orig_sr, self.new_sr, gcd, 6, 0.99, "sinc_interp_hann", None, torch.device("cpu"), None
        )
        self.orig = self.orig_sr // gcd
        self.new = self.new_sr // gcd
        self.klen = self.kernel.shape[-1]
        self.buf = np.zeros(self.width, dtype=np.float32)  # the left zero padding

    def _run(self, buf: np.ndarray) -> tuple[np.ndarray, int]:
        nblocks = (len(buf) - self.klen) // self.orig + 1 if len(buf) >= self.klen else 0
        if nblocks <= 0:
            return np.zeros(0, dtype=np.float32), 0
        used = (nblocks - 1) * self.orig + self.klen
        # Two torch calls, the rest in numpy: a live server runs this for every 20 ms append of
        # every session on one interpreter lock, where each torch call's Python overhead counts.
        import torch

        x = torch.from_numpy(buf[:used].reshape(1, 1, used))
        y = torch.nn.functional.conv1d(x, self.kernel, stride=self.orig).numpy()  # (1, new, n)
        return y[0].T.reshape(-1), nblocks * self.orig

    def process(self, wav: np.ndarray) -> np.ndarray:
        wav = np.asarray(wav, dtype=np.float32)
        self.n_in += len(wav)
        if self.identity:
            self.n_out += len(wav)
            return wav.copy()
        buf = np.concatenate([self.buf, wav]) if len(self.buf) else wav
        out, consumed = self._run(buf)
        self.buf = buf[consumed:].copy()
        self.n_out += len(out)
        return out

    def flush(self) -> np.ndarray:
        """The tail, trimmed to ceil(new * n_in / orig) samples in all, as torchaudio does."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        buf = np.concatenate([self.buf, np.zeros(self.width + self.orig, dtype=np.float32)])
        out, _ = self._run(buf)
        target = math.ceil(self.new * self.n_in / self.orig)
        out = out[: max(0, target - self.n_out)]
        self.n_out += len(out)
        self.buf = np.zeros(0, dtype=np.float32)
        return out


def resample(wav: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """One-shot resampling, bit-compatible with torchaudio.transforms.Resample."""
    if orig_sr == new_sr:
        return np.asarray(wav, dtype=np.float32)
    rs = StreamingResampler(orig_sr, new_sr)
    return np.concatenate([rs.process(wav), rs.flush()])


# ---------------------------------------------------------------------------------------------------
# G.711 (telephony) codecs: μ-law and A-law, 8-bit codes for 8 kHz PCM.


def _ulaw_encode_table() -> np.ndarray:
    # Sun Microsystems' g711.c (what CPython's audioop implemented), vectorised over all int16.
    x = np.arange(-32768, 32768, dtype=np.int32) >> 2
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), 8159) + 33
    seg = np.searchsorted(np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF]), mag)
    code = (seg << 4) | ((mag >> (seg + 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, code)
    return (code ^ mask).astype(np.uint8)


def _ulaw_decode_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, 0x84 - t, t - 0x84).astype(np.int16)


def _alaw_encode_table() -> np.ndarray:
    x = np.arange(-32768, 32768, dtype=np.int32) >> 3
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF]), mag)
    low = np.where(seg < 2, (mag >> 1) & 0xF, (mag >> np.maximum(seg, 1)) & 0xF)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | low)
    return (code ^ mask).astype(np.uint8)


def _alaw_decode_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, t + 0x108)
    t = np.where(seg > 1, t << np.maximum(seg - 1, 0), t)
    return np.where(a & 0x80, t, -t).astype(np.int16)


_ULAW_ENC, _ULAW_DEC = _ulaw_encode_table(), _ulaw_decode_table()
_ALAW_ENC, _ALAW_DEC = _alaw_encode_table(), _alaw_decode_table()


def ulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> G.711 μ-law bytes (bit-exact with the old ``audioop.lin2ulaw``)."""
    return _ULAW_ENC[np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768]


def ulaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    return _ULAW_DEC[np.frombuffer(codes, dtype=np.uint8) if isinstance(codes, bytes) else codes]


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 samples -> G.711 A-law bytes (bit-exact with the old ``audioop.lin2alaw``)."""
    return _ALAW_ENC[np.asarray(pcm, dtype=np.int16).astype(np.int32) + 32768]


def alaw_decode(codes: np.ndarray | bytes) -> np.ndarray:
    return _ALAW_DEC[np.frombuffer(codes, dtype=np.uint8) if isinstance(codes, bytes) else codes]


def float_to_int16(samples: np.ndarray) -> np.ndarray:
    x = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767.0
    return np.rint(x).astype(np.int16)
