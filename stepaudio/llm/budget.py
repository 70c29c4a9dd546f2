"""Fit a chat prompt into the context window: drop the oldest history, never the newest audio.

The newest user turn is what the model must answer, so it is never cut; the system prompt is the
deployment's instructions, so it stays too. Text history goes oldest first, a user turn together
with the assistant reply that follows it, so the remaining history still alternates. If the audio
turn alone is over budget the request is refused with a clear error rather than answered blind.

Where the cut falls is chosen for the prefix cache (vLLM keeps the keys of recent prompts, and a
conversation's next prompt reuses all of its previous one that it starts with). Cutting just enough
each time would move the start of the prompt at every turn once the window is full, and every turn
would compute the whole prompt again. Instead the history is cut at points fixed by the
conversation's own beginning, about a quarter of the budget apart (:func:`keep_from`): the prompt
keeps the same start for several turns, and moves a whole step when it must, so after a cut the
prompt uses at most about three quarters of the budget.

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

#: Cuts of the history fall on points about ``budget / CUT_STEPS`` tokens apart (see above).
CUT_STEPS = 4


def keep_from(sizes: Sequence[int], starts: Sequence[int], room: int, step: int) -> int | None:
    """Index of ``sizes`` (tokens per history item, oldest first) where the kept history begins.

    ``starts`` are the indexes a kept history may begin at, ascending (where an exchange
    begins). The cut points are the first start in each ``step`` tokens counted from the
    beginning of the history, plus the end (keep nothing): they do not move as turns are added,
    so neither does the prompt's start. Returns the earliest cut point whose rest fits ``room``
    tokens, else the earliest start that fits, else None.
    """
    before = [0]
    for n in sizes:
        before.append(before[-1] + n)
    total = before[-1]
    step = max(1, step)
    cuts = [s for i, s in enumerate(starts)
            if i == 0 or before[s] // step > before[starts[i - 1]] // step]
    for s in [*cuts, len(sizes), *starts]:
        if total - before[s] <= room:
            return s
    return None


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
    starts = [0]  # where an exchange (a user turn and the reply after it) begins
    while starts[-1] < len(hist):
        i = starts[-1]
        pair = hist[i][0] == "user" and i + 1 < len(hist) and hist[i + 1][0] == "assistant"
        starts.append(i + (2 if pair else 1))
    room = budget - fixed
    while room >= 0:
        start = keep_from(turns, starts, room, budget // CUT_STEPS)
        if start is None:
            break
        kept = hist[start:]
        text = apply_chat_template(chat_messages(audio_str, kept, system))
        ids = list(tokenizer.encode(text))
        if len(ids) <= budget:
            return FittedPrompt(text=text, ids=ids, history=kept, dropped=start)
        room -= len(ids) - budget  # the joined text counted more than its turns: ask for less
    raise ContextOverflowError(
        f"the newest audio turn needs {fixed} prompt tokens (with the system prompt), "
        f"over the {budget}-token context budget; send a shorter turn"
    )
