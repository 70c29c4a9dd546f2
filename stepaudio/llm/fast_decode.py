"""The serving path for Step1 decode on one GPU: static KV cache, slots, CUDA graphs.

Why this exists: one decode step of TTS-3B must read all 7 GB of weights, which on an H100/H200
takes 1.6-2.4 ms; the model's normal forward (a growing ``DynamicCache``, a freshly built sqrt-ALiBi
bias, ~40 small kernels per layer launched from Python) takes tens of milliseconds. Everything that
is not a weight read must therefore disappear:

* a static cache ``[layers, slots + 1, groups, max_len, head_dim]`` allocated once, so shapes never
  change and a step can be captured in a CUDA graph and replayed (one launch instead of ~1300);
* q/k/v and gate/up are each one matrix product: the model's own parameters are re-pointed, in
  place, at slices of one packed tensor per layer (one copy of the weights, not two);
* residual adds ride inside the output projections (in-place ``addmm_``); RMSNorm and
  SiLU*up are one Triton kernel each; attention is one Triton kernel that writes the new
  key/value into the cache, computes ``-slope * sqrt(i - j)`` from the row's position on the
  fly and reads only the row's own keys (split over the key axis when the batch is too small
  to fill the GPU, then merged by a second small kernel);
* every row carries its own position, so independent requests of any lengths share a batch:
  a request holds a *slot*, joins by prefill and leaves by release, while the graph of the smallest
  batch bucket that fits runs the listed slots; padding rows point at a scratch slot;
* prompts that start alike are not computed twice: a few extra *prefix slots* keep the keys and
  values of recent prompts, and a new prompt copies those of its longest common prefix into its
  slot (one device copy) and prefills only the rest. A TTS-3B prompt is ~900 tokens of speaker
  prompt and ~20 of clause text, so each clause after a voice's first costs a 20-token prefill
  instead of a ~900-token one; with sqrt-ALiBi a key does not depend on what follows it, so the
  copied keys are the ones the prefill would write.

On CPU (tests) or without Triton the same static-cache code runs eagerly with plain torch ops
(attention through SDPA with a masked bias, over the whole cache row in a graph and only up to the
longest listed row when eager, where shapes need not be static), so the path the server uses
on a GPU is the path the CPU tests check. Prefill runs the model's own forward, with a cache
adapter that writes into the slot, so prompt processing is exactly the model's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from stepaudio.llm.step1 import Step1Config, Step1RMSNorm

try:  # Triton ships with CUDA builds of torch; the CPU path never needs it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    HAS_TRITON = False

#: Batch sizes that get their own CUDA graph; a step with n rows runs the smallest bucket >= n.
DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


class SlotError(RuntimeError):
    """A slot was misused: none free, not allocated, listed twice, or out of room."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_floor(n: int) -> int:
    return 1 << (max(1, n).bit_length() - 1)


# --------------------------------------------------------------------------------------------
# Weight packing
# --------------------------------------------------------------------------------------------


def _pack_linears(owner: nn.Module, attr: str, linears: Sequence[nn.Linear]) -> torch.Tensor:
    """One ``[sum(out), in]`` tensor whose row slices *are* the given linears' weights.

    The packed tensor is kept on ``owner`` (not as a parameter or buffer, so state dicts are
    unchanged) and reused when every weight still points into it; a model moved or reloaded
    after packing gets packed again. The old per-linear tensors are freed as soon as their
    parameters are re-pointed, so the peak extra memory is one layer's worth.
    """
    packed: torch.Tensor | None = getattr(owner, attr, None)
    if packed is not None and _still_packed(packed, linears):
        return packed
    with torch.no_grad():
        packed = torch.cat([lin.weight.detach() for lin in linears], dim=0)
        offset = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight.data = packed[offset : offset + rows]
            offset += rows
    setattr(owner, attr, packed)
    return packed


def _still_packed(packed: torch.Tensor, linears: Sequence[nn.Linear]) -> bool:
    offset = 0
    for lin in linears:
        w = lin.weight
        rows = w.shape[0]
        if (
            w.device != packed.device
            or w.dtype != packed.dtype
            or offset + rows > packed.shape[0]
            or w.data_ptr() != packed[offset].data_ptr()
            or not w.is_contiguous()
        ):
            return False
        offset += rows
    return offset == packed.shape[0]


def pack_step1_weights(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pack every layer's q/k/v and gate/up weights in place; returns ``[(qkv, gate_up)]``.

    The model's forward is unchanged (its linears read row slices of the packed tensors). Saving
    such a model with safetensors would see shared storage: nothing in the server saves models.
    """
    base = _base_model(model)
    packs = []
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv = _pack_linears(attn, "_fast_qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = _pack_linears(mlp, "_fast_gate_up", [mlp.gate_proj, mlp.up_proj])
        packs.append((qkv, gate_up))
    return packs


def _base_model(model: nn.Module) -> Any:
    """The ``Step1Model`` inside a ``Step1ForCausalLM`` (or the model itself). Typed Any: the
    decoder reads its layers by the attribute names of Step1's modules."""
    return model.model if hasattr(model, "lm_head") else model


# --------------------------------------------------------------------------------------------
# Static cache and the prefill adapter
# --------------------------------------------------------------------------------------------


@dataclass
class StaticKVCache:
    """Keys and values of every slot, ``[layers, slots + 1, groups, max_len, head_dim]``.

    The extra last slot is scratch: padding rows of a bucket write there, so a half-full bucket
    never touches a live request.
    """

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls, config: Any, slots: int, max_len: int, dtype: torch.dtype, device: torch.device
    ) -> StaticKVCache:
        """``slots`` usable slots (request and prefix slots) plus the scratch slot."""
        head_dim = config.hidden_size // config.num_attention_heads
        groups, layers = config.num_attention_groups, config.num_hidden_layers
        shape = (layers, slots + 1, groups, max_len, head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def scratch_slot(self) -> int:
        return self.k.shape[1] - 1

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class _SlotCacheView:
    """The two methods of transformers' Cache that ``Step1Model.forward`` calls, over one slot.

    Prefill thus runs the model's own attention (bias, chunking and all) while its keys and
    values land in the static cache, already where the decode kernels read them.
    """

    def __init__(self, cache: StaticKVCache, slot: int, past: int) -> None:
        self.cache = cache
        self.slot = slot
        self.past = past

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.past + key.shape[2]
        kc = self.cache.k[layer_idx, self.slot]
        vc = self.cache.v[layer_idx, self.slot]
        kc[:, self.past : end].copy_(key[0])
        vc[:, self.past : end].copy_(value[0])
        return kc[None, :, :end], vc[None, :, :end]


# --------------------------------------------------------------------------------------------
# Triton kernels (GPU; the tests also run them through Triton's CPU interpreter)
# --------------------------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_out, n_cols, eps,
                        BLOCK: tl.constexpr):
        # Same rounding as Step1RMSNorm: normalise in fp32, cast, then multiply by the weight.
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / n_cols + eps)
        y = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (y * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_out, n_inter, BLOCK: tl.constexpr):
        # gu holds [gate | up] side by side (the packed gate_up product); same rounding as
        # F.silu(gate) * up in the model's dtype.
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_inter
        g = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * stride_gu + n_inter + cols, mask=mask, other=0.0).to(tl.float32)
        s = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (s * u).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attn_kernel(qkv_ptr, kc_ptr, vc_ptr, slots_ptr, pos_ptr, slopes_ptr,
                            out_ptr, ml_ptr, part_ptr,
                            stride_qkv, stride_cs, stride_cg, stride_out, scale,
                            H: tl.constexpr, G: tl.constexpr, REP: tl.constexpr,
                            D: tl.constexpr, HB: tl.constexpr, BLOCK_N: tl.constexpr,
                            SPLITS: tl.constexpr, PRECISION: tl.constexpr):
        # One program per (row, KV group, key split); the group's REP query heads share every
        # key/value read (a dot of [HB, D] x [D, BLOCK_N]), so the cache is read once per group.
        b = tl.program_id(0)
        g = tl.program_id(1)
        s = tl.program_id(2)
        slot = tl.load(slots_ptr + b).to(tl.int64)
        pos = tl.load(pos_ptr + b).to(tl.int32)
        r = tl.arange(0, HB)
        d = tl.arange(0, D)
        rmask = r < REP
        head = g * REP + r
        row = qkv_ptr + b.to(tl.int64) * stride_qkv
        q = tl.load(row + head[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
        k_new = tl.load(row + (H + g) * D + d)
        v_new = tl.load(row + (H + G + g) * D + d)
        kbase = kc_ptr + slot * stride_cs + g * stride_cg
        vbase = vc_ptr + slot * stride_cs + g * stride_cg
        first = s == 0
        # Split 0 owns the new token: it stores it (no program of this launch reads position
        # pos from the cache, so there is no race) and starts from its distance-0 score.
        tl.store(kbase + pos * D + d, k_new, mask=(d < D) & first)
        tl.store(vbase + pos * D + d, v_new, mask=(d < D) & first)
        slopes = tl.load(slopes_ptr + head, mask=rmask, other=0.0)
        s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * scale
        m_i = tl.where(first, s_new, float("-inf"))
        l_i = tl.where(first, 1.0, 0.0) + tl.zeros([HB], tl.float32)
        acc = tl.where(first, 1.0, 0.0) * v_new.to(tl.float32)[None, :] + tl.zeros([HB, D],
                                                                                   tl.float32)
        n_blocks = tl.cdiv(pos, BLOCK_N)
        per_split = tl.cdiv(n_blocks, SPLITS) * BLOCK_N
        lo = s * per_split
        hi = tl.minimum(lo + per_split, pos)
        offs = tl.arange(0, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            j = start + offs
            valid = j < hi
            # Both loads are issued before any use, so their memory latencies overlap.
            k = tl.load(kbase + j[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(vbase + j[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            dist = tl.maximum(pos - j, 0).to(tl.float32)
            sc = sc - slopes[:, None] * tl.sqrt_rn(dist)[None, :]
            sc = tl.where(valid[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        if SPLITS == 1:
            out = acc / l_i[:, None]
            dst = out_ptr + b.to(tl.int64) * stride_out + head[:, None] * D + d[None, :]
            tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        else:
            part = (b * G + g) * SPLITS + s
            tl.store(ml_ptr + (part * 2) * HB + r, m_i)
            tl.store(ml_ptr + (part * 2 + 1) * HB + r, l_i)
            tl.store(part_ptr + part * HB * D + r[:, None] * D + d[None, :], acc)

    @triton.jit
    def _combine_kernel(ml_ptr, part_ptr, out_ptr, stride_out,
                        G: tl.constexpr, REP: tl.constexpr, D: tl.constexpr, HB: tl.constexpr,
                        SPLITS: tl.constexpr):
        # Merge the key splits' running softmax states; split 0 always has the new token, so
        # the maximum is finite and empty splits (m = -inf) weigh exactly zero.
        b = tl.program_id(0)
        g = tl.program_id(1)
        r = tl.arange(0, HB)
        d = tl.arange(0, D)
        base = (b * G + g) * SPLITS
        m_max = tl.full([HB], float("-inf"), tl.float32)
        for s in tl.static_range(SPLITS):
            m_max = tl.maximum(m_max, tl.load(ml_ptr + ((base + s) * 2) * HB + r))
        total = tl.zeros([HB], tl.float32)
        acc = tl.zeros([HB, D], tl.float32)
        for s in tl.static_range(SPLITS):
            w = tl.exp(tl.load(ml_ptr + ((base + s) * 2) * HB + r) - m_max)
            total += w * tl.load(ml_ptr + ((base + s) * 2 + 1) * HB + r)
            part = tl.load(part_ptr + (base + s) * HB * D + r[:, None] * D + d[None, :])
            acc += w[:, None] * part
        out = acc / total[:, None]
        head = g * REP + r
        dst = out_ptr + b.to(tl.int64) * stride_out + head[:, None] * D + d[None, :]
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=(r < REP)[:, None])


def triton_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a ``[rows, hidden]`` tensor in one launch (the model's needs about six)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    block = _next_pow2(n)
    _rmsnorm_kernel[(rows,)](x, weight, out, x.stride(0), out.stride(0), n, eps, BLOCK=block,
                             num_warps=min(16, max(1, block // 512)))
    return out


def triton_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a packed ``[rows, 2 * inter]`` product in one launch."""
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty((rows, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _next_pow2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4
    )
    return out


# --------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------


@dataclass
class _Bucket:
    """Static inputs/outputs (and the graph) of one batch size."""

    size: int
    ids: torch.Tensor
    slots: torch.Tensor
    logits: torch.Tensor | None = None
    graph: Any | None = None
    key: tuple[int, ...] | None = None


class Step1FastDecoder:
    """Continuous-batching decode of a ``Step1ForCausalLM`` on one device.

    Use from one thread (the engine's worker). Typical use::

        dec = Step1FastDecoder(model, max_batch=32, max_len=4096)
        dec.capture()                      # optional: capture every bucket's graph now
        slot = dec.allocate()
        logits = dec.prefill(slot, prompt_ids)          # [vocab], next-token logits
        logits = dec.decode([slot, other], next_ids)    # [2, vocab], one step for each slot
        dec.truncate(slot, n)              # roll back (cancelled speculative response)
        dec.release(slot)

    ``decode`` returns a view of a static buffer, valid until the next ``decode`` call.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_batch: int = 32,
        max_len: int = 4096,
        buckets: Sequence[int] | None = None,
        use_cuda_graphs: bool | None = None,
        kernels: str = "auto",
        block_n: int = 64,
        max_splits: int = 16,
        prefix_slots: int = 0,
        min_prefix: int = 32,
    ) -> None:
        """``prefix_slots``: extra cache slots that keep recent prompts for reuse (0: none);
        a common prefix shorter than ``min_prefix`` tokens is prefilled rather than copied."""
        self.model = model
        self.base = _base_model(model)
        self.config = cfg = cast("Step1Config", model.config)
        params = list(model.parameters())
        self.device = params[0].device
        self.dtype = params[0].dtype
        if any(p.device != self.device for p in params):
            raise ValueError("Step1FastDecoder needs the whole model on one device")
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.num_attention_groups
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.rep = self.num_heads // self.num_groups
        self.scale = self.head_dim**-0.5
        self.max_batch = max_batch
        self.block_n = block_n
        self.max_splits = max_splits
        self.kernels = self._choose_kernels(kernels)
        is_cuda = self.device.type == "cuda"
        self.use_cuda_graphs = is_cuda if use_cuda_graphs is None else use_cuda_graphs
        if self.use_cuda_graphs and not is_cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device")

        self.packs = pack_step1_weights(model)
        if prefix_slots < 0:
            raise ValueError("prefix_slots must be >= 0")
        self.cache = StaticKVCache.allocate(cfg, max_batch + prefix_slots, max_len, self.dtype,
                                            self.device)
        #: Prefix slot -> the prompt ids whose keys/values it holds, least recently used first.
        self._prefixes: OrderedDict[int, list[int]] = OrderedDict(
            (max_batch + i, []) for i in range(prefix_slots))
        self.min_prefix = max(1, int(min_prefix))
        self.prefix_hits = 0  # prompt tokens copied instead of computed
        self.prefix_misses = 0  # prompt tokens computed
        self.scratch = self.cache.scratch_slot
        lm_head = getattr(model, "lm_head", None)
        if lm_head is None:
            raise ValueError("Step1FastDecoder needs a Step1ForCausalLM (with lm_head)")
        self.lm_head_weight: torch.Tensor = lm_head.weight
        self.slopes = torch.tensor(self.base.slopes, dtype=torch.float32, device=self.device)
        # -sqrt(d) for every distance d, in fp32: the bias of a row is slopes x one gather.
        self.neg_sqrt = -torch.arange(max_len, device=self.device, dtype=torch.float32).sqrt()
        self.key_index = torch.arange(max_len, device=self.device)
        self.num_sms = (
            torch.cuda.get_device_properties(self.device).multi_processor_count if is_cuda else 8
        )

        # Host mirror of every slot's length (authoritative for checks) and the device copy the
        # graphs read and advance, so a step needs no host-to-device transfer of positions.
        self._lengths = [0] * (self.scratch + 1)
        self._active = [False] * max_batch
        self.lengths_dev = torch.zeros(self.scratch + 1, dtype=torch.int64, device=self.device)

        sizes = sorted({b for b in (buckets or DEFAULT_BUCKETS) if b < max_batch} | {max_batch})
        self.buckets: dict[int, _Bucket] = {}
        for size in sizes:
            self.buckets[size] = _Bucket(
                size=size,
                ids=torch.zeros(size, dtype=torch.int64, device=self.device),
                slots=torch.full((size,), self.scratch, dtype=torch.int64, device=self.device),
            )
        self._pool: Any | None = None
        #: Keys the torch attention reads in an eager step (None: the whole cache row).
        self._span: int | None = None

    # ---- configuration -----------------------------------------------------------------------

    def _choose_kernels(self, kernels: str) -> str:
        """Triton where it can run (CUDA, a head size its dot supports), else plain torch."""
        fits = (
            HAS_TRITON
            and self.head_dim >= 16
            and self.head_dim == _next_pow2(self.head_dim)
            and self.dtype in (torch.float16, torch.bfloat16, torch.float32)
        )
        if kernels == "auto":
            return "triton" if fits and self.device.type == "cuda" else "torch"
        if kernels == "triton" and not fits:
            raise ValueError(
                f"triton kernels need Triton and a power-of-two head_dim >= 16 "
                f"(head_dim={self.head_dim}, triton={'yes' if HAS_TRITON else 'no'})"
            )
        if kernels not in ("triton", "torch"):
            raise ValueError(f"kernels must be auto, triton or torch, not {kernels!r}")
        return kernels

    # ---- slots ---------------------------------------------------------------------------------

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_batch) if not self._active[s]]

    @property
    def active_slots(self) -> list[int]:
        return [s for s in range(self.max_batch) if self._active[s]]

    def allocate(self) -> int:
        """The lowest free slot, now empty and owned by the caller."""
        for slot in range(self.max_batch):
            if not self._active[slot]:
                self._active[slot] = True
                self._set_length(slot, 0)
                return slot
        raise SlotError(f"all {self.max_batch} slots are in use")

    def release(self, slot: int) -> None:
        """Free a slot; its stale cache rows are never read again (reads stop at the length)."""
        self._check_slot(slot)
        self._active[slot] = False
        self._set_length(slot, 0)

    def length(self, slot: int) -> int:
        self._check_slot(slot)
        return self._lengths[slot]

    def truncate(self, slot: int, length: int) -> None:
        """Forget everything after the first ``length`` tokens (e.g. a cancelled response)."""
        self._check_slot(slot)
        if not 0 <= length <= self._lengths[slot]:
            raise SlotError(f"cannot truncate slot {slot} of length {self._lengths[slot]} "
                            f"to {length}")
        self._set_length(slot, length)

    def _set_length(self, slot: int, length: int) -> None:
        self._lengths[slot] = length
        self.lengths_dev[slot].fill_(length)  # a fill kernel: no host-to-device copy

    def _check_slot(self, slot: int) -> None:
        if not (0 <= slot < self.max_batch and self._active[slot]):
            raise SlotError(f"slot {slot} is not allocated")

    # ---- prefill --------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, slot: int, input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Append ``input_ids`` to the slot through the model's own forward; next-token logits.

        Not graph-captured: prompts vary in length, and a prefill is compute-bound anyway.
        """
        self._check_slot(slot)
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(self.device)
        n = ids.shape[1]
        if n == 0:
            raise ValueError("prefill needs at least one token")
        past = self._lengths[slot]
        if past + n > self.max_len:
            raise SlotError(f"slot {slot}: {past} + {n} tokens exceed max_len {self.max_len}")
        view = _SlotCacheView(self.cache, slot, past)
        out = self.base(input_ids=ids, cache=view, use_cache=True, return_dict=True)
        hidden = out.last_hidden_state[:, -1]
        self._set_length(slot, past + n)
        return F.linear(hidden, self.lm_head_weight)[0]

    # ---- prefix reuse ---------------------------------------------------------------------------

    @staticmethod
    def _common(a: Sequence[int], b: Sequence[int]) -> int:
        n = min(len(a), len(b))
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        return i

    def _best_prefix(self, ids: Sequence[int]) -> tuple[int | None, int]:
        best, length = None, 0
        for slot, kept in self._prefixes.items():
            n = self._common(kept, ids)
            if n > length:
                best, length = slot, n
        return best, length

    @torch.no_grad()
    def reuse_prefix(self, slot: int, ids: Sequence[int]) -> int:
        """Fill an empty slot with the kept keys/values of the longest prefix ``ids`` shares
        with a recent prompt (at most all but its last token: the prefill of at least one token
        gives the next-token logits). Returns how many tokens are now in the slot."""
        self._check_slot(slot)
        if self._lengths[slot] != 0 or not self._prefixes:
            return 0
        source, n = self._best_prefix(ids)
        n = min(n, len(ids) - 1)
        if source is None or n < self.min_prefix:
            return 0
        self._copy(source, slot, n)
        self._prefixes.move_to_end(source)
        self._set_length(slot, n)
        self.prefix_hits += n
        return n

    @torch.no_grad()
    def keep_prefix(self, slot: int, ids: Sequence[int]) -> None:
        """Keep the prompt now in ``slot`` (its first ``len(ids)`` tokens) for later prompts:
        it replaces the kept prompt it extends or shares most with, else the least recently used."""
        if not self._prefixes or len(ids) < self.min_prefix:
            return
        target, n = self._best_prefix(ids)
        if target is not None and n == len(ids):
            self._prefixes.move_to_end(target)  # already kept, whole
            return
        if target is None or n < self.min_prefix:
            target = next(iter(self._prefixes))  # least recently used
        self._copy(slot, target, len(ids))
        self._prefixes[target] = list(ids)
        self._prefixes.move_to_end(target)

    def count_prefill(self, tokens: int) -> None:
        self.prefix_misses += tokens

    def _copy(self, source: int, target: int, n: int) -> None:
        for cache in (self.cache.k, self.cache.v):
            cache[:, target, :, :n].copy_(cache[:, source, :, :n])

    # ---- decode ---------------------------------------------------------------------------------

    def bucket_for(self, rows: int) -> int:
        for size in self.buckets:
            if size >= rows:
                return size
        raise SlotError(f"{rows} rows exceed max_batch {self.max_batch}")

    @torch.no_grad()
    def decode(
        self, slots: Sequence[int], token_ids: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """Append one token to each listed slot and return ``[len(slots), vocab]`` logits.

        Slots not listed are untouched (they simply sit out this step). ``token_ids`` may be a
        device tensor (e.g. sampled on the GPU), which keeps the step free of host syncs.
        """
        slots = [int(s) for s in slots]
        rows = len(slots)
        if rows == 0:
            raise ValueError("decode needs at least one slot")
        if len(set(slots)) != rows:
            raise SlotError(f"a slot is listed twice: {slots}")
        for slot in slots:
            self._check_slot(slot)
            if self._lengths[slot] == 0:
                raise SlotError(f"slot {slot} is empty: prefill it first")
            if self._lengths[slot] >= self.max_len:
                raise SlotError(f"slot {slot} is full (max_len {self.max_len})")
        bucket = self.buckets[self.bucket_for(rows)]
        if self.use_cuda_graphs and bucket.graph is None:
            self._capture(bucket)  # before the inputs are set: capture resets them
        key = tuple(slots)
        if bucket.key != key:
            host = torch.full((bucket.size,), self.scratch, dtype=torch.int64)
            host[:rows] = torch.tensor(slots, dtype=torch.int64)
            bucket.slots.copy_(self._staged(host), non_blocking=True)
            bucket.key = key
        if isinstance(token_ids, torch.Tensor):
            ids = token_ids.reshape(-1)
            if ids.device.type == "cpu" and self.device.type == "cuda":
                ids = self._staged(ids.to(torch.int64))
        else:
            ids = self._staged(torch.tensor(list(token_ids), dtype=torch.int64))
        if ids.shape[0] != rows:
            raise ValueError(f"{rows} slots but {ids.shape[0]} token ids")
        bucket.ids[:rows].copy_(ids, non_blocking=True)
        if self.use_cuda_graphs:
            assert bucket.graph is not None and bucket.logits is not None  # captured above
            bucket.graph.replay()
            logits = bucket.logits
        else:
            # Eager: no static shapes needed, so run the listed rows only and let attention read
            # only as far as the longest of them (on CPU a full cache row costs more than the
            # whole rest of a tiny model's step).
            self._span = max(self._lengths[s] for s in slots) + 1
            try:
                logits = self._forward(bucket.ids[:rows], bucket.slots[:rows])
            finally:
                self._span = None
        for slot in slots:
            self._lengths[slot] += 1
        return logits[:rows]

    def _staged(self, host: torch.Tensor) -> torch.Tensor:
        """Pinned copy for an asynchronous upload (torch's pinned pool tracks when it is free)."""
        return host.pin_memory() if self.device.type == "cuda" else host

    @torch.no_grad()
    def capture(self, sizes: Sequence[int] | None = None) -> None:
        """Capture the CUDA graphs of the given buckets (all by default), largest first.

        Largest first, in one memory pool, so the smaller graphs reuse the big one's activations.
        """
        if not self.use_cuda_graphs:
            return
        for size in sorted(sizes or self.buckets, reverse=True):
            bucket = self.buckets[size]
            if bucket.graph is None:
                self._capture(bucket)

    def _capture(self, bucket: _Bucket) -> None:
        # Warm-up and capture run on padding rows only (scratch slot), so they cannot disturb a
        # live request whatever the bucket's current assignment.
        bucket.slots.fill_(self.scratch)
        bucket.key = None
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket.ids, bucket.slots)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bucket.logits = self._forward(bucket.ids, bucket.slots)
        self._pool = graph.pool()
        bucket.graph = graph

    def _forward(self, ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """One decode step for a bucket: every op has a static shape (capturable as a graph)."""
        pos = self.lengths_dev.index_select(0, slots)
        x = F.embedding(ids, self.base.embed_tokens.weight)
        for index, layer in enumerate(self.base.layers):
            qkv_w, gate_up_w = self.packs[index]
            h = self._norm(x, layer.input_layernorm)
            qkv = F.linear(h, qkv_w)
            attn = self._attend(index, qkv, slots, pos)
            # In place: an out-of-place addmm first copies x (64 device copies per step).
            x.addmm_(attn, layer.self_attn.o_proj.weight.t())
            h = self._norm(x, layer.post_attention_layernorm)
            act = self._silu_mul(F.linear(h, gate_up_w))
            x.addmm_(act, layer.mlp.down_proj.weight.t())
        logits = F.linear(self._norm(x, self.base.norm), self.lm_head_weight)
        # Advance the listed rows; padding rows all wrote the scratch slot, whose length is
        # then reset so it never walks off the end of its cache row.
        self.lengths_dev.index_copy_(0, slots, pos + 1)
        self.lengths_dev[self.scratch :].zero_()
        return logits

    def _norm(self, x: torch.Tensor, norm: Step1RMSNorm) -> torch.Tensor:
        if self.kernels == "triton":
            return triton_rmsnorm(x, norm.weight, norm.eps)
        return norm(x)

    def _silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":
            return triton_silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _attend(
        self, layer: int, qkv: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        if self.kernels == "triton":
            return self._attend_triton(layer, qkv, slots, pos)
        return self._attend_torch(layer, qkv, slots, pos)

    def splits_for(self, rows: int) -> int:
        """Key splits per (row, group): about one program per multiprocessor.

        At batch 1 the 4 KV groups alone would leave almost the whole GPU idle while each
        program walks its keys; at batch 32 (128 programs) splitting further was measured
        slower on an H100 (the extra combine launch costs more than the shorter walk saves).
        """
        programs = rows * self.num_groups
        return max(1, min(self.max_splits, _pow2_floor(self.num_sms // max(1, programs))))

    def _attend_triton(
        self, layer: int, qkv: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        rows = qkv.shape[0]
        heads, groups, dim = self.num_heads, self.num_groups, self.head_dim
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        out = torch.empty((rows, heads * dim), dtype=qkv.dtype, device=qkv.device)
        splits = self.splits_for(rows)
        hb = max(16, _next_pow2(self.rep))
        if splits > 1:
            ml = torch.empty((rows * groups * splits * 2 * hb,), dtype=torch.float32,
                             device=qkv.device)
            part = torch.empty((rows * groups * splits * hb * dim,), dtype=torch.float32,
                               device=qkv.device)
        else:
            ml = part = out  # unused by the kernel when SPLITS == 1
        precision = "ieee" if qkv.dtype == torch.float32 else "tf32"
        _decode_attn_kernel[(rows, groups, splits)](
            qkv, kc, vc, slots, pos, self.slopes, out, ml, part,
            qkv.stride(0), kc.stride(0), kc.stride(1), out.stride(0), self.scale,
            H=heads, G=groups, REP=self.rep, D=dim, HB=hb, BLOCK_N=self.block_n,
            SPLITS=splits, PRECISION=precision, num_warps=4,
        )
        if splits > 1:
            _combine_kernel[(rows, groups)](
                ml, part, out, out.stride(0),
                G=groups, REP=self.rep, D=dim, HB=hb, SPLITS=splits, num_warps=4,
            )
        return out

    def _attend_torch(
        self, layer: int, qkv: torch.Tensor, slots: torch.Tensor, pos: torch.Tensor
    ) -> torch.Tensor:
        """Reference-shaped attention over each row's cache row (up to ``_span``), future keys
        masked."""
        rows = qkv.shape[0]
        heads, groups, dim = self.num_heads, self.num_groups, self.head_dim
        span = self._span or self.max_len
        q, k, v = qkv.split([heads * dim, groups * dim, groups * dim], dim=-1)
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[slots, :, pos] = k.reshape(rows, groups, dim)
        vc[slots, :, pos] = v.reshape(rows, groups, dim)
        keys = kc[:, :, :span].index_select(0, slots)
        values = vc[:, :, :span].index_select(0, slots)
        distance = pos[:, None] - self.key_index[None, :span]
        # Same float32 arithmetic as sqrt_alibi_bias: slope * -sqrt(d), -inf in the future.
        bias = self.slopes[None, :, None] * self.neg_sqrt[distance.clamp(min=0)][:, None, :]
        bias = bias.masked_fill((distance < 0)[:, None, :], float("-inf")).to(qkv.dtype)
        out = F.scaled_dot_product_attention(
            q.reshape(rows, groups, self.rep, dim),
            keys,
            values,
            attn_mask=bias.reshape(rows, groups, self.rep, span),
            scale=self.scale,
        )
        return out.reshape(rows, heads * dim)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of parameters, tied ones once: the issue's bandwidth floor divides these."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        ptr = p.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += p.numel() * p.element_size()
    return total


__all__ = [
    "DEFAULT_BUCKETS",
    "HAS_TRITON",
    "SlotError",
    "StaticKVCache",
    "Step1FastDecoder",
    "parameter_bytes",
    "pack_step1_weights",
]
