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
#: Symbols a TTS reads as words ("%" percent, "$" dollars, "&" and, "°" degrees, "/" slash...).
_READ_AS_WORDS = set("%‰$€£¥₩&@#+=°×÷~*/\\<>^|§©®™℃℉")
#: Seconds per character, read slowly (measured: Tingting's prompt, 24 characters in 4.4 s, is
#: 0.18 s per character; numbers and letters are what a reference TTS would say for them).
CJK_S = 0.5  # a syllable
DIGIT_S = 1.0  # "1,234,567" is 13 English words (21 syllables); "2024" "twenty twenty-four"
CAPITAL_S = 0.45  # abbreviations are spelled: "FBI", "U.S.", "NASA"
LETTER_S = 0.15  # English runs at 12-15 letters a second
SYMBOL_S = 0.7
PUNCT_S = 0.35  # a pause
#: Speed tags, from the reference's own example: its "very, very slow" reading
#: (examples/speed_control2.wav) takes 0.37 s per character, twice Tingting's normal pace.
SPEED_FACTOR = {"慢速1": 1.8, "慢速2": 2.5}


def max_audio_seconds(text: str, music: bool = False) -> float:
    """A generous ceiling on how long ``text`` can take to say, so that no reading the reference's
    TTS could give is cut (the reference stops only at its 8192-token ``max_length``).

    Each character is priced at a slow reading of what is said for it: 0.5 s a CJK character,
    0.15 s a lowercase letter, 0.45 s a capital (spelled abbreviations), 1 s a digit (numbers are
    read as words), 0.7 s a symbol read as a word, 0.35 s any other mark (a pause), plus 2 s;
    times 1.8 / 2.5 under the slow-speed tags and 2 for RAP/humming. The cap only has to stop a
    model that never writes ``<|EOT|>`` (the tiny random checkpoints, or a real one that loops).
    """
    from stepaudio.tts.text import split_leading_tags  # text imports nothing of this module

    tags, body = split_leading_tags(text)
    seconds = 2.0
    for ch in body:
        if ch.isspace():
            continue
        if _CJK.match(ch):
            seconds += CJK_S
        elif ch.isdigit():
            seconds += DIGIT_S
        elif ch.isalpha():
            seconds += CAPITAL_S if ch.isupper() else LETTER_S
        elif ch in _READ_AS_WORDS:
            seconds += SYMBOL_S
        else:
            seconds += PUNCT_S
    for tag in tags:
        seconds *= SPEED_FACTOR.get(tag.strip("()（）").strip(), 1.0)
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
