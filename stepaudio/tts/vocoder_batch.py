"""Many streams' vocoder requests in one model call: padding and masks that padding cannot leak
through, so a stream's result does not depend on what it was batched with.

Why this is not simply ``torch.stack``: the flow's modules see their whole input. GroupNorm takes
its statistics over every frame, attention reads every key, and a convolution at the end of a
window reads past it (zero padding). A window padded to a batch's length would therefore come out
different from the same window alone. Here every such op is masked so a padded row computes what
it computes alone:

- :func:`masked_group_norm`: statistics over the row's own frames only;
- attention (the estimator's and the conformer's): padded keys are never attended;
- convolutions read zeros past a row's end (inputs are multiplied by the mask first), which is
  what the unpadded row's zero padding reads; the U-Net's down/up-sampling keeps each row's own
  length at every level (``mask[..., ::2]``), exactly as one row alone.

When every row of a batch has the same length there is no padding and the unmasked fast estimator
runs, so a batch of equal windows computes what each window computes alone. HiFT (F0 and decode)
is batched only over windows of equal length: its convolutions and STFTs reach across the end of
a window (reflection padding), which no mask reproduces cheaply, and streaming windows come in a
few fixed lengths anyway.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from stepaudio.tts.estimator import Block1D, ResnetBlock1D
from stepaudio.tts.estimator_fast import FastEstimator, fast_estimator, group_norm_mish
from stepaudio.tts.flow import cosine_t_span
from stepaudio.tts.vocoder_work import Decode, Encode, PredictF0, Regulate, Request, Solve


def masked_group_norm(x: torch.Tensor, mask: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """``norm(x)`` for (B, C, T) rows whose valid frames are ``mask`` (B, 1, T): each row's
    statistics come from its valid frames only (biased variance, in float32 as GroupNorm's)."""
    b, c, t = x.shape
    g = norm.num_groups
    xg = x.float().view(b, g, c // g, t)
    m = mask.float().view(b, 1, 1, t)
    count = m.sum(dim=-1, keepdim=True).clamp(min=1.0) * (c // g)
    mean = (xg * m).sum(dim=(2, 3), keepdim=True) / count
    centred = xg - mean
    var = (centred * centred * m).sum(dim=(2, 3), keepdim=True) / count
    y = (centred * torch.rsqrt(var + norm.eps)).view(b, c, t)
    if norm.affine:
        y = y * norm.weight.float().view(1, c, 1) + norm.bias.float().view(1, c, 1)
    return y.to(x.dtype)


def _masked_block(block: Block1D, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    conv, norm, _ = block.block
    return group_norm_mish(conv(x * mask), norm, mask)


class MaskedEstimator(FastEstimator):
    """The flow's estimator over rows padded to one length (``mask`` marks each row's frames).

    The fewer-kernel forward of :class:`FastEstimator` with the three things padding would
    otherwise change made per row: GroupNorm statistics, attended keys, and what a convolution
    reads past a row's end.
    """

    def __init__(self, fast: FastEstimator) -> None:
        super().__init__(fast.dec, fast.fused_norm)
        self._qkv = fast._qkv  # share the fused q/k/v weights

    def _masked_resnet(self, r: ResnetBlock1D, x: torch.Tensor, t: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
        h = _masked_block(r.block1, x, mask) + r.mlp(t).unsqueeze(-1)
        return _masked_block(r.block2, h, mask) + r.res_conv(x * mask)

    def _stage(self, resnet: ResnetBlock1D, blocks: nn.ModuleList, x: torch.Tensor,
               t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._keys = mask.bool().view(mask.shape[0], 1, 1, -1)
        try:
            return self._transformers(blocks, self._masked_resnet(resnet, x, t, mask))
        finally:
            self._keys = None

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor,
                spks: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        d = self.dec
        x, t = self._inputs(x, mu, t, spks, cond)
        mask = mask.to(x.dtype)
        hiddens, masks = [], [mask]
        for resnet, transformers, downsample in d.down_blocks:
            m = masks[-1]
            x = self._stage(resnet, transformers, x, t, m)
            hiddens.append(x)
            x = downsample(x * m)
            masks.append(m[:, :, ::2])
        masks = masks[:-1]
        m = masks[-1]
        for resnet, transformers in d.mid_blocks:
            x = self._stage(resnet, transformers, x, t, m)
        for resnet, transformers, upsample in d.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
            x = upsample(self._stage(resnet, transformers, x, t, m) * m)
        x = _masked_block(d.final_block, x, m)
        return d.final_proj(x * m) * mask


def euler_solve(estimator: Callable[..., torch.Tensor], noise: torch.Tensor, mu: torch.Tensor,
                mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor, n_timesteps: int,
                cfg_rate: float, scheduler: str = "cosine") -> torch.Tensor:
    """The reference's Euler loop with classifier-free guidance for B rows at once: the same
    times (t carried as t + dt, dt re-derived from the span, in the flow's dtype) and guided rows
    laid out as the reference lays out its two (conditioned rows, then unconditioned ones). The
    time is one value for every row, so it is passed once and broadcast."""
    z = noise.to(mu.dtype)
    t_span = cosine_t_span(n_timesteps, mu.dtype, mu.device, scheduler)
    t, dt = t_span[0].unsqueeze(0), t_span[1] - t_span[0]
    b = z.shape[0]
    if cfg_rate > 0:
        mask2 = torch.cat([mask, mask], dim=0)
        mu2 = torch.cat([mu, torch.zeros_like(mu)], dim=0)
        spks2 = torch.cat([spks, torch.zeros_like(spks)], dim=0)
        cond2 = torch.cat([cond, torch.zeros_like(cond)], dim=0)
    for step in range(1, len(t_span)):
        if cfg_rate > 0:
            v2 = estimator(torch.cat([z, z], dim=0), mask2, mu2, t, spks2, cond2)
            v = (1.0 + cfg_rate) * v2[:b] - cfg_rate * v2[b:]
        else:
            v = estimator(z, mask, mu, t, spks, cond)
        z = z + dt * v
        t = t + dt
        if step < len(t_span) - 1:
            dt = t_span[step + 1] - t
    return z


def _stack_padded(rows: Sequence[torch.Tensor], length: int, batch: int | None = None
                  ) -> torch.Tensor:
    """(C, L_i) rows → (batch, C, length), zero-padded on the right (and with zero rows)."""
    first = rows[0]
    out = first.new_zeros((batch or len(rows), first.shape[0], length))
    for i, r in enumerate(rows):
        out[i, :, : r.shape[-1]] = r
    return out


def lengths_mask(lengths: Sequence[int], total: int, batch: int, device: torch.device,
                 dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, total) with ones on each row's first lengths[i] frames (zero rows after)."""
    lens = torch.zeros(batch, dtype=torch.long)
    lens[: len(lengths)] = torch.tensor(list(lengths), dtype=torch.long)
    steps = torch.arange(total)
    return (steps[None] < lens[:, None]).to(device=device, dtype=dtype)[:, None]


class BatchRunner:
    """Runs a list of same-kind requests of one vocoder folder's models as few calls.

    ``solver``/``decoder`` may be replaced by callables that replay captured CUDA graphs
    (:mod:`stepaudio.tts.cuda_graphs`); the defaults run eagerly. ``length_bucket``: padded
    flow batches are rounded up to a multiple of it, so a GPU sees few distinct shapes.
    """

    def __init__(self, flow: nn.Module, hift: nn.Module, n_timesteps: int = 10,
                 length_bucket: int = 32) -> None:
        self.flow = flow
        self.hift = hift
        self.n_timesteps = n_timesteps
        self.length_bucket = max(1, int(length_bucket))
        cfm = flow.decoder
        self.cfg_rate = float(cfm.inference_cfg_rate)
        self.scheduler = cfm.t_scheduler
        self.fast = fast_estimator(cfm.estimator)
        self.masked = MaskedEstimator(self.fast)
        #: (mu, mask, spks, cond, noise, padded) → mel for a (B, 80, L) batch.
        self.solver: Callable[..., torch.Tensor] = self.eager_solve
        #: (mel, source) → wav for a (B, 80, L) batch of equal lengths.
        self.decoder: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = hift.decode
        #: (ids (B, N), lengths (B,) or None) → (B, N, 80): the flow's token encoder.
        self.encoder: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] = self.eager_encode
        self.calls: dict[str, int] = defaultdict(int)
        self.rows: dict[str, int] = defaultdict(int)

    @property
    def device(self) -> torch.device:
        return self.flow.encoder_proj.weight.device

    def eager_solve(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                    cond: torch.Tensor, noise: torch.Tensor, padded: bool) -> torch.Tensor:
        with torch.inference_mode():
            return euler_solve(self.masked if padded else self.fast, noise, mu, mask, spks, cond,
                               self.n_timesteps, self.cfg_rate, self.scheduler)

    def run(self, requests: Sequence[Request]) -> list[torch.Tensor]:
        """Results in the requests' order. All requests must be of one kind."""
        kind = type(requests[0])
        if any(type(r) is not kind for r in requests):
            raise TypeError("one batch holds requests of one kind")
        fn = {Encode: self.encode, Regulate: self.regulate, Solve: self.solve,
              PredictF0: self.f0, Decode: self.decode}[kind]
        self.calls[kind.__name__] += 1
        self.rows[kind.__name__] += len(requests)
        with torch.inference_mode():
            return fn(requests)  # type: ignore[operator]

    # -- flow ----------------------------------------------------------------------------------
    def bucket(self, n: int) -> int:
        """The padded length of a batch whose longest window is ``n`` frames."""
        q = self.length_bucket
        return -(-n // q) * q

    def eager_encode(self, ids: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
        flow = self.flow
        with torch.inference_mode():
            return flow.encoder_proj(flow.encoder(flow.input_embedding(torch.clamp(ids, min=0)),
                                                  lens))

    def encode(self, reqs: Sequence[Encode]) -> list[torch.Tensor]:
        lens = [int(r.ids.shape[0]) for r in reqs]
        n = max(lens)
        ids = torch.zeros(len(reqs), n, dtype=torch.long, device=self.device)
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = r.ids
        xs_lens = None if min(lens) == n else torch.tensor(lens, device=self.device)
        h = self.encoder(ids, xs_lens)
        return [h[i, : lens[i]] for i in range(len(reqs))]

    def regulate(self, reqs: Sequence[Regulate]) -> list[torch.Tensor]:
        model = self.flow.length_regulator.model
        lens = [int(r.x.shape[-1]) for r in reqs]
        n = max(lens)
        x = _stack_padded([r.x for r in reqs], n)
        if min(lens) == n:
            out = model(x)
        else:
            mask = lengths_mask(lens, n, len(reqs), x.device, x.dtype)
            layers = list(model)
            for conv, norm, act in zip(layers[0:-1:3], layers[1:-1:3], layers[2:-1:3],
                                       strict=True):
                x = act(masked_group_norm(conv(x * mask), mask, norm))
            out = layers[-1](x * mask)
        return [out[i, :, : lens[i]] for i in range(len(reqs))]

    def solve(self, reqs: Sequence[Solve]) -> list[torch.Tensor]:
        lens = [int(r.mu.shape[-1]) for r in reqs]
        padded = min(lens) != max(lens)
        n = self.bucket(max(lens)) if padded else max(lens)
        b = len(reqs)
        dtype = reqs[0].mu.dtype
        mu = _stack_padded([r.mu for r in reqs], n)
        cond = _stack_padded([r.cond for r in reqs], n)
        noise = _stack_padded([r.noise for r in reqs], n)
        spks = torch.stack([r.spks for r in reqs])
        mask = lengths_mask(lens, n, b, mu.device, dtype)
        mel = self.solver(mu, mask, spks, cond, noise, padded)
        return [mel[i, :, : lens[i]] for i in range(b)]

    # -- HiFT ----------------------------------------------------------------------------------
    def _equal_lengths(self, reqs: Sequence[PredictF0 | Decode],
                       call: Callable[[list[int]], list[torch.Tensor]]) -> list[torch.Tensor]:
        """Group by mel length, one call per group; results in the requests' order."""
        groups: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(reqs):
            groups[int(r.mel.shape[-1])].append(i)
        out: list[torch.Tensor | None] = [None] * len(reqs)
        for idx in groups.values():
            for i, res in zip(idx, call(idx), strict=True):
                out[i] = res
        return out  # type: ignore[return-value]

    def f0(self, reqs: Sequence[PredictF0]) -> list[torch.Tensor]:
        def call(idx: list[int]) -> list[torch.Tensor]:
            f0 = self.hift.f0(torch.stack([reqs[i].mel for i in idx]))
            return list(f0.unbind(0))

        return self._equal_lengths(reqs, call)

    def decode(self, reqs: Sequence[Decode]) -> list[torch.Tensor]:
        def call(idx: list[int]) -> list[torch.Tensor]:
            mel = torch.stack([reqs[i].mel for i in idx])
            src = torch.stack([reqs[i].source for i in idx]).unsqueeze(1)
            return list(self.decoder(mel, src).unbind(0))

        return self._equal_lengths(reqs, call)
