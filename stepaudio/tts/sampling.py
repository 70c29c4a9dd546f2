"""How Step-Audio-TTS-3B samples audio tokens: the reference's settings and its repetition rule.

The reference calls ``llm.generate(max_length=8192, temperature=0.7, do_sample=True,
logits_processor=[RepetitionAwareLogitsProcessor()])``: no top_p, transformers' default top_k 50,
and a rule that bans the newest token for one step when it fills more than a tenth of the last
ten ids (so: occurs at least twice in them, prompt ids included). The rule exists three ways here
because three samplers run it: a transformers ``LogitsProcessor`` (``generate`` users), a plain
``(ids, logits)`` hook (our engines' sampling hook) and vLLM's batch processors
(``stepaudio.tts.vllm_repetition``, loaded by the TTS-3B vLLM server, asked for per request).

The LM writes ``<audio_N>`` ids (65536 + N, N < 5120) and ends with ``<|EOT|>``. A random or
confused model can also write text ids; the reference would pass them on to the flow, where they
crash its embedding (or, below 65536, clamp to code 0). Here they are dropped and counted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.generation.logits_process import LogitsProcessor

from stepaudio.llm.engine import RepetitionRule, SamplingParams
from stepaudio.llm.tokens import AUDIO_TOKEN_OFFSET, EOT_ID

#: Flow (CosyVoice) vocabulary of Step-Audio: 1024 linguistic + 4096 semantic codes.
FLOW_VOCAB = 5120
AUDIO_ID_END = AUDIO_TOKEN_OFFSET + FLOW_VOCAB
#: The reference's ``max_length`` (prompt + output) for TTS generation.
REFERENCE_MAX_LENGTH = 8192
TTS_TEMPERATURE = 0.7
#: transformers' ``generate`` default, which the reference's call leaves on.
TTS_TOP_K = 50
REPETITION_WINDOW = 10
REPETITION_MAX_RATIO = 0.1


def repetition_banned_token(ids: Sequence[int], window: int = REPETITION_WINDOW,
                            max_ratio: float = REPETITION_MAX_RATIO) -> int | None:
    """The id the rule bans for the next step, or None.

    Integer arithmetic (``count > max_ratio * window``) so 2-in-10 is banned exactly as the
    reference's float ratio comparison bans it.
    """
    if len(ids) < window:
        return None
    recent = ids[-window:]
    last = int(recent[-1])
    count = sum(1 for t in recent if int(t) == last)
    return last if count > max_ratio * window else None


def repetition_hook(ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
    """``LogitsHook`` form of the rule, for ``SamplingParams(logits_hook=...)``: in place on one
    row of logits, returned for chaining."""
    banned = repetition_banned_token(ids)
    if banned is not None:
        logits[banned] = float("-inf")
    return logits


class RepetitionAwareLogitsProcessor(LogitsProcessor):
    """The reference's transformers ``LogitsProcessor`` (for ``model.generate``), batched, same
    masking; prompt ids count towards the window, as ``generate`` passes them."""

    def __init__(self, window: int = REPETITION_WINDOW, max_ratio: float = REPETITION_MAX_RATIO
                 ) -> None:
        self.window = window
        self.max_ratio = max_ratio

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        window = input_ids[:, -self.window:]
        if window.shape[1] < self.window:
            return scores
        last = window[:, -1]
        counts = (window == last.unsqueeze(-1)).sum(dim=1)
        mask = counts.float() / self.window > self.max_ratio
        scores[mask, last[mask]] = float("-inf")
        return scores


def tts_sampling_params(max_new_tokens: int, seed: int | None = None,
                        repetition_rule: bool = True) -> SamplingParams:
    """Engine parameters equal to the reference's ``generate`` call for one TTS request.

    The repetition rule runs in process (transformers engine) or is asked of the TTS-3B vLLM
    server (openai engine); ``repetition_rule`` False only where the operator turned it off
    (``tts.repetition_rule: off``, for a server that cannot apply it).
    """
    return SamplingParams(
        temperature=TTS_TEMPERATURE,
        top_p=1.0,
        top_k=TTS_TOP_K,
        max_new_tokens=max(1, int(max_new_tokens)),
        stop_token_ids=(EOT_ID,),
        seed=seed,
        repetition=RepetitionRule(REPETITION_WINDOW, REPETITION_MAX_RATIO) if repetition_rule
        else None,
    )


@dataclass
class AudioTokenFilter:
    """LLM ids → flow tokens, dropping (and counting) everything that is not ``<audio_N>``."""

    flow_vocab: int = FLOW_VOCAB
    skipped: int = 0
    kept: int = 0
    skipped_ids: list[int] = field(default_factory=list)

    def __call__(self, ids: Iterable[int]) -> list[int]:
        out = []
        for token_id in ids:
            token_id = int(token_id)
            code = token_id - AUDIO_TOKEN_OFFSET
            if 0 <= code < self.flow_vocab:
                out.append(code)
            elif token_id != EOT_ID:
                self.skipped += 1
                if len(self.skipped_ids) < 16:  # a sample for the log, not a growing list
                    self.skipped_ids.append(token_id)
        self.kept += len(out)
        return out


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")
_TAG = re.compile(r"[（(][^()（）]*[）)]")


def max_audio_seconds(text: str, music: bool = False) -> float:
    """A generous ceiling on how long ``text`` can take to say.

    Chinese is read at 4-5 characters a second and English at 12-15 letters a second; this
    allows 0.5 s per CJK character and 0.15 s per other visible character, plus 2 s, twice that
    for RAP/humming. It only has to stop a model that never writes ``<|EOT|>`` (the tiny random
    checkpoints, or a real one that loops), never a real reading.
    """
    body = _TAG.sub("", text)
    cjk = len(_CJK.findall(body))
    other = sum(1 for ch in body if not ch.isspace()) - cjk
    seconds = 2.0 + 0.5 * cjk + 0.15 * other
    return seconds * (2.0 if music else 1.0)


def max_new_tokens_for(text: str, token_rate: float, prompt_len: int, max_model_len: int,
                       music: bool = False) -> int:
    """Token cap for one clause: the seconds ceiling at the flow's token rate, within the
    reference's 8192-token length and the engine's context window; at least 1."""
    by_text = int(max_audio_seconds(text, music) * token_rate) + 1
    room = min(REFERENCE_MAX_LENGTH, max_model_len) - prompt_len
    return max(1, min(by_text, room))


def vllm_extra_args(enabled: bool = True) -> dict[str, Any]:
    """Per-request switch read by ``stepaudio.tts.vllm_repetition`` (on by default there)."""
    return {"stepaudio_repetition": bool(enabled)}


__all__ = [
    "AUDIO_ID_END",
    "AudioTokenFilter",
    "FLOW_VOCAB",
    "RepetitionAwareLogitsProcessor",
    "max_audio_seconds",
    "max_new_tokens_for",
    "repetition_banned_token",
    "repetition_hook",
    "tts_sampling_params",
]
