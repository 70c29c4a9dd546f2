"""The flow-matching velocity estimator: CosyVoice's `ConditionalDecoder`, a 1-D U-Net of
ResNet blocks and transformer blocks.

The reference builds its transformer blocks from diffusers (`BasicTransformerBlock`, `Attention`,
`GELU`, `TimestepEmbedding`); diffusers is not a dependency here, so the few pieces used are
re-written with the same parameter names (`attn1.to_q`, `attn1.to_out.0`, `ff.net.0.proj`,
`time_mlp.linear_1` …) so `flow.pt` loads with ``strict=True``.

Numerics follow the reference with one deliberate change: the reference hard-casts the down-block
inputs to bfloat16 (so it only runs as a bf16 module); here they are cast to the estimator's own
parameter dtype, which is the same thing for a bf16 module and makes fp32 possible (this is the
patch the golden fp32 vectors were produced with).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio.errors import ModelError


class SinusoidalPosEmb(nn.Module):
    """Timestep embedding: [sin, cos] of 1000·t times 10000^(-i/(d/2-1)), computed in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ModelError(f"estimator: in_channels {dim} must be even (timestep embedding)")
        self.dim = dim

    def forward(self, x: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        if x.ndim < 1:
            x = x.unsqueeze(0)
        half = self.dim // 2
        freq = torch.exp(torch.arange(half, device=x.device).float() * -(math.log(10000) / (half - 1)))
        emb = scale * x.unsqueeze(1) * freq.unsqueeze(0)
        return torch.cat((emb.sin(), emb.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 → SiLU → linear_2 (diffusers' layout, no conditioning projection)."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu") -> None:
        super().__init__()
        if act_fn != "silu":
            raise ModelError(f"estimator: timestep activation {act_fn!r} is not supported")
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, sample: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(sample)))


class Block1D(nn.Module):
    """Masked conv3 → GroupNorm(8) → Mish."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv1d(dim, dim_out, 3, padding=1), nn.GroupNorm(groups, dim_out),
                                   nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class ResnetBlock1D(nn.Module):
    """Two Block1D with the timestep embedding added in between, plus a 1×1 residual."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = Block1D(dim, dim_out, groups=groups)
        self.block2 = Block1D(dim_out, dim_out, groups=groups)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask)
        h = h + self.mlp(time_emb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """ConvTranspose1d(k4, s2, p1): doubles the length."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(channels, channels, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """diffusers `Attention` as used here: self-attention, no q/k/v bias, output bias, SDPA."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, bias: bool = False) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(query_dim, inner, bias=bias)
        self.to_v = nn.Linear(query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.size(0)
        q, k, v = (lin(x).view(b, -1, self.heads, lin.out_features // self.heads).transpose(1, 2)
                   for lin in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, q.size(1) * q.size(3)).to(q.dtype)
        return self.to_out[0](out)


class GELU(nn.Module):
    """diffusers' `GELU` projection: Linear then exact (erf) or tanh GELU."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none") -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """net.0 = activation projection, net.1 = dropout, net.2 = output Linear."""

    def __init__(self, dim: int, mult: int = 4, activation_fn: str = "gelu") -> None:
        super().__init__()
        inner = int(dim * mult)
        if activation_fn == "gelu":
            act: nn.Module = GELU(dim, inner)
        elif activation_fn == "gelu-approximate":
            act = GELU(dim, inner, approximate="tanh")
        else:
            raise ModelError(f"estimator: act_fn {activation_fn!r} is not supported (gelu only)")
        self.net = nn.ModuleList([act, nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention + pre-norm feed-forward (norm1/attn1, norm3/ff; no cross-attention)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int,
                 activation_fn: str = "gelu") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_attention_heads, attention_head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn=activation_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        return self.ff(self.norm3(x)) + x


def _transformers(n: int, dim: int, heads: int, head_dim: int, act_fn: str) -> nn.ModuleList:
    return nn.ModuleList(BasicTransformerBlock(dim, heads, head_dim, act_fn) for _ in range(n))


def _run_transformers(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    x = x.transpose(1, 2).contiguous()
    for block in blocks:
        x = block(x)
    return x.transpose(1, 2).contiguous()


class ConditionalDecoder(nn.Module):
    """Velocity field v(x, t | mu, spks, cond) on (B, 80, T) mels.

    Masks are multiplied in as the reference does; attention masks are not used (the reference
    commented them out), so padded positions still take part in attention.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        channels: tuple[int, ...] | list[int] = (256, 256),
        dropout: float = 0.05,
        attention_head_dim: int = 64,
        n_blocks: int = 1,
        num_mid_blocks: int = 2,
        num_heads: int = 4,
        act_fn: str = "snake",
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.time_embeddings = SinusoidalPosEmb(in_channels)
        time_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(in_channels, time_dim, act_fn="silu")

        def blocks(dim: int) -> nn.ModuleList:
            return _transformers(n_blocks, dim, num_heads, attention_head_dim, act_fn)

        self.down_blocks = nn.ModuleList()
        out_ch = in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            down = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Downsample1D(out_ch)
            self.down_blocks.append(nn.ModuleList([ResnetBlock1D(in_ch, out_ch, time_dim),
                                                   blocks(out_ch), down]))
        self.mid_blocks = nn.ModuleList(
            nn.ModuleList([ResnetBlock1D(channels[-1], out_ch, time_dim), blocks(out_ch)])
            for _ in range(num_mid_blocks)
        )
        ups = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(ups) - 1):
            out_ch = ups[i + 1]
            last = i == len(ups) - 2
            up = nn.Conv1d(out_ch, out_ch, 3, padding=1) if last else Upsample1D(out_ch)
            self.up_blocks.append(nn.ModuleList([ResnetBlock1D(ups[i] * 2, out_ch, time_dim),
                                                 blocks(out_ch), up]))
        self.final_block = Block1D(ups[-1], ups[-1])
        self.final_proj = nn.Conv1d(ups[-1], out_channels, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """x, mu, cond: (B, 80, T); mask: (B, 1, T); t: (B,); spks: (B, 80) → velocity (B, 80, T)."""
        dtype = self.final_proj.weight.dtype
        t = self.time_mlp(self.time_embeddings(t).to(t.dtype))
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        x = torch.cat(parts, dim=1)

        hiddens, masks = [], [mask]
        for resnet, transformers, downsample in self.down_blocks:
            mask_down = masks[-1]
            x = resnet(x.to(dtype), mask_down.to(dtype), t.to(dtype))
            x = _run_transformers(transformers, x)
            hiddens.append(x)
            x = downsample(x * mask_down)
            masks.append(mask_down[:, :, ::2])
        masks = masks[:-1]
        mask_mid = masks[-1]
        for resnet, transformers in self.mid_blocks:
            x = _run_transformers(transformers, resnet(x, mask_mid, t))
        for resnet, transformers, upsample in self.up_blocks:
            mask_up = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = _run_transformers(transformers, resnet(x, mask_up, t))
            x = upsample(x * mask_up)
        x = self.final_block(x, mask_up)
        return self.final_proj(x * mask_up) * mask
