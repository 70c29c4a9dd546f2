"""The flow's token encoder: CosyVoice's (WeNet/ESPnet) ConformerEncoder, inference only.

Parameter names and registration order follow the reference module tree so `flow.pt` loads with
``strict=True``. Only what the flow uses is built: a linear input layer, relative (ESPnet or WeNet
style) or absolute positions, full-context attention. Dropout arguments are accepted for yaml
compatibility and ignored: this code never trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stepaudio.errors import ModelError

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "hardtanh": nn.Hardtanh,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
}


def _sinusoid(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """sin on even, cos on odd channels, computed in float32 exactly as the reference tables are."""
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model)
    )
    pe = torch.zeros(positions.numel(), d_model)
    pe[:, 0::2] = torch.sin(positions.unsqueeze(1) * div_term)
    pe[:, 1::2] = torch.cos(positions.unsqueeze(1) * div_term)
    return pe


class EspnetRelPositionalEncoding(nn.Module):
    """x·√d plus a (1, 2T-1, d) table of relative positions T-1 … -(T-1) for the attention.

    The table is rebuilt lazily (not a buffer, as in the reference, so it is not in state_dict).
    """

    def __init__(self, d_model: int, dropout_rate: float = 0.0, max_len: int = 5000) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self._pe = self._table(max_len)  # float32 master; sliced, then cast per call

    def _table(self, size: int) -> torch.Tensor:
        pos = torch.arange(0, size, dtype=torch.float32)
        positive = torch.flip(_sinusoid(pos, self.d_model), [0])
        negative = _sinusoid(-1 * pos, self.d_model)[1:]
        return torch.cat([positive, negative], dim=0).unsqueeze(0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = x.size(1)
        if self._pe.size(1) < size * 2 - 1:
            self._pe = self._table(size)
        center = self._pe.size(1) // 2
        pos = self._pe[:, center - size + 1 : center + size].to(device=x.device, dtype=x.dtype)
        return x * self.xscale, pos


class RelPositionalEncoding(nn.Module):
    """WeNet's older relative encoding: x·√d plus the absolute table of positions 0 … T-1."""

    def __init__(self, d_model: int, dropout_rate: float = 0.0, max_len: int = 5000) -> None:
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.max_len = max_len

    def table(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, x.size(1), dtype=torch.float32)
        return _sinusoid(pos, self.d_model).unsqueeze(0).to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.xscale, self.table(x)


class PositionalEncoding(RelPositionalEncoding):
    """Absolute sinusoidal positions added to the input (``abs_pos``)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.table(x)
        return x * self.xscale + pos, pos


POS_ENCODINGS: dict[str, type[nn.Module]] = {
    "rel_pos_espnet": EspnetRelPositionalEncoding,
    "rel_pos": RelPositionalEncoding,
    "abs_pos": PositionalEncoding,
}


class LinearNoSubsampling(nn.Module):
    """Linear + LayerNorm (+ dropout) input layer; keys `embed.out.0/1`."""

    def __init__(self, idim: int, odim: int, dropout_rate: float, pos_enc: nn.Module) -> None:
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Dropout(0.0))
        self.pos_enc = pos_enc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pos_enc(self.out(x))


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product attention with the reference's -inf / zero-fill padding treatment."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True) -> None:
        super().__init__()
        if n_feat % n_head:
            raise ModelError(f"encoder: output_size {n_feat} is not divisible by {n_head} heads")
        self.d_k = n_feat // n_head
        self.h = n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)

    def _heads(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return lin(x).view(x.size(0), -1, self.h, self.d_k).transpose(1, 2)

    def _attend(self, v: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:  # (no all-ones shortcut: a host read would break graph capture)
            pad = mask.unsqueeze(1).eq(0)[:, :, :, : scores.size(-1)]
            attn = torch.softmax(scores.masked_fill(pad, -float("inf")), dim=-1).masked_fill(pad, 0.0)
        else:
            attn = torch.softmax(scores, dim=-1)
        x = torch.matmul(attn, v).transpose(1, 2).contiguous()
        return self.linear_out(x.view(x.size(0), -1, self.h * self.d_k))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_emb: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(lin, x) for lin in (self.linear_q, self.linear_k, self.linear_v))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_k)
        return self._attend(v, scores, mask)


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL style attention: content term (bias u) + position term (bias v), rel-shifted."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float = 0.0, key_bias: bool = True) -> None:
        super().__init__(n_head, n_feat, dropout_rate, key_bias)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(self.h, self.d_k))

    @staticmethod
    def rel_shift(x: torch.Tensor) -> torch.Tensor:
        """(b, h, T, 2T-1) scores against relative positions → (b, h, T, T) against key index."""
        b, h, t1, t2 = x.shape
        padded = torch.cat([x.new_zeros(b, h, t1, 1), x], dim=-1).view(b, h, t2 + 1, t1)
        return padded[:, :, 1:].view_as(x)[:, :, :, : t2 // 2 + 1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_emb: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(lin, x) for lin in (self.linear_q, self.linear_k, self.linear_v))
        q = q.transpose(1, 2)
        p = self.linear_pos(pos_emb).view(pos_emb.size(0), -1, self.h, self.d_k).transpose(1, 2)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))
        bd = torch.matmul((q + self.pos_bias_v).transpose(1, 2), p.transpose(-2, -1))
        if ac.shape != bd.shape:
            bd = self.rel_shift(bd)
        return self._attend(v, (ac + bd) / math.sqrt(self.d_k), mask)


ATTENTIONS: dict[str, type[MultiHeadedAttention]] = {
    "selfattn": MultiHeadedAttention,
    "rel_selfattn": RelPositionMultiHeadedAttention,
}


class PositionwiseFeedForward(nn.Module):
    def __init__(self, idim: int, hidden_units: int, activation: nn.Module) -> None:
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden_units)
        self.activation = activation
        self.w_2 = nn.Linear(hidden_units, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConvolutionModule(nn.Module):
    """Conformer conv block (pointwise → GLU → depthwise → norm → act → pointwise), full context."""

    def __init__(self, channels: int, kernel_size: int, activation: nn.Module, norm: str,
                 causal: bool, bias: bool = True) -> None:
        super().__init__()
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, 1, bias=bias)
        if not causal and (kernel_size - 1) % 2:
            raise ModelError(f"encoder: cnn_module_kernel {kernel_size} must be odd")
        self.lorder = kernel_size - 1 if causal else 0
        padding = 0 if causal else (kernel_size - 1) // 2
        self.depthwise_conv = nn.Conv1d(channels, channels, kernel_size, padding=padding,
                                        groups=channels, bias=bias)
        if norm not in ("batch_norm", "layer_norm"):
            raise ModelError(f"encoder: cnn_module_norm {norm!r} is not batch_norm or layer_norm")
        self.use_layer_norm = norm == "layer_norm"
        self.norm = nn.LayerNorm(channels) if self.use_layer_norm else nn.BatchNorm1d(channels)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, 1, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor, mask_pad: torch.Tensor | None) -> torch.Tensor:
        x = x.transpose(1, 2)
        if mask_pad is not None:
            x = x.masked_fill(~mask_pad, 0.0)
        if self.lorder:
            x = F.pad(x, (self.lorder, 0))
        x = self.depthwise_conv(F.glu(self.pointwise_conv1(x), dim=1))
        if self.use_layer_norm:
            x = self.activation(self.norm(x.transpose(1, 2))).transpose(1, 2)
        else:
            x = self.activation(self.norm(x))
        x = self.pointwise_conv2(x)
        if mask_pad is not None:
            x = x.masked_fill(~mask_pad, 0.0)
        return x.transpose(1, 2)


class ConformerEncoderLayer(nn.Module):
    def __init__(self, size: int, self_attn: nn.Module, feed_forward: nn.Module,
                 feed_forward_macaron: nn.Module | None, conv_module: nn.Module | None,
                 normalize_before: bool) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.feed_forward = feed_forward
        self.feed_forward_macaron = feed_forward_macaron
        self.conv_module = conv_module
        self.norm_ff = nn.LayerNorm(size, eps=1e-5)
        self.norm_mha = nn.LayerNorm(size, eps=1e-5)
        if feed_forward_macaron is not None:
            self.norm_ff_macaron = nn.LayerNorm(size, eps=1e-5)
        self.ff_scale = 0.5 if feed_forward_macaron is not None else 1.0
        if conv_module is not None:
            self.norm_conv = nn.LayerNorm(size, eps=1e-5)
            self.norm_final = nn.LayerNorm(size, eps=1e-5)
        self.normalize_before = normalize_before

    def _sub(self, x: torch.Tensor, norm: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor],
             scale: float = 1.0) -> torch.Tensor:
        """Residual sub-block; pre- or post-norm as configured (the checkpoint was trained so)."""
        y = fn(norm(x) if self.normalize_before else x)
        x = x + scale * y if scale != 1.0 else x + y
        return x if self.normalize_before else norm(x)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, pos_emb: torch.Tensor,
                mask_pad: torch.Tensor | None) -> torch.Tensor:
        if self.feed_forward_macaron is not None:
            x = self._sub(x, self.norm_ff_macaron, self.feed_forward_macaron, self.ff_scale)
        x = self._sub(x, self.norm_mha, lambda y: self.self_attn(y, mask, pos_emb))
        if self.conv_module is not None:
            x = self._sub(x, self.norm_conv, lambda y: self.conv_module(y, mask_pad))
        x = self._sub(x, self.norm_ff, self.feed_forward, self.ff_scale)
        if self.conv_module is not None:
            x = self.norm_final(x)
        return x


class ConformerEncoder(nn.Module):
    """Full-context Conformer over token embeddings (the reference's `ConformerEncoder.inference`)."""

    def __init__(
        self,
        input_size: int,
        output_size: int = 256,
        attention_heads: int = 4,
        linear_units: int = 2048,
        num_blocks: int = 6,
        dropout_rate: float = 0.1,
        positional_dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        input_layer: str = "conv2d",
        pos_enc_layer_type: str = "rel_pos",
        normalize_before: bool = True,
        static_chunk_size: int = 0,
        use_dynamic_chunk: bool = False,
        global_cmvn: nn.Module | None = None,
        use_dynamic_left_chunk: bool = False,
        positionwise_conv_kernel_size: int = 1,
        macaron_style: bool = True,
        selfattention_layer_type: str = "rel_selfattn",
        activation_type: str = "swish",
        use_cnn_module: bool = True,
        cnn_module_kernel: int = 15,
        causal: bool = False,
        cnn_module_norm: str = "batch_norm",
        key_bias: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if input_layer != "linear":
            raise ModelError(f"encoder: input_layer {input_layer!r} is not supported (only 'linear')")
        if pos_enc_layer_type not in POS_ENCODINGS:
            raise ModelError(f"encoder: pos_enc_layer_type {pos_enc_layer_type!r} is not supported "
                             f"(known: {', '.join(POS_ENCODINGS)})")
        if selfattention_layer_type not in ATTENTIONS:
            raise ModelError(f"encoder: selfattention_layer_type {selfattention_layer_type!r} is "
                             f"not supported (known: {', '.join(ATTENTIONS)})")
        if activation_type not in ACTIVATIONS:
            raise ModelError(f"encoder: activation_type {activation_type!r} is not supported")
        if global_cmvn is not None or static_chunk_size or use_dynamic_chunk:
            raise ModelError("encoder: global_cmvn and chunked attention are not supported")
        self._output_size = output_size
        self.embed = LinearNoSubsampling(input_size, output_size, dropout_rate,
                                         POS_ENCODINGS[pos_enc_layer_type](output_size))
        self.normalize_before = normalize_before
        self.after_norm = nn.LayerNorm(output_size, eps=1e-5)

        def ff() -> PositionwiseFeedForward:
            return PositionwiseFeedForward(output_size, linear_units, ACTIVATIONS[activation_type]())

        self.encoders = nn.ModuleList(
            ConformerEncoderLayer(
                output_size,
                ATTENTIONS[selfattention_layer_type](attention_heads, output_size, 0.0, key_bias),
                ff(),
                ff() if macaron_style else None,
                ConvolutionModule(output_size, cnn_module_kernel, ACTIVATIONS[activation_type](),
                                  cnn_module_norm, causal) if use_cnn_module else None,
                normalize_before,
            )
            for _ in range(num_blocks)
        )

    def output_size(self) -> int:
        return self._output_size

    def forward(self, xs: torch.Tensor, xs_lens: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, input_size) → (B, T, output_size); `xs_lens` masks padding when batched."""
        mask = None
        if xs_lens is not None:
            steps = torch.arange(xs.size(1), device=xs.device)
            mask = (steps.unsqueeze(0) < xs_lens.to(xs.device).unsqueeze(1)).unsqueeze(1)
        xs, pos_emb = self.embed(xs)
        for layer in self.encoders:
            xs = layer(xs, mask, pos_emb, mask)
        return self.after_norm(xs) if self.normalize_before else xs

    inference = forward
