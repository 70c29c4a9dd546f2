"""A chunk's vocoder work as a sequence of model requests, so one scheduler can batch many streams.

Why: on a GPU a flow call costs about the same for one window as for several (it is ~1000 small
kernels), so speech for many sessions is cheap only if their windows run together. A streaming
token-to-wav chunk is therefore written as a generator that *yields* the model calls it needs
(:class:`Encode`, :class:`Regulate`, :class:`Solve`, :class:`PredictF0`, :class:`Decode`) and
receives each result; all its other work (placing tokens on the grid, noise, cross-fades, phase
bookkeeping) stays in the generator. Whoever drives the generator decides how the call runs:
:func:`run_now` runs each one alone (the unbatched path), the batching scheduler runs the same
requests of many streams in one call. A stream's arithmetic is the same either way.

Shapes are per stream, without a batch axis; tensors live on the vocoder's device.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Encode:
    """Flow token encoder (embedding, conformer, projection): ids (n,) int64 → (n, 80)."""

    ids: torch.Tensor


@dataclass(frozen=True)
class Regulate:
    """The length regulator's convolutions on interpolated features: x (80, L) → mu (80, L)."""

    x: torch.Tensor


@dataclass(frozen=True)
class Solve:
    """The CFM sampler (Euler steps with guidance): mu, cond, noise (80, L), spks (80,) → mel
    (80, L) in the flow's dtype. The first ``prompt`` frames are the speaker prompt."""

    mu: torch.Tensor
    cond: torch.Tensor
    spks: torch.Tensor
    noise: torch.Tensor


@dataclass(frozen=True)
class PredictF0:
    """HiFT's F0 predictor: mel (80, L) float32 → F0 in Hz (L,) float32."""

    mel: torch.Tensor


@dataclass(frozen=True)
class Decode:
    """HiFT's decoder: mel (80, L) float32 and excitation (L·hop,) → waveform (L·hop,)."""

    mel: torch.Tensor
    source: torch.Tensor


Request = Encode | Regulate | Solve | PredictF0 | Decode

#: One chunk: yields requests, is sent each result, returns float32 PCM (possibly empty).
ChunkWork = Generator[Request, torch.Tensor, np.ndarray]

#: (mu, mask, spks, cond, noise) → mel (1, 80, T): the estimator's Euler steps (eager or a
#: captured CUDA graph).
Solver = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                  torch.Tensor]
#: HiFT's decode (mel, source) → wav, eager or captured.
DecodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: The flow's token encoder: ids (1, n) → (1, n, 80) projected features, eager or captured.
EncodeFn = Callable[[torch.Tensor], torch.Tensor]


class VocoderModels(Protocol):
    """What the requests run on: a flow (MaskedDiffWithXvec) and a HiFT generator."""

    flow: Any
    hift: Any


def run_one(models: VocoderModels, request: Request, n_timesteps: int = 10) -> torch.Tensor:
    """One request alone, eagerly, with the models' own modules (the reference arithmetic)."""
    flow, hift = models.flow, models.hift
    with torch.inference_mode():
        if isinstance(request, Encode):
            ids = torch.clamp(request.ids, min=0)[None]
            return flow.encoder_proj(flow.encoder(flow.input_embedding(ids)))[0]
        if isinstance(request, Regulate):
            return flow.length_regulator.model(request.x[None])[0]
        if isinstance(request, Solve):
            from stepaudio.tts.estimator_fast import fast_estimator, solve_full_mask

            cfm = flow.decoder
            mu = request.mu[None]
            mask = torch.ones(1, 1, mu.shape[-1], device=mu.device, dtype=mu.dtype)
            return solve_full_mask(cfm, fast_estimator(cfm.estimator), mu, mask, n_timesteps,
                                   request.spks[None], request.cond[None], request.noise[None])[0]
        if isinstance(request, PredictF0):
            return hift.f0(request.mel[None])[0]
        if isinstance(request, Decode):
            return hift.decode(request.mel[None], request.source.view(1, 1, -1))[0]
    raise TypeError(f"not a vocoder request: {type(request).__name__}")


@dataclass(frozen=True)
class AloneRunner:
    """Runs one stream's requests one at a time (``next_chunk()`` without a scheduler): through
    the stream's accelerated callables where it was given them (captured CUDA graphs), else
    eagerly with :func:`run_one`."""

    models: VocoderModels
    n_timesteps: int = 10
    solver: Solver | None = None
    decode: DecodeFn | None = None
    encode: EncodeFn | None = None

    @torch.inference_mode()
    def __call__(self, request: Request) -> torch.Tensor:
        if isinstance(request, Encode) and self.encode is not None:
            return self.encode(request.ids[None])[0]
        if isinstance(request, Solve) and self.solver is not None:
            mu = request.mu[None]
            mask = torch.ones(1, 1, mu.shape[-1], device=mu.device, dtype=mu.dtype)
            return self.solver(mu, mask, request.spks[None], request.cond[None],
                               request.noise[None])[0]
        if isinstance(request, Decode) and self.decode is not None:
            return self.decode(request.mel[None], request.source.view(1, 1, -1))[0]
        return run_one(self.models, request, self.n_timesteps)


def run_now(work: ChunkWork, run: Any) -> np.ndarray:
    """Drive one chunk to its end, each request through ``run(request) -> tensor``."""
    try:
        request = next(work)
        while True:
            request = work.send(run(request))
    except StopIteration as stop:
        return stop.value


def linear_interp_rows(h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Rows of ``h`` (n, D) read at fractional positions ``pos`` (clamped to [0, n-1]) with
    linear weights: (len(pos), D). The token-to-frame placement of the windowed flow input."""
    n = h.shape[0]
    p = pos.clamp(0, n - 1)
    i0 = p.floor().long().clamp(max=n - 1)
    i1 = (i0 + 1).clamp(max=n - 1)
    w = (p - i0.to(p.dtype)).to(h.dtype).unsqueeze(1)
    return h[i0] * (1 - w) + h[i1] * w


def interpolate_to(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(D, n) → (D, frames) by linear interpolation, as the reference's length regulator."""
    return F.interpolate(x[None].contiguous(), size=frames, mode="linear")[0]
