"""Step1ForCausalLM: the decoder shared by Step-Audio-Chat (130B) and Step-Audio-TTS-3B.

Written for transformers so that a real checkpoint folder loads through ``AutoModelForCausalLM``
without the checkpoint's ``trust_remote_code`` files and without the proprietary ``liboptimus``
flash kernel. The attention is plain SDPA with the square-root ALiBi bias as an additive mask;
grouped-query attention folds each group's query heads into the query-length axis, so the KV
cache is never repeated in memory.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from stepaudio.llm import compat
from stepaudio.llm.alibi import additive_from_4d, alibi_slopes, sqrt_alibi_bias

#: Largest attention bias (batch x heads x queries x keys elements) built in one piece; longer
#: prefills are attended in query chunks so the O(L^2) bias never dominates GPU memory.
MAX_BIAS_ELEMENTS = 1 << 26


class Step1Config(PretrainedConfig):
    """The keys of the real ``config.json`` (Step-Audio-Chat and TTS-3B).

    ``tie_word_embeddings`` defaults to False because both released checkpoints store a separate
    ``lm_head.weight``; ``Step1ForCausalLM.from_pretrained`` overrides it from the checkpoint's
    own tensor list. ``auto_map`` (pointing at remote code we do not use) is kept as an ordinary
    attribute so a config round-trips unchanged.
    """

    model_type = "step1"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    # Standard names that generic transformers code (static caches, vLLM, benchmarks) looks up.
    attribute_map = {
        "num_key_value_heads": "num_attention_groups",
        "max_position_embeddings": "max_seq_len",
    }

    def __init__(
        self,
        hidden_size: int = 3072,
        intermediate_size: int = 8192,
        num_attention_heads: int = 48,
        num_attention_groups: int = 4,
        num_hidden_layers: int = 32,
        max_seq_len: int = 32768,
        vocab_size: int = 74752,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 3,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_attention_heads = num_attention_heads
        self.num_attention_groups = num_attention_groups
        self.num_hidden_layers = num_hidden_layers
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(  # type: ignore[call-arg]  # transformers 5 takes these as **kwargs
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        # transformers 5.x does not store these from kwargs on every path; set them explicitly.
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.tie_word_embeddings = tie_word_embeddings
        if num_attention_heads % num_attention_groups:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_attention_groups ({num_attention_groups})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class Step1RMSNorm(nn.Module):
    """RMSNorm with the variance in fp32 (bf16 squares overflow precision on 12288-wide rows)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x32.to(x.dtype) * self.weight


class Step1MLP(nn.Module):
    def __init__(self, config: Step1Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclass
class AttentionContext:
    """Per-forward state shared by all layers: query positions, padding and the memoised bias.

    The bias only depends on positions, so it is built once per forward (per device and dtype,
    because ``device_map`` may spread layers over GPUs) rather than once per layer.
    """

    slopes: list[float]
    query_positions: torch.Tensor
    key_padding_mask: torch.Tensor | None = None
    mask_4d: torch.Tensor | None = None
    _memo: dict[tuple, torch.Tensor] = field(default_factory=dict)

    def query_chunks(self, batch: int, key_length: int) -> list[tuple[int, int]]:
        q_len = self.query_positions.shape[0]
        per_query = max(1, batch * len(self.slopes) * key_length)
        step = max(1, MAX_BIAS_ELEMENTS // per_query)
        return [(start, min(start + step, q_len)) for start in range(0, q_len, step)]

    def bias(
        self, start: int, stop: int, key_length: int, dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        key = (start, stop, key_length, dtype, device)
        cached = self._memo.get(key)
        if cached is not None:
            return cached
        slopes = torch.tensor(self.slopes, dtype=torch.float32, device=device)
        pad = self.key_padding_mask
        bias = sqrt_alibi_bias(
            slopes,
            self.query_positions[start:stop].to(device),
            key_length,
            None if pad is None else pad.to(device),
            dtype=torch.float32,
        )
        if self.mask_4d is not None:
            bias = bias + additive_from_4d(self.mask_4d[..., start:stop, :key_length], bias.dtype)
        bias = bias.to(dtype)
        if stop - start == self.query_positions.shape[0]:
            # Only a whole-sequence bias is kept for the next layers: keeping every chunk's bias
            # would rebuild the full O(L^2) tensor that chunking exists to avoid.
            self._memo[key] = bias
        return bias


class Step1Attention(nn.Module):
    def __init__(self, config: Step1Config, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_attention_groups
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_dim = self.num_groups * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: Any | None) -> torch.Tensor:
        batch, q_len, _ = x.shape
        groups, head_dim = self.num_groups, self.head_dim
        rep = self.num_heads // groups
        q = self.q_proj(x).view(batch, q_len, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, q_len, groups, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, q_len, groups, head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        key_length = k.shape[2]
        outputs = []
        for start, stop in ctx.query_chunks(batch, key_length):
            chunk = stop - start
            bias = ctx.bias(start, stop, key_length, q.dtype, q.device)
            # Head h = g * rep + r reads KV group g (= h // rep): fold r into the query axis.
            q_chunk = q[:, :, start:stop].reshape(batch, groups, rep * chunk, head_dim)
            bias = bias.reshape(bias.shape[0], groups, rep * chunk, key_length)
            out = F.scaled_dot_product_attention(
                q_chunk, k, v, attn_mask=bias, scale=head_dim**-0.5
            )
            outputs.append(out.reshape(batch, self.num_heads, chunk, head_dim))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        out = out.transpose(1, 2).reshape(batch, q_len, self.num_heads * head_dim)
        return self.o_proj(out)


class Step1DecoderLayer(nn.Module):
    def __init__(self, config: Step1Config, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Step1Attention(config, layer_idx)
        self.post_attention_layernorm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Step1MLP(config)

    def forward(self, x: torch.Tensor, ctx: AttentionContext, cache: Any | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Step1PreTrainedModel(PreTrainedModel):
    config_class = Step1Config
    config: Step1Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Step1DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.x: lets generate() hand us a DynamicCache

    def _init_weights(self, module: nn.Module) -> None:
        """Random init for tiny test models; loaded checkpoints overwrite it."""
        if compat.TRANSFORMERS_MAJOR >= 5:
            # 5.x tracks which tensors were loaded through its own init helpers.
            super()._init_weights(module)
            return
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, Step1RMSNorm):
            module.weight.data.fill_(1.0)


class Step1Model(Step1PreTrainedModel):
    def __init__(self, config: Step1Config) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Step1DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = Step1RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.slopes = alibi_slopes(config.num_attention_heads)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"Step1's input embeddings are an nn.Embedding, not {type(value)}")
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Any | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast | tuple:
        """Run the decoder.

        ``position_ids`` and ``cache_position`` are accepted for ``generate()`` and ignored: the
        bias depends only on the distance between slots of the (left-padded) sequence, which
        equals the distance between real tokens.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = compat.new_dynamic_cache(self.config)
        hidden = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        past = cache.get_seq_length() if cache is not None else 0
        q_len = hidden.shape[1]
        ctx = AttentionContext(
            slopes=self.slopes,
            query_positions=torch.arange(past, past + q_len, device=hidden.device),
            key_padding_mask=attention_mask if _is_2d(attention_mask) else None,
            mask_4d=attention_mask if _is_4d(attention_mask) else None,
        )
        all_hidden: list[torch.Tensor] = []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(hidden)
            hidden = layer(hidden, ctx, cache)
        hidden = self.norm(hidden)
        if output_hidden_states:
            all_hidden.append(hidden)
        cache_field: dict[str, Any] = {compat.CACHE_FIELD: cache if use_cache else None}
        out = BaseModelOutputWithPast(
            last_hidden_state=hidden,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            **cache_field,  # its name differs between transformers 4 and 5
        )
        return out if return_dict is not False else out.to_tuple()


class Step1ForCausalLM(Step1PreTrainedModel, GenerationMixin):
    # a list in transformers 4, a dict in 5 (compat picks the shape of the installed one)
    _tied_weights_keys = compat.tied_weights_keys()  # type: ignore[assignment]

    def __init__(self, config: Step1Config) -> None:
        super().__init__(config)
        self.model = Step1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any):
        """Load, tying ``lm_head`` to the embeddings exactly when the checkpoint has no lm_head.

        The released config.json has no ``tie_word_embeddings`` key (transformers 4.x and vLLM
        then default to tying), yet the checkpoints carry their own ``lm_head.weight``; trusting
        the tensors instead of the flag is the only rule right for both kinds of folder.
        """
        names = None
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            names = compat.checkpoint_tensor_names(
                pretrained_model_name_or_path, kwargs.get("subfolder") or ""
            )
        if names is not None:
            tie = compat.LM_HEAD_KEY not in names
            config = kwargs.get("config")
            if isinstance(config, PretrainedConfig):
                config = copy.deepcopy(config)
                config.tie_word_embeddings = tie
                kwargs["config"] = config
            else:
                kwargs["tie_word_embeddings"] = tie
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Any | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        num_logits_to_keep: int | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits for the last ``logits_to_keep`` positions (all when 0).

        ``generate()`` asks for one position during prefill; with a 74752-token vocabulary that
        avoids a (prompt length x vocab) float tensor per request. ``num_logits_to_keep`` is the
        transformers 4.x name of the same argument.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        keep = num_logits_to_keep if num_logits_to_keep is not None else logits_to_keep
        hidden = outputs.last_hidden_state
        if keep:
            hidden = hidden[:, -keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{compat.CACHE_FIELD: getattr(outputs, compat.CACHE_FIELD)},
        )
        return out if return_dict is not False else out.to_tuple()


def _is_2d(mask: torch.Tensor | None) -> bool:
    return mask is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2


def _is_4d(mask: torch.Tensor | None) -> bool:
    return mask is not None and isinstance(mask, torch.Tensor) and mask.dim() == 4
