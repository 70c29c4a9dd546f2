"""Dialogue history of one session, and the prompt built from it under a token budget.

What the chat model sees, following how Step-Audio-Chat was trained and what the user heard:

- Earlier user turns as **text**: each committed audio turn is transcribed in the background (the chat
  model in ASR mode) and :meth:`ContextManager.set_transcript` fills the text in when it arrives.
  Until then the turn is sent as its audio tokens, which the model reads as well.
- The **newest** user turn as **audio tokens** (the model hears tone and emotion, not a transcript).
- Assistant turns as the text **actually spoken**: the TTS reports, per chunk, how much text its audio
  covers (:meth:`ContextManager.add_assistant_segment` keeps ``(audio_ms, text_offset)`` marks), and a
  truncation to the ``audio_end_ms`` the client played cuts the text at the matching offset. Words the
  user never heard are not in the history, so the model does not believe it said them.
- A token budget: the oldest exchanges are left out first; the system prompt and the newest user
  turn never are (:class:`ContextOverflow` if those alone do not fit).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stepaudio.errors import StepAudioError
from stepaudio.llm import budget as fitting
from stepaudio.llm.prompt import apply_chat_template, audio_content, build_asr_prompt

Role = Literal["system", "user", "assistant"]

#: ``<|BOT|>`` + role + ``\n`` + ``<|EOT|>``: what the template adds around each turn's content.
TURN_OVERHEAD_TOKENS = 4
#: Ends a transcript the transcription cut short ("…(the transcription stops here)"): the history
#: is what the model reads of earlier turns, and an unmarked start would read as all that was said.
CUT_MARK = "……（转写到此截断）"


class ContextError(StepAudioError):
    """A request the history cannot satisfy (unknown item, truncating a user turn…)."""


class ContextOverflow(ContextError):
    """The system prompt and the newest user turn alone are over the token budget."""


def approx_token_count(text: str) -> int:
    """Upper-bound stand-in for the real tokenizer: one token per character (CJK is about one
    token per character; Latin text is fewer). The session passes the LLM tokenizer's count."""
    return len(text)


def utf8_len(text: str | None) -> int:
    """Bytes of ``text`` in UTF-8 (without encoding the ASCII majority)."""
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _is_word_char(ch: str) -> bool:
    return ch.isascii() and ch.isalnum()


def _snap_to_word(text: str, i: int) -> int:
    """Move a cut that falls inside a Latin word back to the word's start (CJK cuts anywhere)."""
    while 0 < i < len(text) and _is_word_char(text[i - 1]) and _is_word_char(text[i]):
        i -= 1
    return i


@dataclass
class Turn:
    """One item of the conversation, as the prompt needs it."""

    item_id: str
    role: Role
    #: user: the transcript (None until it arrives); assistant: all generated text; system: text.
    text: str | None = None
    #: user audio turns: LLM ids (65536 + code) from the audio tokenizer.
    audio_tokens: list[int] | None = None
    #: assistant: (cumulative audio ms, cumulative text offset) after each TTS segment.
    marks: list[tuple[float, int]] = field(default_factory=list)
    #: assistant: the client played only this much (None: all of it).
    truncated_ms: float | None = None
    #: assistant: still being generated (left out of prompts).
    in_progress: bool = False

    @property
    def audio_ms(self) -> float:
        return self.marks[-1][0] if self.marks else 0.0

    @property
    def nbytes(self) -> int:
        """What this turn weighs for the history's byte cap: its text as UTF-8, 4 bytes per
        audio token."""
        return utf8_len(self.text) + 4 * len(self.audio_tokens or ())

    def offset_at(self, audio_ms: float) -> int:
        """How much of the text had been spoken after ``audio_ms`` of this turn's audio.

        Linear within a segment (speech rate is roughly even within a clause), then snapped back
        to a word start so a half-heard English word is not kept.
        """
        if not self.marks:
            return 0
        times = [m[0] for m in self.marks]
        k = bisect.bisect_right(times, audio_ms)
        if k == len(self.marks):
            return self.marks[-1][1]
        t0, o0 = self.marks[k - 1] if k else (0.0, 0)
        t1, o1 = self.marks[k]
        frac = 0.0 if t1 <= t0 else (audio_ms - t0) / (t1 - t0)
        cut = o0 + int(frac * (o1 - o0))
        return max(o0, _snap_to_word(self.text or "", cut))

    @property
    def spoken_text(self) -> str:
        text = self.text or ""
        if self.role != "assistant" or self.truncated_ms is None:
            return text
        return text[: self.offset_at(self.truncated_ms)]


@dataclass
class ContextManager:
    """The conversation of one session. Not thread-safe: the session's event loop owns it."""

    instructions: str = ""
    #: Prompt budget in tokens (the model's context minus room for the reply).
    max_tokens: int = 4096
    count_tokens: Callable[[str], int] = approx_token_count
    #: Items kept at all (memory bound); older ones are forgotten for good.
    max_items: int = 256
    #: Bytes of history kept (:attr:`Turn.nbytes` summed); past it the oldest items are
    #: forgotten. Clients adding items check :meth:`room_for` first and are told when full.
    max_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        self._turns: list[Turn] = []
        self._index: dict[str, Turn] = {}
        self.dropped_last_prompt = 0  # turns left out of the last prompt (a metric)

    # -- items ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._turns)

    def __iter__(self) -> Iterator[Turn]:
        return iter(self._turns)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._index

    def get(self, item_id: str) -> Turn:
        turn = self._index.get(item_id)
        if turn is None:
            raise ContextError(f"no item {item_id!r} in the conversation")
        return turn

    def last_item_id(self) -> str | None:
        return self._turns[-1].item_id if self._turns else None

    def _insert(self, turn: Turn, previous_item_id: str | None) -> Turn:
        if turn.item_id in self._index:
            raise ContextError(f"an item {turn.item_id!r} already exists")
        if previous_item_id is None:
            self._turns.append(turn)
        else:
            prev = self.get(previous_item_id)
            self._turns.insert(self._turns.index(prev) + 1, turn)
        self._index[turn.item_id] = turn
        while len(self._turns) > self.max_items or (
                len(self._turns) > 1 and self.nbytes > self.max_bytes):
            old = self._turns.pop(0)
            del self._index[old.item_id]
        return turn

    @property
    def nbytes(self) -> int:
        """The history's weight against :attr:`max_bytes`."""
        return sum(t.nbytes for t in self._turns)

    def room_for(self, nbytes: int) -> bool:
        """Whether an item of ``nbytes`` fits without forgetting anything."""
        return self.nbytes + nbytes <= self.max_bytes

    def clear(self) -> None:
        """Forget everything (the session closed: its memory goes now, not at the next
        collection of reference cycles)."""
        self._turns.clear()
        self._index.clear()

    def add_user_audio(
        self, item_id: str, audio_tokens: Sequence[int], previous_item_id: str | None = None
    ) -> Turn:
        """A committed spoken user turn. Older turns whose transcript has arrived let go of their
        audio, which only the newest turn needs."""
        if not audio_tokens:
            raise ContextError("a user audio turn needs at least one audio token")
        for t in self._turns:
            if t.role == "user" and t.text and t.audio_tokens is not None:
                t.audio_tokens = None
        return self._insert(
            Turn(item_id, "user", audio_tokens=list(audio_tokens)), previous_item_id
        )

    def add_user_text(self, item_id: str, text: str, previous_item_id: str | None = None) -> Turn:
        return self._insert(Turn(item_id, "user", text=text), previous_item_id)

    def add_system_text(self, item_id: str, text: str, previous_item_id: str | None = None) -> Turn:
        return self._insert(Turn(item_id, "system", text=text), previous_item_id)

    @staticmethod
    def transcript_text(text: str, cut: bool) -> str:
        """A transcript as the history keeps it: one the transcription cut short at its token
        limit says so (:data:`CUT_MARK`), so the model does not take the start for the turn."""
        return f"{text.strip()}{CUT_MARK}" if cut else text.strip()

    def set_transcript(self, item_id: str, text: str) -> bool:
        """The background transcription of a user audio turn arrived. False if the item is gone
        (deleted or evicted while it ran): the result is simply dropped."""
        turn = self._index.get(item_id)
        if turn is None or turn.role != "user":
            return False
        turn.text = text.strip()
        newest = self._newest_user()
        if turn is not newest and turn.text:
            turn.audio_tokens = None
        return True

    def add_assistant(
        self, item_id: str, previous_item_id: str | None = None, *, in_progress: bool = True
    ) -> Turn:
        """An assistant reply; it stays out of prompts until :meth:`finish_assistant`."""
        return self._insert(
            Turn(item_id, "assistant", text="", in_progress=in_progress), previous_item_id
        )

    def add_assistant_text(self, item_id: str, text: str) -> None:
        """Reply text with no audio of its own (text-only replies, or a client-created item)."""
        turn = self._assistant(item_id)
        turn.text = (turn.text or "") + text

    def add_assistant_segment(self, item_id: str, text: str, audio_ms: float) -> None:
        """``audio_ms`` of reply audio, sent to the client, speaks ``text`` (the next piece of the
        reply). Call it per TTS chunk with the part of the clause that chunk covers, or once per
        clause: the finer, the more exact a truncation."""
        if audio_ms < 0:
            raise ContextError("audio_ms must not be negative")
        turn = self._assistant(item_id)
        turn.text = (turn.text or "") + text
        turn.marks.append((turn.audio_ms + float(audio_ms), len(turn.text)))

    def finish_assistant(self, item_id: str) -> None:
        """The reply is over (completed, cancelled or failed): it joins the history."""
        self._assistant(item_id).in_progress = False

    def truncate(self, item_id: str, audio_end_ms: float) -> str:
        """Keep only what the first ``audio_end_ms`` of the reply's audio said; returns that text.

        Called again (the client's report after the server's estimate), the last call wins: the
        full text is kept, so a later, longer truncation can restore words.
        """
        turn = self._assistant(item_id)
        if audio_end_ms < 0:
            raise ContextError("audio_end_ms must not be negative")
        if audio_end_ms > turn.audio_ms + 1.0:
            raise ContextError(
                f"audio_end_ms {audio_end_ms:.0f} is past the end of the item's audio ({turn.audio_ms:.0f} ms)"
            )
        turn.truncated_ms = float(audio_end_ms)
        return turn.spoken_text

    def delete(self, item_id: str) -> None:
        turn = self.get(item_id)
        self._turns.remove(turn)
        del self._index[item_id]

    def _assistant(self, item_id: str) -> Turn:
        turn = self.get(item_id)
        if turn.role != "assistant":
            raise ContextError(f"item {item_id!r} is a {turn.role} message, not an assistant reply")
        return turn

    def _newest_user(self) -> Turn | None:
        for t in reversed(self._turns):
            if t.role == "user":
                return t
        return None

    # -- prompts ----------------------------------------------------------------------------------

    def _render(self, turn: Turn, newest_user: Turn | None) -> tuple[dict[str, Any] | None, int]:
        """(message, tokens) of a turn, or (None, 0) for a turn the prompt should not carry."""
        if turn.role == "assistant":
            if turn.in_progress:
                return None, 0
            text = turn.spoken_text
            if not text:
                return None, 0  # nothing was heard: an empty turn would teach the model silence
            return {"role": "assistant", "content": text}, self.count_tokens(
                text
            ) + TURN_OVERHEAD_TOKENS
        if (
            turn.role == "user"
            and turn.audio_tokens is not None
            and (turn is newest_user or not turn.text)
        ):
            content = {"type": "audio", "audio": turn.audio_tokens}
            return {"role": "user", "content": content}, len(
                turn.audio_tokens
            ) + TURN_OVERHEAD_TOKENS
        if not turn.text:
            return None, 0
        return {"role": turn.role, "content": turn.text}, self.count_tokens(
            turn.text
        ) + TURN_OVERHEAD_TOKENS

    def messages(
        self, pending_audio: Sequence[int] | None = None, instructions: str | None = None
    ) -> list[dict[str, Any]]:
        """Chat messages for the next reply, within the budget.

        ``pending_audio`` is a user turn not committed yet (a speculative reply reads the audio
        heard so far); it becomes the newest user turn. ``instructions`` overrides the session's
        system prompt for one reply (``response.create``).
        """
        return self._compose(pending_audio, instructions, budget=self.max_tokens)

    def _compose(
        self, pending_audio: Sequence[int] | None, instructions: str | None, budget: int | None
    ) -> list[dict[str, Any]]:
        system = self.instructions if instructions is None else instructions
        head: list[dict[str, Any]] = []
        used = 0
        if system:
            head.append({"role": "system", "content": system})
            used += self.count_tokens(system) + TURN_OVERHEAD_TOKENS
        newest = self._newest_user() if pending_audio is None else None
        body = [
            (t, m, n) for t in self._turns for m, n in [self._render(t, newest)] if m is not None
        ]
        tail: list[dict[str, Any]] = []
        if pending_audio is not None:
            if not pending_audio:
                raise ContextError("the pending user turn has no audio tokens")
            tail.append(
                {"role": "user", "content": {"type": "audio", "audio": list(pending_audio)}}
            )
            used += len(pending_audio) + TURN_OVERHEAD_TOKENS
        # The newest user turn, and anything after it, is never left out.
        keep_from = next((i for i, (t, _, _) in enumerate(body) if t is newest), len(body))
        body, kept = body[:keep_from], body[keep_from:]
        used += sum(n for _, _, n in kept)
        if budget is None:
            return head + [m for _, m, _ in body + kept] + tail
        if used > budget:
            raise ContextOverflow(
                f"the system prompt and the newest user turn need {used} tokens, over the budget of "
                f"{budget}; shorten the instructions or the turn"
            )
        # Cut where stepaudio.llm.budget cuts (steps fixed by the conversation's beginning, for
        # the prefix cache), never right before a reply: a reply whose question went goes too.
        starts = [i for i, (_, m, _) in enumerate(body) if i == 0 or m["role"] != "assistant"]
        start = fitting.keep_from([n for _, _, n in body], starts, budget - used,
                                  budget // fitting.CUT_STEPS)
        start = len(body) if start is None else start
        self.dropped_last_prompt = start
        return head + [m for _, m, _ in body[start:] + kept] + tail

    def chat_inputs(
        self, pending_audio: Sequence[int] | None = None, instructions: str | None = None
    ) -> tuple[str | None, list[tuple[str, str]], list[int] | None]:
        """``(system, history, audio)`` with no budget applied, for
        :func:`stepaudio.llm.budget.fit_chat_prompt`, which trims with exact tokenizer counts.

        ``history`` is ``(role, text)`` pairs (an older turn not yet transcribed appears as its
        ``<audio_N>`` run); ``audio`` is the newest user turn, or None when the newest turn is text
        (then use :meth:`build_prompt`).
        """
        msgs = self._compose(pending_audio, instructions, budget=None)
        system_text = self.instructions if instructions is None else instructions
        if system_text:
            msgs = msgs[1:]
        audio: list[int] | None = None
        if msgs and msgs[-1]["role"] == "user" and isinstance(msgs[-1]["content"], dict):
            audio = list(msgs.pop()["content"]["audio"])
        history = [
            (
                m["role"],
                m["content"]
                if isinstance(m["content"], str)
                else audio_content(m["content"]["audio"]),
            )
            for m in msgs
        ]
        return (system_text or None), history, audio

    def build_prompt(
        self, pending_audio: Sequence[int] | None = None, instructions: str | None = None
    ) -> str:
        """The Step-Audio-Chat prompt text (``<|BOT|>…``, ending in ``<|BOT|>assistant\\n``)."""
        return apply_chat_template(self.messages(pending_audio, instructions))

    def asr_prompt(self, item_id: str) -> str:
        """The prompt that makes the chat model transcribe a user audio turn (for its text form)."""
        turn = self.get(item_id)
        if turn.role != "user" or turn.audio_tokens is None:
            raise ContextError(f"item {item_id!r} has no audio to transcribe")
        return build_asr_prompt(turn.audio_tokens)
