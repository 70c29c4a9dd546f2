"""The flow estimator with fewer kernels, for streaming windows on a GPU.

At CosyVoice-300M sizes and streaming lengths (a few hundred frames), one estimator call is
~1300 small kernels and costs what their launches cost, not what their arithmetic costs, even
replayed from a CUDA graph. This forward computes the same function as
:class:`~stepaudio.tts.estimator.ConditionalDecoder` from the same parameters with fewer kernels,
valid when the mask is all ones (always so for one streaming window, unpadded):

- q, k and v come from one matrix product (weights concatenated once, a copy of 3·dim·inner
  values per block) instead of three;
- the mask multiplications (about six per ResNet block, all by 1) are left out;
- on a GPU with Triton, each residual add and the LayerNorm after it are one kernel
  (``add_layer_norm``: the sum rounded to the activations' dtype, then normalised in float32,
  as the two separate kernels round).

Everything else is the original modules' own forward.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio.tts.estimator import (
    BasicTransformerBlock,
    Block1D,
    ConditionalDecoder,
    ResnetBlock1D,
)
from stepaudio.tts.flow import ConditionalCFM, cosine_t_span

try:  # Triton ships with CUDA builds of torch; without it the add and the norm stay two kernels
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    HAS_TRITON = False

if HAS_TRITON:

    @triton.jit
    def _add_ln_kernel(a_ptr, b_ptr, w_ptr, bias_ptr, sum_ptr, out_ptr, n_cols, eps,
                       BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        off = row * n_cols + cols
        a = tl.load(a_ptr + off, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = (a + b).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + off, s, mask=mask)
        x = s.to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        d = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt_rn(tl.sum(d * d, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + off, (d * rstd * w + bias).to(out_ptr.dtype.element_ty), mask=mask)


if HAS_TRITON:

    @triton.jit
    def _valid_tile(x_ptr, m_ptr, base, b, c, cmask, t0, T, HAS_MASK: tl.constexpr,
                    BLOCK_T: tl.constexpr):
        """One (channels, BLOCK_T) tile of a row from frame ``t0``, zero where the frame is past
        the end or masked out: (x, valid frames, valid cells)."""
        t = t0 + tl.arange(0, BLOCK_T)
        valid = t < T
        if HAS_MASK:
            valid = valid & (tl.load(m_ptr + b * T + t, mask=t < T, other=0.0) > 0)
        keep = cmask[:, None] & valid[None, :]
        x = tl.load(x_ptr + base + c[:, None] * T + t[None, :], mask=keep, other=0.0)
        return x, valid, keep

    @triton.jit
    def _gn_mish_kernel(x_ptr, m_ptr, w_ptr, b_ptr, out_ptr, C, T, CG, eps,
                        HAS_MASK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
        """One (row, group): statistics over the group's channels and the row's valid frames,
        then affine, Mish and the mask, in one pass over memory per step (three in all)."""
        pid = tl.program_id(0)
        groups = C // CG
        b = pid // groups
        c = (pid % groups) * CG + tl.arange(0, BLOCK_C)
        cmask = tl.arange(0, BLOCK_C) < CG
        base = b * C * T
        total = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
        count = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            x, valid, keep = _valid_tile(x_ptr, m_ptr, base, b, c, cmask, t0, T, HAS_MASK,
                                         BLOCK_T)
            total += x.to(tl.float32)
            count += valid.to(tl.float32)
        n = tl.sum(count, axis=0) * CG
        n = tl.maximum(n, 1.0)
        mean = tl.sum(tl.sum(total, axis=1), axis=0) / n
        dev = tl.zeros([BLOCK_C, BLOCK_T], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            x, _, keep = _valid_tile(x_ptr, m_ptr, base, b, c, cmask, t0, T, HAS_MASK,
                                     BLOCK_T)
            d = tl.where(keep, x.to(tl.float32) - mean, 0.0)
            dev += d * d
        rstd = 1.0 / tl.sqrt_rn(tl.sum(tl.sum(dev, axis=1), axis=0) / n + eps)
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            inside = t < T
            valid = inside
            if HAS_MASK:
                valid = valid & (tl.load(m_ptr + b * T + t, mask=inside, other=0.0) > 0)
            io = cmask[:, None] & inside[None, :]
            x = tl.load(x_ptr + base + c[:, None] * T + t[None, :], mask=io, other=0.0)
            y = (x.to(tl.float32) - mean) * rstd * w[:, None] + bias[:, None]
            sp = tl.where(y > 20.0, y, tl.log(1.0 + tl.exp(tl.minimum(y, 20.0))))
            e = tl.exp(-2.0 * sp)
            y = y * (1.0 - e) / (1.0 + e)  # y * tanh(softplus(y)): Mish
            y = tl.where(valid[None, :], y, 0.0)
            tl.store(out_ptr + base + c[:, None] * T + t[None, :],
                     y.to(out_ptr.dtype.element_ty), mask=io)


def group_norm_mish(x: torch.Tensor, norm: nn.GroupNorm, mask: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """``Mish(GroupNorm(x))`` of (B, C, T), times ``mask`` (B, 1, T) with the statistics of each
    row's masked frames only: one Triton kernel on a GPU (instead of GroupNorm's two, Mish's and
    the mask's), torch ops elsewhere."""
    if not (HAS_TRITON and x.is_cuda and norm.affine):
        from stepaudio.tts.vocoder_batch import masked_group_norm

        if mask is None:
            return F.mish(norm(x))
        return F.mish(masked_group_norm(x, mask, norm)) * mask
    b, c, t = x.shape
    x = x.contiguous()
    out = torch.empty_like(x)
    cg = c // norm.num_groups
    block_c = triton.next_power_of_2(cg)
    block_t = max(16, min(256, 4096 // block_c))
    m = mask.reshape(b, t).to(torch.float32).contiguous() if mask is not None else x
    _gn_mish_kernel[(b * norm.num_groups,)](x, m, norm.weight, norm.bias, out, c, t, cg,
                                             norm.eps, HAS_MASK=mask is not None,
                                             BLOCK_C=block_c, BLOCK_T=block_t, num_warps=4)
    return out


def add_layer_norm(a: torch.Tensor, b: torch.Tensor, norm: nn.LayerNorm
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(a + b, LayerNorm(a + b)) over the last dimension, one kernel where Triton runs."""
    if not (HAS_TRITON and a.is_cuda and a.is_contiguous() and b.is_contiguous()):
        s = a + b
        return s, norm(s)
    n = a.shape[-1]
    s = torch.empty_like(a)
    out = torch.empty_like(a)
    block = triton.next_power_of_2(n)
    _add_ln_kernel[(a.numel() // n,)](a, b, norm.weight, norm.bias, s, out, n, norm.eps,
                                      BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return s, out


class FastEstimator(nn.Module):
    """``forward(x, mask, mu, t, spks, cond)`` like the estimator; ``mask`` must be all ones."""

    def __init__(self, decoder: ConditionalDecoder, fused_norm: bool = True) -> None:
        super().__init__()
        self.dec = decoder
        self.fused_norm = fused_norm
        self._qkv: dict[int, torch.Tensor] = {}
        #: Keys each query may attend (B, 1, 1, T), or None for all: set per stage by the masked
        #: estimator (:class:`~stepaudio.tts.vocoder_batch.MaskedEstimator`).
        self._keys: torch.Tensor | None = None

    def _fused_qkv(self, block: BasicTransformerBlock) -> torch.Tensor:
        w = self._qkv.get(id(block))
        a = block.attn1
        if w is None or w.dtype != a.to_q.weight.dtype or w.device != a.to_q.weight.device:
            w = torch.cat([a.to_q.weight, a.to_k.weight, a.to_v.weight], dim=0).detach()
            self._qkv[id(block)] = w
        return w

    def _attend(self, block: BasicTransformerBlock, h: torch.Tensor) -> torch.Tensor:
        a = block.attn1
        b, n, _ = h.shape
        inner = a.to_q.out_features
        qkv = F.linear(h, self._fused_qkv(block))
        q, k, v = qkv.view(b, n, 3, a.heads, inner // a.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._keys)
        return a.to_out[0](out.transpose(1, 2).reshape(b, n, inner).to(q.dtype))

    def _transformers(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm blocks, each residual add fused with the norm that reads its sum."""
        x = x.transpose(1, 2).contiguous()
        pending: torch.Tensor | None = None  # a residual branch not yet added to x
        for block in blocks:
            if pending is None:
                h = block.norm1(x)
            else:
                x, h = self._add_norm(pending, x, block.norm1)
            x, h = self._add_norm(self._attend(block, h), x, block.norm3)
            pending = block.ff(h)
        if pending is not None:
            x = pending + x
        return x.transpose(1, 2).contiguous()

    def _add_norm(self, a: torch.Tensor, b: torch.Tensor, norm: nn.LayerNorm
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_norm:
            return add_layer_norm(a, b, norm)
        s = a + b
        return s, norm(s)

    @staticmethod
    def _block(block: Block1D, x: torch.Tensor) -> torch.Tensor:
        conv, norm, _ = block.block
        return group_norm_mish(conv(x), norm)

    def _resnet(self, r: ResnetBlock1D, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self._block(r.block1, x) + r.mlp(t).unsqueeze(-1)
        return self._block(r.block2, h) + r.res_conv(x)

    def _inputs(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None, cond: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the U-Net's input: x, mu, speaker and condition stacked; the time embedding)."""
        d = self.dec
        dtype = d.final_proj.weight.dtype
        t = d.time_mlp(d.time_embeddings(t).to(t.dtype)).to(dtype)
        parts = [x, mu]
        if spks is not None:
            parts.append(spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if cond is not None:
            parts.append(cond)
        return torch.cat(parts, dim=1).to(dtype), t

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        d = self.dec
        x, t = self._inputs(x, mu, t, spks, cond)
        hiddens = []
        for resnet, transformers, downsample in d.down_blocks:
            x = self._transformers(transformers, self._resnet(resnet, x, t))
            hiddens.append(x)
            x = downsample(x)
        for resnet, transformers in d.mid_blocks:
            x = self._transformers(transformers, self._resnet(resnet, x, t))
        for resnet, transformers, upsample in d.up_blocks:
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = upsample(self._transformers(transformers, self._resnet(resnet, x, t)))
        return d.final_proj(self._block(d.final_block, x))


_SHARED: weakref.WeakKeyDictionary[nn.Module, FastEstimator] = weakref.WeakKeyDictionary()


def fast_estimator(decoder: ConditionalDecoder) -> FastEstimator:
    """One :class:`FastEstimator` per estimator module (its fused q/k/v weights are kept)."""
    fast = _SHARED.get(decoder)
    if fast is None:
        fast = _SHARED[decoder] = FastEstimator(decoder)
    return fast


class _CFMView:
    """What ``ConditionalCFM.solve_euler`` reads of its owner, with another estimator."""

    def __init__(self, cfm: ConditionalCFM, estimator: nn.Module) -> None:
        self.inference_cfg_rate = cfm.inference_cfg_rate
        self.estimator = estimator


def solve_full_mask(cfm: ConditionalCFM, estimator: nn.Module, mu: torch.Tensor,
                    mask: torch.Tensor, n_timesteps: int, spks: torch.Tensor,
                    cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``cfm(mu, mask, n_timesteps, 1.0, spks, cond, noise)`` with ``estimator`` in its place
    (the same Euler loop and guidance; temperature 1)."""
    z = noise.to(device=mu.device, dtype=mu.dtype)
    t_span = cosine_t_span(n_timesteps, mu.dtype, mu.device, cfm.t_scheduler)
    return ConditionalCFM.solve_euler(_CFMView(cfm, estimator), z, t_span, mu, mask, spks, cond)  # type: ignore[arg-type]
