"""The TTS-3B repetition rule as vLLM logits processors (read in the vLLM 0.33.0 wheel).

vLLM 0.33 has no per-request Python callables in ``SamplingParams``; custom processors are
classes loaded once per engine by fully-qualified name (``--logits-processors MODULE:CLASS``,
``importlib.import_module`` in both the API server, which validates requests with the class's
``validate_params``, and the model runner) and applied to the whole batch:

- Model Runner V2 (the default where Triton is available, so on every CUDA GPU unless a feature
  it lacks sends vLLM back to V1): ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``
  — ``__init__(vllm_config, req_states)``, ``add_request(slot, params)``, ``apply(logits, ctx)``;
  the token history is on the GPU in ``req_states.all_token_ids`` (prompt + committed output,
  valid up to ``total_len``), draft tokens of speculative decoding in ``ctx.input_ids``.
  :class:`RepetitionAwareV2` reads the last ten ids there, with tensor ops only (no host sync per
  step). vLLM's V2 loader refuses a class that is not a V2 processor, so a server that ends up on
  the V1 runner fails at start-up instead of sampling without the rule.
- The V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``): ``AdapterLogitsProcessor`` wrapping a
  per-request ``(prompt_ids, output_ids, logits)`` callable: :class:`RepetitionAwareV1`.

``stepaudio vllm-command --tts`` starts the TTS-3B server with
``--logits-processors stepaudio.tts.vllm_repetition:RepetitionAwareV2``; stepaudio must be
importable in vLLM's environment (docs/vllm.md). A request switches the rule with
``SamplingParams.extra_args[REPETITION_XARG]`` (``vllm_xargs`` in the OpenAI API; JSON ``true``
arrives there as 1): our client sends 1 with every TTS request, 0 turns it off, and a request that
says nothing gets it (the server serves only TTS-3B, which the reference always samples with
the rule).

Without vLLM installed this module still imports (the base classes fall back to ``object``), so
the batch logic is tested here on CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stepaudio.llm.engine import REPETITION_XARG
from stepaudio.tts.sampling import REPETITION_MAX_RATIO, REPETITION_WINDOW, repetition_banned_token

try:  # pragma: no cover - depends on the optional extra
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2Base
except ImportError:  # pragma: no cover
    _V2Base = object  # type: ignore[assignment,misc]
try:  # pragma: no cover
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor as _V1Base
except ImportError:  # pragma: no cover
    _V1Base = object  # type: ignore[assignment,misc]

EXTRA_ARGS_KEY = REPETITION_XARG


def rule_enabled(params: Any) -> bool:
    """On unless the request's ``extra_args`` switch it off."""
    extra = getattr(params, "extra_args", None) or {}
    return bool(extra.get(EXTRA_ARGS_KEY, True))


def check_switch(params: Any) -> None:
    """The switch must be 0/1 (or true/false): anything else is an error for that request."""
    extra = getattr(params, "extra_args", None) or {}
    value = extra.get(EXTRA_ARGS_KEY, 1)
    if isinstance(value, str) or value not in (0, 1):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must be 1 or 0 (true or false)")


def ban_repeats_batch(logits: torch.Tensor, all_token_ids: torch.Tensor, total_len: torch.Tensor,
                      slots: torch.Tensor, input_ids: torch.Tensor, local_pos: torch.Tensor,
                      enabled: torch.Tensor, window: int = REPETITION_WINDOW,
                      max_ratio: float = REPETITION_MAX_RATIO) -> torch.Tensor:
    """Apply the rule to every logits row, in place.

    Row ``i`` belongs to request slot ``slots[i]``; its history is ``all_token_ids[slot,
    :total_len[slot]]`` followed by the draft tokens ``input_ids[i-pos+1 : i+1]`` where ``pos``
    is ``local_pos[i]`` (0 without speculative decoding), as vLLM's own bad-words kernel reads it.
    """
    rows = logits.shape[0]
    if rows == 0:
        return logits
    device = logits.device
    slots = slots.to(device=device, dtype=torch.long)
    pos = local_pos.to(device=device, dtype=torch.long)
    committed = total_len.to(device)[slots].long()
    length = committed + pos
    q = length.unsqueeze(1) - window + torch.arange(window, device=device).unsqueeze(0)
    hist = all_token_ids.to(device)
    from_hist = hist[slots.unsqueeze(1), q.clamp(0, hist.shape[1] - 1)].long()
    row = torch.arange(rows, device=device).unsqueeze(1)
    draft_idx = (row - pos.unsqueeze(1) + 1 + (q - committed.unsqueeze(1))).clamp(0, rows - 1)
    from_draft = input_ids.to(device)[draft_idx].long()
    tokens = torch.where(q < committed.unsqueeze(1), from_hist, from_draft)
    last = tokens[:, -1]
    count = (tokens == last.unsqueeze(1)).sum(dim=1)
    ban = (length >= window) & enabled.to(device)[slots].bool() & (count > max_ratio * window)
    current = logits.gather(1, last.unsqueeze(1))
    logits.scatter_(1, last.unsqueeze(1),
                    torch.where(ban.unsqueeze(1), torch.full_like(current, float("-inf")), current))
    return logits


class RepetitionAwareV2(_V2Base):  # type: ignore[misc,valid-type]
    """Model Runner V2 processor (vLLM 0.33 default)."""

    def __init__(self, vllm_config: Any, req_states: Any) -> None:
        self.req_states = req_states
        self.enabled_np = np.zeros(req_states.max_num_reqs, dtype=bool)
        self.enabled = torch.zeros(req_states.max_num_reqs, dtype=torch.bool,
                                   device=req_states.device)
        self._dirty = False

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_switch(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        on = rule_enabled(sampling_params)
        self.enabled_np[req_idx] = on
        self._dirty = True
        return on

    def apply_staged_writes(self) -> None:
        if self._dirty:
            self.enabled.copy_(torch.from_numpy(self.enabled_np), non_blocking=False)
            self._dirty = False

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        if not self.enabled_np[ctx.idx_mapping_np].any():
            return logits
        rs = self.req_states
        return ban_repeats_batch(logits, rs.all_token_ids.gpu, rs.total_len.gpu,
                                 ctx.expanded_idx_mapping, ctx.input_ids, ctx.expanded_local_pos,
                                 self.enabled)


def _row_rule(prompt_ids: Sequence[int], output_ids: Sequence[int], logits: torch.Tensor
              ) -> torch.Tensor:
    tail = list(prompt_ids[-REPETITION_WINDOW:]) + list(output_ids[-REPETITION_WINDOW:])
    banned = repetition_banned_token(tail)
    if banned is not None:
        logits[banned] = float("-inf")
    return logits


class RepetitionAwareV1(_V1Base):  # type: ignore[misc,valid-type]
    """V1 model runner: vLLM's adapter around a per-request callable."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_switch(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # it can remove the top token

    def new_req_logits_processor(self, params: Any) -> Any:
        return _row_rule if rule_enabled(params) else None


__all__ = ["RepetitionAwareV1", "RepetitionAwareV2", "ban_repeats_batch", "check_switch", "rule_enabled"]
