"""What the CosyVoice streaming fixture's maker (tools/make_cosyvoice_stream_fixture.py) and its
tests share: the random draws both CosyVoice's own streaming code and ours are given, and the
fingerprint of the checkpoints the fixture was made on.

The draws let the two outputs be compared number for number (the recipe draws fresh noise per
chunk: the flow's initial noise and HiFT's source phases and noise).

The values come from a counter-based hash (splitmix64 of seed, kind, chunk and element index,
then Box-Muller), not from a library RNG, so the fixture maker (tools/) and the tests regenerate
the same numbers on any machine and any torch or numpy version without storing megabytes of
noise. Only the values matter here; their statistical quality is that of any 53-bit hash.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch

from stepaudio.tts.hift import SourceDraws

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_KINDS = {"flow": 1, "phase": 2, "source": 3}


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniform(seed: int, kind: str, chunk: int, n: int) -> np.ndarray:
    """n float64 values in (0, 1) for draw ``kind`` of chunk ``chunk``."""
    with np.errstate(over="ignore"):
        base = _mix(np.array([seed * 1_000_003 + _KINDS[kind] * 10_007 + chunk], dtype=np.uint64))
        z = _mix(base + (np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN))
    return ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)


def normal(seed: int, kind: str, chunk: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 values of ``shape`` (Box-Muller on pairs of uniforms)."""
    n = math.prod(shape)
    u = uniform(seed, kind, chunk, 2 * n)
    z = np.sqrt(-2.0 * np.log(u[0::2])) * np.cos(2.0 * np.pi * u[1::2])
    return torch.from_numpy(z.astype(np.float32).reshape(shape))


def phases(seed: int, chunk: int, harmonics: int) -> torch.Tensor:
    """(1, harmonics, 1) phases as ``torch.distributions.Uniform(-pi, pi).sample`` forms them
    (``low + rand * (high - low)`` in float32), from this module's uniforms."""
    u = torch.from_numpy(uniform(seed, "phase", chunk, harmonics).astype(np.float32))
    low, high = torch.tensor(-np.pi, dtype=torch.float32), torch.tensor(np.pi, dtype=torch.float32)
    return (low + u * (high - low)).view(1, harmonics, 1)


class HashDraws:
    """The streaming mode's draw source (:class:`stepaudio.tts.streaming_cosyvoice.ChunkDraws`)
    with this module's values."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def flow_noise(self, chunk: int, shape: tuple[int, int]) -> torch.Tensor:
        return normal(self.seed, "flow", chunk, shape)

    def source(self, chunk: int, harmonics: int, samples: int) -> SourceDraws:
        return SourceDraws(phases(self.seed, chunk, harmonics),
                           normal(self.seed, "source", chunk, (1, harmonics, samples)))


def checkpoint_fingerprint(folder: Path) -> str:
    """sha256 of the flow and HiFT weights (names, shapes and float32 values, not the pickle
    bytes, which vary with the torch version that wrote them)."""
    digest = hashlib.sha256()
    for name in ("flow.pt", "hift.pt"):
        state = torch.load(Path(folder) / name, map_location="cpu", weights_only=True)
        for key in sorted(state):
            value = state[key].detach().to(torch.float32).contiguous().numpy()
            digest.update(f"{name}:{key}:{tuple(value.shape)}".encode())
            digest.update(value.astype("<f4").tobytes())
    return digest.hexdigest()
