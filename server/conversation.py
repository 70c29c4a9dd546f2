"""The conversation of one session: its items, the user turns and their transcripts, which reply
belongs to which item, and the history kept true to what the client was actually sent.

Why one owner: barge-in truncation, the feature most likely to break, touches all of it. A reply's
audio reaches the client clause by clause (:meth:`Conversation.clause_sent`); the history takes
each clause once its audio is complete; a cancel cuts the clause being spoken by the speaking rate
(:meth:`Conversation.cut`); a truncation to the played milliseconds (the controller's estimate,
then maybe the client's report: :meth:`Conversation.truncate`) cuts the text at the matching
offset. A reply joins the history after its user turn, which may still be waiting for its final
tokens (:meth:`Conversation.attach`).

A committed audio turn is a :class:`UserTurn`: its tokens may still be computing. It enters the
history once they are in, and is then transcribed in the background (the chat model in ASR mode),
after the current reply's first audio, so that the transcription never delays what the user
waits for. The history itself, and the prompts built from it, are ``server/context.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from server.context import ContextError, ContextManager, utf8_len
from server.outbox import SentAudio
from server.protocol import (
    AudioFormat,
    ContentPart,
    ConversationItemCreate,
    ConversationItemCreated,
    ConversationItemDeleted,
    ConversationItemDone,
    ConversationItemRetrieved,
    ConversationItemTruncate,
    ConversationItemTruncated,
    InputAudioBufferCommitted,
    Item,
    ProtocolError,
    ServerEvent,
    SessionConfig,
    TranscriptionCompleted,
    TranscriptionFailed,
    decode_audio,
    decode_base64,
    item_from_client,
    new_id,
)
from server.waiting import first_of
from server.workers import Stages, Tokens

if TYPE_CHECKING:
    from server.reply import Reply

log = logging.getLogger(__name__)

MAX_REPLIES_KEPT = 32
MAX_USER_TURNS_KEPT = 16
#: The transcription waits at most this long for the current reply's first audio.
TRANSCRIBE_AFTER_S = 5.0

#: Rough speaking rate to place a cut inside a clause that was interrupted before its audio was
#: complete (ms per character): CJK characters are syllables, Latin letters are not.
_MS_PER_CJK_CHAR = 230.0
_MS_PER_LATIN_CHAR = 65.0


def spoken_prefix(text: str, audio_ms: float) -> str:
    """The part of ``text`` that ``audio_ms`` of speech probably covered."""
    total = sum(_MS_PER_LATIN_CHAR if c.isascii() else _MS_PER_CJK_CHAR for c in text)
    if total <= 0 or audio_ms >= total:
        return text
    return text[: int(len(text) * audio_ms / total)]


@dataclass
class UserTurn:
    """A committed user audio turn: its tokens (maybe still being computed) and its place."""

    item_id: str
    previous_item_id: str | None
    tokens: asyncio.Future[Tokens]
    inserted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop()
                                           .create_future())

    def __post_init__(self) -> None:
        # A failed turn may have no reply waiting on it: its failure is still "retrieved".
        self.inserted.add_done_callback(lambda f: f.cancelled() or f.exception())


@dataclass
class _Clause:
    index: int
    text: str
    ms: float


@dataclass
class _Heard:
    """What the client has been sent of one reply, and how far the history has taken it in."""

    clauses: list[_Clause] = field(default_factory=list)
    applied: int = 0  # clauses (segments) already in the history
    attached: bool = False  # the reply is in the history
    attaching: bool = False
    truncated_ms: float | None = None


class ConversationHost(Protocol):
    """What the conversation needs from its session."""

    stages: Stages
    config: SessionConfig

    def emit(self, event: ServerEvent) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any], *, awaited: bool = False
              ) -> asyncio.Task[Any]: ...


class Conversation:
    """One session's conversation (see the module docstring). Owned by the session's loop."""

    def __init__(self, host: ConversationHost, context: ContextManager) -> None:
        self.host = host
        self.context = context
        self.items: OrderedDict[str, Item] = OrderedDict()
        self.turn_items: dict[int, str] = {}
        self.user_turns: OrderedDict[str, UserTurn] = OrderedDict()
        self.replies: OrderedDict[int, Reply] = OrderedDict()
        self.reply_by_item: dict[str, int] = {}
        self._heard: dict[int, _Heard] = {}
        self._asr_lock = asyncio.Lock()

    def forget(self) -> None:
        """Let go of everything now (the session closed): megabytes of history need not wait
        for the cycle collector."""
        self.context.clear()
        for table in (self.items, self.turn_items, self.user_turns, self.replies,
                      self.reply_by_item, self._heard):
            table.clear()

    # -- items ----------------------------------------------------------------------------------

    def item_for_turn(self, turn_id: int) -> str:
        """The item id a controller turn becomes (named when its speech starts)."""
        item = self.turn_items.get(turn_id)
        if item is None:
            item = self.turn_items[turn_id] = new_id("item")
            while len(self.turn_items) > 64:
                del self.turn_items[next(iter(self.turn_items))]
        return item

    def _remember(self, item: Item) -> None:
        self.items[item.id] = item
        while len(self.items) > 2 * self.context.max_items:
            self.items.popitem(last=False)

    async def create_item(self, ev: ConversationItemCreate, fmt: AudioFormat,
                          max_item_bytes: int) -> ProtocolError | None:
        """A client's item (its input audio in the session's format ``fmt`` is tokenized): →
        ``conversation.item.created``, or what is wrong with it (nothing is then kept)."""
        problem = self._check_new_item(ev, max_item_bytes)
        if problem is not None:
            return problem
        audio = await self._item_audio(ev, fmt)
        if isinstance(audio, ProtocolError):
            return audio
        item = item_from_client(ev.item)
        prev = ev.previous_item_id
        text = "".join((p.text or p.transcript or "") for p in item.content)
        anchor = prev if prev is not None else self.context.last_item_id()
        try:
            if item.role == "user" and audio:
                self.context.add_user_audio(item.id, audio, prev)
                if text:
                    self.context.set_transcript(item.id, text)
            elif item.role == "user":
                self.context.add_user_text(item.id, text, prev)
            elif item.role == "system":
                self.context.add_system_text(item.id, text, prev)
            else:
                self.context.add_assistant(item.id, prev, in_progress=False)
                self.context.add_assistant_text(item.id, text)
        except ContextError as err:
            return ProtocolError(code="invalid_value", param="item", message=str(err),
                                 event_id=ev.event_id)
        self._remember(item)
        self.host.emit(ConversationItemCreated(previous_item_id=anchor, item=item))
        self.host.emit(ConversationItemDone(previous_item_id=anchor, item=item))
        return None

    def _check_new_item(self, ev: ConversationItemCreate, max_item_bytes: int
                        ) -> ProtocolError | None:
        """What is wrong with a client's new item before any of it is decoded, if anything."""
        prev, eid = ev.previous_item_id, ev.event_id
        if prev is not None and prev not in self.context:
            return ProtocolError(code="invalid_value", param="previous_item_id", event_id=eid,
                                 message=f"previous_item_id {prev!r} is not in the conversation")
        if ev.item.id is not None and ev.item.id in self.context:
            return ProtocolError(code="invalid_value", param="item.id", event_id=eid,
                                 message=f"an item {ev.item.id!r} already exists")
        size = sum(utf8_len(p.text) + utf8_len(p.transcript) for p in ev.item.content or [])
        if size > max_item_bytes:
            return ProtocolError(
                code="item_too_large", param="item.content", event_id=eid,
                message=f"conversation.item.create: the item's text is {size} bytes, over this "
                f"server's limit of {max_item_bytes} (server.max_item_bytes)")
        if not self.context.room_for(size):
            return ProtocolError(
                code="conversation_full", param="item", event_id=eid,
                message=f"conversation.item.create: the conversation holds {self.context.nbytes} "
                f"bytes and this item would take it past {self.context.max_bytes} "
                "(server.max_history_bytes); delete items (conversation.item.delete) first")
        return None

    async def _item_audio(self, ev: ConversationItemCreate, fmt: AudioFormat
                          ) -> list[int] | ProtocolError:
        """The audio tokens of a client item's input audio."""
        ids: list[int] = []
        for part in ev.item.content or []:
            if part.type == "input_audio" and part.audio:
                raw = decode_base64(part.audio, "item.content.audio", ev.event_id)
                samples = raw if isinstance(raw, ProtocolError) else decode_audio(raw, fmt,
                                                                                   ev.event_id)
                if isinstance(samples, ProtocolError):
                    return samples
                tokens = await self.host.stages.tokenizer.tokenize(np.asarray(samples), fmt.rate)
                ids += tokens.ids
        return ids

    def delete_item(self, item_id: str, event_id: str | None) -> ProtocolError | None:
        try:
            self.context.delete(item_id)
        except ContextError as err:
            return ProtocolError(code="invalid_value", param="item_id", message=str(err),
                                 event_id=event_id)
        self.items.pop(item_id, None)
        self.host.emit(ConversationItemDeleted(item_id=item_id))
        return None

    def retrieve_item(self, item_id: str, event_id: str | None) -> ProtocolError | None:
        item = self.items.get(item_id)
        if item is None or item_id not in self.context:
            return ProtocolError(code="invalid_value", param="item_id", event_id=event_id,
                                 message=f"no item {item_id!r} in the conversation")
        reply = self.reply_of_item(item_id)
        if reply is not None:
            item = reply.final_item()
            if self._heard[reply.rid].truncated_ms is not None and item.content:
                item.content[0].transcript = self.context.get(item_id).spoken_text  # as heard
        self.host.emit(ConversationItemRetrieved(item=item))
        return None

    # -- user turns ---------------------------------------------------------------------------------

    def commit_user_turn(self, item_id: str, tokens: asyncio.Future[Tokens]) -> None:
        """A user audio turn is final (its tokens may still be computing): → the input buffer's
        ``committed`` and the user item; the turn joins the history once its tokens are in."""
        prev = self.context.last_item_id()
        ut = UserTurn(item_id, prev, tokens)
        self.user_turns[item_id] = ut
        while len(self.user_turns) > MAX_USER_TURNS_KEPT:
            self.user_turns.popitem(last=False)
        item = Item(id=item_id, role="user", content=[ContentPart(type="input_audio")])
        self._remember(item)
        self.host.emit(InputAudioBufferCommitted(item_id=item_id, previous_item_id=prev))
        self.host.emit(ConversationItemCreated(previous_item_id=prev, item=item))
        self.host.emit(ConversationItemDone(previous_item_id=prev, item=item))
        self.host.spawn(self._insert_user_turn(ut))

    def tokens_of(self, item_id: str) -> asyncio.Future[Tokens] | None:
        ut = self.user_turns.get(item_id)
        return ut.tokens if ut is not None else None

    async def _insert_user_turn(self, ut: UserTurn) -> None:
        try:
            tokens = await ut.tokens
        except (asyncio.CancelledError, Exception) as err:
            if not ut.inserted.done():
                ut.inserted.set_exception(RuntimeError(f"the turn's audio tokens failed: {err}"))
            return
        try:
            prev = ut.previous_item_id if ut.previous_item_id in self.context else None
            if tokens.ids:
                self.context.add_user_audio(ut.item_id, tokens.ids, prev)
            else:
                self.context.add_user_text(ut.item_id, "", prev)
        except ContextError as err:
            log.warning("user turn %s not stored: %s", ut.item_id, err)
        if not ut.inserted.done():
            ut.inserted.set_result(None)
        if tokens.ids:
            self.host.spawn(self._transcribe(ut.item_id, tokens.ids))

    async def wait_user_turn(self, item_id: str) -> None:
        """Until the user turn is in the history (raises if its tokens failed)."""
        ut = self.user_turns.get(item_id)
        if ut is not None:
            await ut.inserted

    async def _transcribe(self, item_id: str, ids: list[int]) -> None:
        await self._after_first_audio()
        async with self._asr_lock:
            try:
                heard = await self.host.stages.chat.transcribe(ids)
            except Exception as err:
                if self.host.config.transcription is not None:
                    self.host.emit(TranscriptionFailed(item_id=item_id, error=ProtocolError(
                        type="server_error", code="transcription_failed", message=str(err)[:300])))
                return
        text = self.context.transcript_text(heard.text, cut=heard.cut)
        if self.context.set_transcript(item_id, text):
            item = self.items.get(item_id)
            if item is not None and item.content:
                item.content[0].transcript = text
        if self.host.config.transcription is not None:
            self.host.emit(TranscriptionCompleted(
                item_id=item_id, transcript=text,
                usage={"type": "duration", "seconds": round(len(ids) / 41.67, 2)}))

    async def _after_first_audio(self) -> None:
        """Until every reply the client is waiting for has sent its first audio, or ended
        (held speculations do not count: the client is not waiting for them yet)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + TRANSCRIBE_AFTER_S
        while loop.time() < end:
            waiting = [r for r in self.replies.values() if r.held is None
                       and not (r.ended.is_set() or r.audio_out.is_set())]
            if not waiting:
                return
            await first_of([e for r in waiting for e in (r.ended, r.audio_out)],
                           end - loop.time())

    # -- replies ----------------------------------------------------------------------------------

    def add_reply(self, reply: Reply) -> None:
        """A new reply; a committed one owns its item at once, a speculation at its commit."""
        self.replies[reply.rid] = reply
        self._heard[reply.rid] = _Heard()
        while len(self.replies) > MAX_REPLIES_KEPT:
            rid, old = next(iter(self.replies.items()))
            if not old.finished:
                break
            self.drop_reply(rid)
        if reply.committed:
            self.reply_by_item[reply.item.id] = reply.rid

    def commit(self, reply: Reply) -> None:
        """A speculation becomes the reply: it owns its item and joins the history (if its
        prompt is built; otherwise the reply attaches itself once it is)."""
        self.reply_by_item[reply.item.id] = reply.rid
        if reply.prompt is not None:
            self.attach(reply)

    def reply(self, rid: int) -> Reply | None:
        return self.replies.get(rid)

    def drop_reply(self, rid: int) -> Reply | None:
        reply = self.replies.pop(rid, None)
        self._heard.pop(rid, None)
        if reply is not None and self.reply_by_item.get(reply.item.id) == rid:
            del self.reply_by_item[reply.item.id]
        return reply

    def truncatable(self, ev: ConversationItemTruncate) -> int | ProtocolError:
        """The controller's id of the reply a client's truncation names, or what is wrong."""
        rid = self.reply_by_item.get(ev.item_id)
        if rid is None:
            known = ev.item_id in self.context
            return ProtocolError(
                code="invalid_value", param="item_id", event_id=ev.event_id,
                message=f"conversation.item.truncate: item {ev.item_id!r} "
                + ("is not an assistant reply with audio" if known else "does not exist"))
        if ev.content_index != 0:
            return ProtocolError(code="invalid_value", param="content_index",
                                 event_id=ev.event_id,
                                 message="conversation.item.truncate: content_index must be 0")
        return rid

    def reply_of_item(self, item_id: str) -> Reply | None:
        rid = self.reply_by_item.get(item_id)
        return self.replies.get(rid) if rid is not None else None

    def rid_of_response(self, response_id: str) -> int:
        """The controller's id of a ``response.id`` (-1: none of this session's)."""
        return next((r.rid for r in self.replies.values() if r.response.id == response_id), -1)

    def prompt_inputs(self, instructions: str, pending: list[int] | None
                      ) -> tuple[str | None, list[tuple[str, str]], list[int] | None, str | None]:
        """``(system, history, audio, text prompt)`` for a reply's prompt (``ChatStage.fit``)."""
        system, history, audio = self.context.chat_inputs(pending or None, instructions)
        text_prompt = None if audio is not None else self.context.build_prompt(None, instructions)
        return system, history, audio, text_prompt

    # -- the history follows what was sent ------------------------------------------------------------

    def attach(self, reply: Reply) -> None:
        """Put a (committed) reply into the history, after its user turn (which may still be
        waiting for its final tokens: then the reply joins once the turn is in)."""
        heard = self._heard.get(reply.rid)
        if heard is None or heard.attached or heard.attaching:
            return
        heard.attaching = True
        ut = self.user_turns.get(reply.user_item or "")
        if ut is not None and not ut.inserted.done():
            self.host.spawn(self._attach_after_turn(reply, ut))
        else:
            self._attach(reply, heard)

    async def _attach_after_turn(self, reply: Reply, ut: UserTurn) -> None:
        try:
            await ut.inserted
        except Exception:  # the turn's tokens failed: the reply still goes into the history
            pass
        heard = self._heard.get(reply.rid)
        if heard is not None:
            self._attach(reply, heard)

    def _attach(self, reply: Reply, heard: _Heard) -> None:
        prev = reply.user_item if reply.user_item in self.context else None
        try:
            self.context.add_assistant(reply.item.id, prev)
        except ContextError as err:
            log.warning("reply %s not stored: %s", reply.item.id, err)
            return
        heard.attached = True
        self._remember(reply.item)
        if reply.done_out.is_set():  # it finished before it could join: catch up at once
            self._finish_in_history(reply, heard)
        else:
            self._sync(reply, heard, partial=False)

    def clause_sent(self, reply: Reply, sent: SentAudio, audio_ms: float) -> None:
        """``audio_ms`` of clause ``sent.clause`` reached the socket."""
        heard = self._heard.get(reply.rid)
        if heard is None:
            return
        if heard.clauses and heard.clauses[-1].index == sent.clause:
            heard.clauses[-1].ms += audio_ms
        else:
            heard.clauses.append(_Clause(sent.clause, sent.text, audio_ms))
        if heard.attached and reply.settings.audio_output:
            self._sync(reply, heard, partial=False)

    def audio_sent_ms(self, reply: Reply) -> float:
        """Milliseconds of the reply's audio that reached the socket (a drain waits for the
        client to play them)."""
        heard = self._heard.get(reply.rid)
        return sum(c.ms for c in heard.clauses) if heard is not None else 0.0

    def done_sent(self, reply: Reply) -> None:
        """The reply's ``response.done`` reached the socket: everything it sent is out."""
        heard = self._heard.get(reply.rid)
        if heard is not None and heard.attached:
            self._finish_in_history(reply, heard)

    def cut(self, reply: Reply) -> None:
        """The reply was cancelled: the clause being spoken counts as far as it was heard."""
        heard = self._heard.get(reply.rid)
        if heard is not None and heard.attached:
            self._sync(reply, heard, partial=True)

    def truncate(self, reply: Reply, audio_end_ms: int) -> None:
        """Only the first ``audio_end_ms`` of the reply were played (the controller's estimate,
        or the client's report, which comes later and wins): → ``conversation.item.truncated``.
        A text-only reply has no audio to cut."""
        heard = self._heard.get(reply.rid)
        if heard is None or not reply.settings.audio_output:
            return
        heard.truncated_ms = audio_end_ms
        if heard.attached and reply.item.id in self.context:
            self._sync(reply, heard, partial=True)
            try:
                self.context.truncate(reply.item.id, audio_end_ms)
            except ContextError as err:
                log.warning("truncating %s: %s", reply.item.id, err)
        self.host.emit(ConversationItemTruncated(item_id=reply.item.id,
                                                 audio_end_ms=audio_end_ms))

    def _finish_in_history(self, reply: Reply, heard: _Heard) -> None:
        """Everything the reply sent is out: the history gets what was spoken, and the reply
        joins the prompts."""
        if reply.item.id not in self.context:
            return
        self._sync(reply, heard, partial=True)
        if heard.truncated_ms is not None:
            try:
                self.context.truncate(reply.item.id, min(
                    heard.truncated_ms, self.context.get(reply.item.id).audio_ms))
            except ContextError:
                pass
        self.context.finish_assistant(reply.item.id)

    def _sync(self, reply: Reply, heard: _Heard, partial: bool) -> None:
        """Bring the history's copy of a reply up to the audio actually sent."""
        if not heard.attached or reply.item.id not in self.context:
            return
        segs = self._segments(reply, heard, partial_last=partial)
        for text, ms in segs[heard.applied:]:
            self.context.add_assistant_segment(reply.item.id, text, ms)
        heard.applied = len(segs)
        if not reply.settings.audio_output and reply.finished:
            turn = self.context.get(reply.item.id)
            if not turn.text:
                self.context.add_assistant_text(reply.item.id, reply.text)

    @staticmethod
    def _segments(reply: Reply, heard: _Heard, partial_last: bool) -> list[tuple[str, float]]:
        """(text, audio ms) per clause sent so far; the clause still being spoken (unless the
        reply is over) is left out until its audio is complete, or cut by the speaking rate."""
        out = []
        last = len(heard.clauses) - 1
        for i, c in enumerate(heard.clauses):
            text = c.text
            if i == last and not reply.finished:
                if not partial_last:
                    break
                text = spoken_prefix(text, c.ms)
            elif i == last and reply.status != "completed":
                text = spoken_prefix(text, c.ms)
            out.append((text, c.ms))
        return out
