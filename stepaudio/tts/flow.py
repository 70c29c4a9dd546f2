"""Tokens → mel: CosyVoice-1's `MaskedDiffWithXvec` (as Step-Audio ships it, for dual codes).

Pipeline, as the reference's `inference`: speaker x-vector → L2-normalise → Linear; prompt and
target tokens → Embedding → ConformerEncoder → Linear; the prompt part and the target part are
linearly interpolated *separately* to the prompt's mel length and to
``int(n_target / input_frame_rate * sampling_rate / hop_size)`` frames; then conditional flow
matching (Euler, cosine schedule, classifier-free guidance) from noise to mel, with the prompt's
mel as the condition, and only the target frames are returned.

The random draw (the initial noise) can be injected, so results can be compared with recorded
reference runs and so streaming code can control it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio.errors import ModelError

#: The reference's `mel_feat_conf` default (used only when neither it nor a feat_extractor is given).
DEFAULT_MEL_CONF: dict[str, Any] = {
    "n_fft": 1024, "num_mels": 80, "sampling_rate": 22050, "hop_size": 256,
    "win_size": 1024, "fmin": 0, "fmax": 8000,
}

#: Called once per estimator evaluation: (step index, x, t, velocity after guidance).
StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class InterpolateRegulator(nn.Module):
    """Token-rate features → mel-rate features: linear interpolation, then (conv3, GroupNorm, Mish)×n
    and a 1×1 conv. Keys `model.<i>` as the reference's `nn.Sequential`."""

    def __init__(self, channels: int, sampling_ratios: tuple[int, ...] | list[int],
                 out_channels: int | None = None, groups: int = 1) -> None:
        super().__init__()
        self.sampling_ratios = tuple(sampling_ratios)
        layers: list[nn.Module] = []
        for _ in self.sampling_ratios:
            layers += [nn.Conv1d(channels, channels, 3, 1, 1), nn.GroupNorm(groups, channels), nn.Mish()]
        layers.append(nn.Conv1d(channels, out_channels or channels, 1, 1))
        self.model = nn.Sequential(*layers)

    def inference(self, x1: torch.Tensor, x2: torch.Tensor, mel_len1: int, mel_len2: int) -> torch.Tensor:
        """x1 (B, T1, D) prompt part, x2 (B, T2, D) target part → (B, mel_len1 + mel_len2, D)."""
        x = F.interpolate(x2.transpose(1, 2).contiguous(), size=mel_len2, mode="linear")
        if x1.shape[1] != 0:
            x1 = F.interpolate(x1.transpose(1, 2).contiguous(), size=mel_len1, mode="linear")
            x = torch.cat([x1, x], dim=2)
        return self.model(x).transpose(1, 2).contiguous()


def cosine_t_span(n_timesteps: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu", scheduler: str = "cosine") -> torch.Tensor:
    """The n+1 solver times, in the flow's dtype as the reference computes them (bf16 in bf16)."""
    t_span = torch.linspace(0, 1, n_timesteps + 1, device=device, dtype=dtype)
    if scheduler == "cosine":
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    return t_span


class ConditionalCFM(nn.Module):
    """Conditional flow matching sampler around the `ConditionalDecoder` estimator."""

    def __init__(self, in_channels: int, cfm_params: Mapping[str, Any], n_spks: int = 1,
                 spk_emb_dim: int = 64, estimator: nn.Module | None = None) -> None:
        super().__init__()
        if estimator is None:
            raise ModelError("flow decoder: no estimator configured")
        params = dict(cfm_params)
        if params.get("solver", "euler") != "euler":
            raise ModelError(f"flow decoder: solver {params['solver']!r} is not supported (euler)")
        self.n_feats = in_channels
        self.t_scheduler = str(params.get("t_scheduler", "cosine"))
        self.inference_cfg_rate = float(params.get("inference_cfg_rate", 0.7))
        self.sigma_min = float(params.get("sigma_min", 1e-4))
        self.estimator = estimator

    @torch.inference_mode()
    def forward(self, mu: torch.Tensor, mask: torch.Tensor, n_timesteps: int, temperature: float = 1.0,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                step_hook: StepHook | None = None) -> torch.Tensor:
        """Sample a mel (B, 80, T). `noise` replaces the reference's `randn_like(mu)` draw."""
        if noise is None:
            noise = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        elif noise.shape != mu.shape:
            raise ModelError(f"flow decoder: noise shape {tuple(noise.shape)} != mu {tuple(mu.shape)}")
        z = noise.to(device=mu.device, dtype=mu.dtype) * temperature
        t_span = cosine_t_span(n_timesteps, mu.dtype, mu.device, self.t_scheduler)
        return self.solve_euler(z, t_span, mu, mask, spks, cond, step_hook)

    def solve_euler(self, x: torch.Tensor, t_span: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor,
                    spks: torch.Tensor | None, cond: torch.Tensor | None,
                    step_hook: StepHook | None = None) -> torch.Tensor:
        """Fixed-step Euler; `t` is carried as t + dt and dt re-derived from t_span, as the reference
        does, so the evaluated times match it to the last bit."""
        t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
        r = self.inference_cfg_rate
        if r > 0:
            mask2 = torch.cat([mask, mask], dim=0)
            mu2 = torch.cat([mu, torch.zeros_like(mu)], dim=0)
            spks2 = torch.cat([spks, torch.zeros_like(spks)], dim=0) if spks is not None else None
            cond2 = torch.cat([cond, torch.zeros_like(cond)], dim=0) if cond is not None else None
        for step in range(1, len(t_span)):
            if r > 0:
                v2 = self.estimator(torch.cat([x, x], dim=0), mask2, mu2, torch.cat([t, t], dim=0),
                                    spks2, cond2)
                v, v_uncond = torch.chunk(v2, 2, dim=0)
                v = (1.0 + r) * v - r * v_uncond
            else:
                v = self.estimator(x, mask, mu, t, spks, cond)
            if step_hook is not None:
                step_hook(step - 1, x, t, v)
            x = x + dt * v
            t = t + dt
            if step < len(t_span) - 1:
                dt = t_span[step + 1] - t
        return x


@dataclass
class FlowConditions:
    """What the CFM sampler is given (all (1, C, T) in channel-first layout, T = mel_len1 + mel_len2)."""

    mu: torch.Tensor
    mask: torch.Tensor
    spks: torch.Tensor
    cond: torch.Tensor
    mel_len1: int
    mel_len2: int


class MaskedDiffWithXvec(nn.Module):
    """Flow model: `inference(token, prompt_token, prompt_feat, embedding)` → target mel (1, 80, T2)."""

    def __init__(
        self,
        input_size: int = 512,
        output_size: int = 80,
        spk_embed_dim: int = 192,
        output_type: str = "mel",
        vocab_size: int = 4096,
        input_frame_rate: float = 50,
        only_mask_loss: bool = True,
        encoder: nn.Module | None = None,
        length_regulator: InterpolateRegulator | None = None,
        decoder: ConditionalCFM | None = None,
        decoder_conf: Mapping[str, Any] | None = None,
        mel_feat_conf: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if encoder is None or length_regulator is None or decoder is None:
            raise ModelError("flow: encoder, length_regulator and decoder must all be configured")
        if input_frame_rate <= 0:
            raise ModelError(f"flow: input_frame_rate must be positive, got {input_frame_rate!r}")
        self.input_size = input_size
        self.output_size = output_size
        self.vocab_size = vocab_size
        self.output_type = output_type
        self.input_frame_rate = float(input_frame_rate)
        self.mel_feat_conf = dict(DEFAULT_MEL_CONF if mel_feat_conf is None else mel_feat_conf)
        self.input_embedding = nn.Embedding(vocab_size, input_size)
        self.spk_embed_affine_layer = nn.Linear(spk_embed_dim, output_size)
        self.encoder = encoder
        self.encoder_proj = nn.Linear(encoder.output_size(), output_size)
        self.decoder = decoder
        self.length_regulator = length_regulator

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder_proj.weight.dtype

    def mel_frames(self, n_tokens: int) -> int:
        """Mel frames for `n_tokens` target tokens: the reference's int() truncation, from the yaml's
        `input_frame_rate` and mel sampling rate / hop."""
        conf = self.mel_feat_conf
        return int(n_tokens / self.input_frame_rate * conf["sampling_rate"] / conf["hop_size"])

    @torch.inference_mode()
    def conditions(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                   embedding: torch.Tensor) -> FlowConditions:
        """Everything before the sampler: mu, mask, projected speaker embedding, prompt condition."""
        if token.dim() != 2 or token.shape[0] != 1:
            raise ModelError(f"flow: expected target tokens of shape (1, T), got {tuple(token.shape)}")
        dtype, device = self.dtype, self.encoder_proj.weight.device
        prompt_token = prompt_token.reshape(1, -1).to(device)
        spks = self.spk_embed_affine_layer(F.normalize(embedding.to(device, dtype), dim=1))
        n1 = prompt_token.shape[1]
        tokens = torch.cat([prompt_token, token.to(device)], dim=1)
        if tokens.numel() and int(tokens.max()) >= self.vocab_size:
            raise ModelError(f"flow: token id {int(tokens.max())} outside the vocabulary of {self.vocab_size}")
        h = self.encoder_proj(self.encoder(self.input_embedding(torch.clamp(tokens, min=0))))
        mel_len1, mel_len2 = prompt_feat.shape[1], self.mel_frames(token.shape[1])
        h = self.length_regulator.inference(h[:, :n1], h[:, n1:], mel_len1, mel_len2)
        cond = torch.zeros([1, mel_len1 + mel_len2, self.output_size], device=device)
        cond[:, :mel_len1] = prompt_feat.to(device)
        mask = torch.ones([1, 1, mel_len1 + mel_len2], device=device, dtype=dtype)
        return FlowConditions(h.transpose(1, 2).contiguous(), mask, spks, cond.transpose(1, 2),
                              mel_len1, mel_len2)

    @torch.inference_mode()
    def inference(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                  embedding: torch.Tensor, noise: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, n_timesteps: int = 10,
                  temperature: float = 1.0) -> torch.Tensor:
        """token (1, T2) and prompt_token (1, T1) ids in 0..vocab-1, prompt_feat (1, mel_len1, 80),
        embedding (1, spk_embed_dim) → mel (1, 80, mel_len2) in the flow's dtype.

        `noise` (1, 80, mel_len1 + mel_len2) replaces the reference's initial `randn_like` draw.
        """
        c = self.conditions(token, prompt_token, prompt_feat, embedding)
        feat = self.decoder(c.mu, c.mask, n_timesteps, temperature, spks=c.spks, cond=c.cond,
                            noise=noise, generator=generator)
        return feat[:, :, c.mel_len1:]
