"""Mel → 22.05 kHz waveform: CosyVoice's HiFT vocoder (neural source filter + iSTFTNet).

The F0 predictor gives a pitch track; a harmonic sine source built from it (8 overtones, random
initial phases, noise in unvoiced frames) is analysed by a small STFT and fused into a HiFi-GAN
style upsampler whose output is a magnitude/phase spectrogram, inverted by an iSTFT.

Checkpoints use legacy `weight_norm` names (`*.weight_g`, `*.weight_v`); the convs here keep those
parameters so `hift.pt` loads with ``strict=True``, and fold them into a plain weight on first use
(recomputed if new weights are loaded). Both random draws of the source (phases, noise) can be
injected, so runs can be compared with recorded reference runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from stepaudio.errors import ModelError


def _weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g · v / ‖v‖ over all dims but 0, with the kernel legacy weight_norm itself uses."""
    return torch._weight_norm(v, g, 0)


class _WeightNormMixin:
    """weight_g / weight_v parameters in place of `weight`, folded lazily and cached."""

    def _init_weight_norm(self) -> None:
        w = self.weight  # type: ignore[has-type]
        del self.weight  # type: ignore[has-type]
        dims = tuple(range(1, w.dim()))
        self.weight_g = nn.Parameter(w.detach().norm(dim=dims, keepdim=True))
        self.weight_v = nn.Parameter(w.detach().clone())
        self._folded: torch.Tensor | None = None

    def folded_weight(self) -> torch.Tensor:
        w = self._folded
        v = self.weight_v
        if w is None or w.dtype != v.dtype or w.device != v.device or torch.is_grad_enabled():
            w = _weight_norm(v, self.weight_g)
            if not torch.is_grad_enabled():
                self._folded = w.detach()
        return w

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._folded = None
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]


class WNConv1d(_WeightNormMixin, nn.Conv1d):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.folded_weight(), self.bias)


class WNConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.folded_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


class Snake(nn.Module):
    """x + sin²(αx)/α with a per-channel α (linear scale, as the reference's ResBlocks use)."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha.unsqueeze(0).unsqueeze(-1)
        return x + (1.0 / (alpha + 1e-9)) * torch.pow(torch.sin(x * alpha), 2)


class ResBlock(nn.Module):
    """HiFi-GAN/BigVGAN residual block: per dilation, Snake → dilated conv → Snake → conv, added."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, 1, dilation=d, padding=(kernel_size * d - d) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            WNConv1d(channels, channels, kernel_size, 1, dilation=1, padding=(kernel_size - 1) // 2)
            for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2,
                                  strict=True):
            x = c2(a2(c1(a1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    """Mel (B, 80, T) → F0 in Hz (B, T): five conv3+ELU layers, a Linear, |·|."""

    def __init__(self, num_class: int = 1, in_channels: int = 80, cond_channels: int = 512) -> None:
        super().__init__()
        self.num_class = num_class
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [WNConv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1),
                       nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, num_class)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.condnet(x).transpose(1, 2)
        return torch.abs(self.classifier(x).squeeze(-1))


@dataclass
class SourceDraws:
    """The two random draws of the sine source, in the reference's shapes.

    phase: (B, harmonics+1, 1) uniform in [-π, π) *as sampled* (harmonic 0 is zeroed afterwards);
    noise: (B, harmonics+1, samples) standard normal.
    """

    phase: torch.Tensor
    noise: torch.Tensor

    @classmethod
    def sample(cls, batch: int, harmonics: int, samples: int, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> SourceDraws:
        phase = torch.rand((batch, harmonics, 1), generator=generator, device=device) * (2 * np.pi) - np.pi
        noise = torch.randn((batch, harmonics, samples), generator=generator, device=device)
        return cls(phase, noise)


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise excitation: tanh(Linear(sines of f0·k, k = 1…H+1))."""

    def __init__(self, sampling_rate: int, upsample_scale: int, harmonic_num: int = 0,
                 sine_amp: float = 0.1, add_noise_std: float = 0.003, voiced_threshod: float = 0) -> None:
        super().__init__()
        self.sampling_rate = sampling_rate
        self.harmonic_num = harmonic_num
        self.sine_amp = sine_amp
        self.noise_std = add_noise_std
        self.voiced_threshold = voiced_threshod
        self.l_linear = nn.Linear(harmonic_num + 1, 1)

    def sine_waves(self, f0: torch.Tensor, draws: SourceDraws,
                   phase0: torch.Tensor | None = None) -> torch.Tensor:
        """f0 (B, 1, L) at the audio rate → (B, H+1, L), the reference's `SineGen` (float32 cumsum).

        `phase0` (B, H+1, 1), in cycles, is added before the wrap: a streaming window that starts
        mid-utterance continues each harmonic's phase instead of restarting it at 0 (a click).
        """
        k = torch.arange(1, self.harmonic_num + 2, device=f0.device, dtype=f0.dtype).view(1, -1, 1)
        f_mat = f0 * k / self.sampling_rate
        cycles = torch.cumsum(f_mat, dim=-1)
        if phase0 is not None:
            cycles = cycles + phase0.to(f0.device, f0.dtype)
        theta = 2 * np.pi * (cycles % 1)
        phase = draws.phase.to(f0.device, f0.dtype).clone()
        phase[:, 0, :] = 0
        sines = self.sine_amp * torch.sin(theta + phase)
        uv = (f0 > self.voiced_threshold).to(torch.float32)
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        return sines * uv + noise_amp * draws.noise.to(f0.device, f0.dtype)

    def forward(self, f0: torch.Tensor, draws: SourceDraws,
                phase0: torch.Tensor | None = None) -> torch.Tensor:
        """f0 (B, 1, L) → excitation (B, 1, L)."""
        sines = self.sine_waves(f0, draws, phase0).transpose(1, 2)
        return torch.tanh(self.l_linear(sines)).transpose(1, 2)


class HiFTGenerator(nn.Module):
    """HiFT: `inference(mel)` → (wav (B, T·hop), source (B, 1, T·hop)); hop = ∏upsample · istft hop."""

    def __init__(
        self,
        in_channels: int = 80,
        base_channels: int = 512,
        nb_harmonics: int = 8,
        sampling_rate: int = 22050,
        nsf_alpha: float = 0.1,
        nsf_sigma: float = 0.003,
        nsf_voiced_threshold: float = 10,
        upsample_rates: Sequence[int] = (8, 8),
        upsample_kernel_sizes: Sequence[int] = (16, 16),
        istft_params: Mapping[str, int] | None = None,
        resblock_kernel_sizes: Sequence[int] = (3, 7, 11),
        resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5), (1, 3, 5)),
        source_resblock_kernel_sizes: Sequence[int] = (7, 11),
        source_resblock_dilation_sizes: Sequence[Sequence[int]] = ((1, 3, 5), (1, 3, 5)),
        lrelu_slope: float = 0.1,
        audio_limit: float = 0.99,
        f0_predictor: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if f0_predictor is None:
            raise ModelError("hift: no f0_predictor configured")
        istft = dict(istft_params or {"n_fft": 16, "hop_len": 4})
        self.n_fft, self.hop_len = int(istft["n_fft"]), int(istft["hop_len"])
        self.sampling_rate = int(sampling_rate)
        self.lrelu_slope = lrelu_slope
        self.audio_limit = audio_limit
        self.num_kernels = len(resblock_kernel_sizes)
        self.num_upsamples = len(upsample_rates)
        self.upsample_scale = int(np.prod(upsample_rates)) * self.hop_len
        self.m_source = SourceModuleHnNSF(self.sampling_rate, self.upsample_scale, nb_harmonics,
                                          nsf_alpha, nsf_sigma, nsf_voiced_threshold)
        self.conv_pre = WNConv1d(in_channels, base_channels, 7, 1, padding=3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(base_channels // 2**i, base_channels // 2 ** (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(upsample_rates, upsample_kernel_sizes, strict=True))
        )
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        down_rates = np.cumprod([1, *list(upsample_rates)[::-1][:-1]])[::-1]
        for i, (u, k, d) in enumerate(zip(down_rates, source_resblock_kernel_sizes,
                                          source_resblock_dilation_sizes, strict=True)):
            ch = base_channels // 2 ** (i + 1)
            u = int(u)
            self.source_downs.append(nn.Conv1d(self.n_fft + 2, ch, 1, 1) if u == 1 else
                                     nn.Conv1d(self.n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, d))
        self.resblocks = nn.ModuleList(
            ResBlock(base_channels // 2 ** (i + 1), k, d)
            for i in range(self.num_upsamples)
            for k, d in zip(resblock_kernel_sizes, resblock_dilation_sizes, strict=True)
        )
        self.conv_post = WNConv1d(base_channels // 2**self.num_upsamples, self.n_fft + 2, 7, 1, padding=3)
        self.f0_predictor = f0_predictor
        # scipy's get_window("hann", n, fftbins=True): the periodic Hann window.
        self.register_buffer("stft_window", torch.hann_window(self.n_fft, periodic=True), persistent=False)

    @property
    def harmonics(self) -> int:
        return self.m_source.harmonic_num + 1

    @torch.inference_mode()
    def f0(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) → F0 (B, T) in Hz."""
        return self.f0_predictor(mel)

    @torch.inference_mode()
    def source(self, f0: torch.Tensor, draws: SourceDraws | None = None,
               generator: torch.Generator | None = None,
               phase0: torch.Tensor | None = None) -> torch.Tensor:
        """F0 (B, T) → excitation (B, 1, T·hop); the F0 is repeated per sample (nearest).

        `phase0`: per-harmonic starting phase in cycles (see `SourceModuleHnNSF.sine_waves`).
        """
        f0_up = F.interpolate(f0[:, None], scale_factor=float(self.upsample_scale), mode="nearest")
        if draws is None:
            draws = SourceDraws.sample(f0.shape[0], self.harmonics, f0_up.shape[-1], generator, f0.device)
        return self.m_source(f0_up, draws, phase0)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(x, self.n_fft, self.hop_len, self.n_fft, window=self.stft_window.to(x.device),
                          return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def _istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return torch.istft(spec, self.n_fft, self.hop_len, self.n_fft,
                           window=self.stft_window.to(magnitude.device))

    @torch.inference_mode()
    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) and excitation (B, 1, T·hop) → waveform (B, T·hop), clamped."""
        s_stft = self._stft(source.squeeze(1))
        x = self.conv_pre(mel)
        for i in range(self.num_upsamples):
            x = self.ups[i](F.leaky_relu(x, self.lrelu_slope))
            if i == self.num_upsamples - 1:
                x = F.pad(x, (1, 0), mode="reflect")
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * self.num_kernels](x)
            for j in range(1, self.num_kernels):
                xs = xs + self.resblocks[i * self.num_kernels + j](x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))
        half = self.n_fft // 2 + 1
        wav = self._istft(torch.exp(x[:, :half, :]), torch.sin(x[:, half:, :]))
        return torch.clamp(wav, -self.audio_limit, self.audio_limit)

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, draws: SourceDraws | None = None,
                  generator: torch.Generator | None = None,
                  cache_source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) float32 → (wav (B, T·hop), source (B, 1, T·hop)).

        `cache_source` overwrites the start of the new excitation (the reference's hook for
        continuing a previous chunk's source, so chunk joins keep their phase).
        """
        s = self.source(self.f0(mel), draws, generator)
        if cache_source is not None and cache_source.shape[-1]:
            n = min(cache_source.shape[-1], s.shape[-1])
            s = s.clone()
            s[:, :, :n] = cache_source[:, :, :n]
        return self.decode(mel, s), s

    def samples_per_frame(self) -> int:
        return self.upsample_scale

    def seconds(self, frames: int) -> float:
        return frames * self.upsample_scale / self.sampling_rate


__all__ = [
    "ConvRNNF0Predictor",
    "HiFTGenerator",
    "ResBlock",
    "Snake",
    "SourceDraws",
    "SourceModuleHnNSF",
    "WNConv1d",
    "WNConvTranspose1d",
]
