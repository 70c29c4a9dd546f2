"""Fit a chat prompt into the context window: drop the oldest history, never the newest audio.

The newest user turn is what the model must answer, so it is never cut; the system prompt is the
deployment's instructions, so it stays too. Text history goes oldest first, a user turn together
with the assistant reply that follows it, so the remaining history still alternates. If the audio
turn alone is over budget the request is refused with a clear error rather than answered blind.

Token counts are taken per turn: every turn starts with the special ``<|BOT|>`` token, at which the
tokenizer always splits, so turn counts add up exactly (plus one BOS); the final prompt is encoded
once more as a check.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from stepaudio.llm.prompt import (
    GENERATION_PREFIX,
    PromptError,
    apply_chat_template,
    audio_content,
    chat_messages,
)


class ContextOverflowError(PromptError):
    """Even with all history dropped the prompt does not fit the context budget."""


@dataclass(frozen=True)
class FittedPrompt:
    text: str
    ids: list[int]
    history: list[tuple[str, str]]
    dropped: int

    @property
    def tokens(self) -> int:
        return len(self.ids)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def fit_chat_prompt(
    tokenizer: Any,
    audio: str | Sequence[int],
    history: Iterable[tuple[str, str]] = (),
    system: str | None = None,
    *,
    budget: int,
) -> FittedPrompt:
    """The chat prompt (text and ids) for one spoken turn, trimmed to at most ``budget`` tokens.

    Raises :class:`PromptError` for an empty audio turn and :class:`ContextOverflowError` when the
    system prompt plus the audio turn alone exceed the budget.
    """
    audio_str = audio_content(audio)  # refuses empty or untokenized audio
    hist = list(history)
    messages = chat_messages(audio_str, hist, system)
    n_system = 1 if system else 0
    pieces = [_count(tokenizer, apply_chat_template([m]).removesuffix(GENERATION_PREFIX))
              for m in messages]
    fixed = 1 + _count(tokenizer, GENERATION_PREFIX) + pieces[-1] + sum(pieces[:n_system])
    turns = pieces[n_system:-1]
    start = 0
    while True:
        if fixed + sum(turns[start:]) <= budget:
            kept = hist[start:]
            text = apply_chat_template(chat_messages(audio_str, kept, system))
            ids = list(tokenizer.encode(text))
            if len(ids) <= budget:
                return FittedPrompt(text=text, ids=ids, history=kept, dropped=start)
        if start >= len(hist):
            need = fixed
            raise ContextOverflowError(
                f"the newest audio turn needs {need} prompt tokens (with the system prompt), "
                f"over the {budget}-token context budget; send a shorter turn"
            )
        step = 2 if hist[start][0] == "user" and start + 1 < len(hist) and (
            hist[start + 1][0] == "assistant") else 1
        start += step
