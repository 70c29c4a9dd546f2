"""One realtime connection: client events in, the controller's decisions carried out, events out.

The session is glue and bookkeeping; decisions live elsewhere. The controller decides turn-taking
(it returns actions, carried out here in order), the stages in ``server/workers.py`` do all model
work off the loop, :class:`~server.reply.Reply` runs each response, :class:`~server.outbox.Outbox`
sends. What the session owns:

- the input path: base64 → samples → the turn clock → the VAD pump (one resampling to 16 kHz,
  shared with the tokenizer) → VAD events → the controller; the tokenizer stream is fed as the VAD
  confirms speech (``server/turn_input.py``);
- the conversation: item ids, the context manager, user turns' tokens and their background
  transcription, which reply belongs to which item;
- playback accounting: every reply audio delta is reported to the controller when the socket takes
  it, so a barge-in truncates to what was sent (or to what the client says it played);
- backpressure: past ``max_input_backlog_ms`` of unanalysed audio the session stops reading its
  socket until the workers catch up, so audio sent faster than real time cannot pile up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from server import controller as ctl
from server.clock import InputClock
from server.context import ContextError, ContextManager, utf8_len
from server.controller import Controller, ControllerConfig
from server.outbox import Outbox, Outgoing
from server.protocol import (
    DEFAULT_VOICE,
    OPENAI_VOICES,
    ContentPart,
    ConversationItemCreate,
    ConversationItemCreated,
    ConversationItemDelete,
    ConversationItemDeleted,
    ConversationItemDone,
    ConversationItemRetrieve,
    ConversationItemRetrieved,
    ConversationItemTruncate,
    ConversationItemTruncated,
    Dialect,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCleared,
    InputAudioBufferCommit,
    InputAudioBufferCommitted,
    Item,
    ProfileInfo,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    ResponseCreated,
    ResponseParams,
    ServerEvent,
    SessionConfig,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    SpeculationEvent,
    SpeechStarted,
    SpeechStopped,
    StateChanged,
    Timings,
    TranscriptionCompleted,
    TranscriptionFailed,
    apply_session_update,
    decode_audio,
    decode_base64,
    item_from_client,
    new_id,
    parse_client_event,
    session_update_dialect,
)
from server.protocol.audio import _FORMAT_FROM_GA, AudioFormat
from server.reply import Reply, ReplySettings
from server.turn_input import RING_SECONDS, TurnInput
from server.workers import PumpResult, Stages, Tokens
from stepaudio.vad import FRAME_MS, VADParams

if TYPE_CHECKING:
    from server.metrics import Metrics
    from stepaudio.config import Config

log = logging.getLogger(__name__)

#: The controller may run this far ahead of what the VAD has analysed (one VAD frame plus a pump
#: cycle of slack): in real time it then decides on the append itself, and with audio sent faster
#: than real time it never judges a pause the VAD has not seen yet.
LEAD_MS = 3 * FRAME_MS
#: Parse messages larger than this in a thread (base64 and JSON of megabytes take milliseconds).
BIG_MESSAGE = 256 * 1024
MAX_REPLIES_KEPT = 32


@dataclass
class SessionEnv:
    """What every session of a server shares."""

    cfg: Config
    stages: Stages
    metrics: Metrics
    defaults: SessionConfig


def default_session_config(cfg: Config) -> SessionConfig:
    """A new session's configuration from the ``session`` section of the server config."""
    s = cfg.session
    base = SessionConfig()
    td = base.turn_detection
    assert td is not None
    upd: dict[str, Any] = {
        "voice": s.voice,
        "turn_detection": td.model_copy(update={
            "silence_duration_ms": s.silence_duration_ms,
            "prefix_padding_ms": s.prefix_padding_ms,
            "threshold": s.vad_threshold,
        }),
        "stepaudio": base.stepaudio.model_copy(update={
            "pause_ms": s.pause_ms, "min_barge_in_ms": s.min_barge_in_ms,
            "speculative": s.speculative}),
    }
    if s.instructions is not None:
        upd["instructions"] = s.instructions
    if s.max_output_tokens is not None:
        upd["max_output_tokens"] = s.max_output_tokens
    if not s.transcription:
        upd["transcription"] = None
    return base.model_copy(update=upd)


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


class Session:
    """One WebSocket connection (see the module docstring)."""

    def __init__(self, ws: Any, env: SessionEnv, dialect: Dialect) -> None:
        self.ws = ws
        self.env = env
        self.stages = env.stages
        self.metrics = env.metrics
        self.dialect: Dialect = dialect
        scfg = env.cfg.server
        self.config = env.defaults.model_copy(update={"id": new_id("sess")})
        self.controller = Controller(ControllerConfig.from_session(self.config))
        self.context = ContextManager(instructions=self.config.instructions,
                                      max_tokens=self.stages.chat.budget,
                                      max_bytes=scfg.max_history_bytes)
        self.max_item_bytes = min(scfg.max_item_bytes, scfg.max_send_queue_bytes // 4)
        self.clock = InputClock(scfg.stall_grace_ms)
        self.turn = TurnInput(self.stages.tokenizer)
        self.pump = self.stages.pump.client(self._vad_params(), self._on_pump)
        self.outbox = Outbox(ws, scfg.max_send_queue_bytes, self._on_sent,
                             self.metrics.send_queue_bytes.inc)
        self.max_backlog_ms = float(scfg.max_input_backlog_ms)
        self.max_event_bytes = scfg.max_event_bytes
        self.vad_analysed_ms = 0.0
        self.vad_settled_ms = 0.0
        self.vad_speaking = False
        self.speech_end_ms = 0.0  # audio ms where the last speech ended
        self.buffer_start = 0.0  # clock ms where the uncommitted input begins
        self.turn_items: dict[int, str] = {}
        self.user_turns: OrderedDict[str, UserTurn] = OrderedDict()
        self.replies: OrderedDict[int, Reply] = OrderedDict()
        self.reply_by_item: dict[str, int] = {}
        self.items: OrderedDict[str, Any] = OrderedDict()
        self.next_response_params: ResponseParams | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self._asr_lock = asyncio.Lock()
        self._drained = asyncio.Event()
        self.closing = False
        #: (wall time, silence wait ms) of the latest end of turn, for the reply it starts.
        self._end_of_turn: tuple[float, float] = (time.perf_counter(), 0.0)

    # -- helpers --------------------------------------------------------------------------------

    def _vad_params(self) -> VADParams:
        td = self.config.turn_detection
        return VADParams(threshold=td.threshold if td is not None else 0.5)

    def _spawn(self, coro: Any, *, awaited: bool = False) -> asyncio.Task[Any]:
        """A task the session cancels when it closes. ``awaited``: its result (or failure)
        belongs to whoever awaits it (a turn's tokens), so a failure is not logged here."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._awaited_done if awaited else self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("session task failed", exc_info=task.exception())

    def _awaited_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an unawaited failure is not an asyncio warning

    @property
    def events_on(self) -> bool:
        return self.config.stepaudio.events

    def now(self) -> float:
        """The controller's time (see :data:`LEAD_MS` and :mod:`server.clock`)."""
        recv = self.clock.now()
        if self.config.turn_detection is None:  # manual turns: nothing waits for the VAD
            return recv
        behind = self.pump.backlog_ms > 0 or self.clock.audio_ms - self.vad_analysed_ms > FRAME_MS
        if behind:
            return min(recv, self.clock.at(self.vad_analysed_ms) + LEAD_MS)
        return recv

    def emit(self, event: ServerEvent, *, reply: Reply | None = None, audio_ms: float = 0.0,
             meta: Any = None) -> None:
        """Queue a server event (rendered in the session's dialect now)."""
        if event.type.startswith("stepaudio.") and not self.events_on:
            return
        wire = event.to_json(self.dialect)
        if wire is None:
            return
        if event.type == "error":
            self.metrics.errors.labels(event.error.code).inc()  # type: ignore[attr-defined]
        droppable = reply is not None and (isinstance(meta, tuple) or meta == "text")
        self.outbox.put(Outgoing(wire, len(wire), reply.rid if reply else None, audio_ms,
                                 droppable, (reply, meta) if reply else None))

    def error(self, err: ProtocolError) -> None:
        self.emit(err.to_event())

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes."""
        self.outbox.start()
        self.stages.pump.tickers.add(self._tick)
        self.emit(SessionCreated(session=self.config))
        self.emit(ProfileInfo(profile=self.stages.profile, note=self.stages.note,
                              models=self.stages.models))
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                await self.on_message(message)
                if self.outbox.closed:
                    break
        except ConnectionClosed:
            pass
        finally:
            await self.close()

    async def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.stages.pump.tickers.discard(self._tick)
        self.stages.pump.remove(self.pump)
        try:
            self._do(self.controller.close(self.now()))
        except Exception:
            log.exception("closing the controller failed")
        for reply in list(self.replies.values()):
            reply.cancel("session_closed")
        self.turn.discard()
        for task in list(self.tasks):
            task.cancel()
        await self.outbox.aclose()
        running = [r.task for r in self.replies.values() if not r.task.done()]
        if running:  # their cleanup (closing the LLM stream and the TTS) is short
            await asyncio.wait(running, timeout=5.0)
        self._forget()

    def _forget(self) -> None:
        """Let go of the conversation now. The session, its replies, its outbox and its pump
        client point at each other, so without this a closed session's history (megabytes of
        items) would wait for the cycle collector."""
        self.context.clear()
        self.items.clear()
        self.replies.clear()
        self.reply_by_item.clear()
        self.user_turns.clear()
        self.turn_items.clear()
        self.next_response_params = None

    async def shutdown(self, grace_s: float) -> None:
        """Server shutdown: stop replies, let queued events out for a moment, then close 1001."""
        self._do(self.controller.close(self.now()))
        await self.outbox.drain(grace_s)
        await self.outbox.close(1001, "server shutting down")

    # -- client events ----------------------------------------------------------------------------

    async def on_message(self, data: str | bytes) -> None:
        if len(data) > BIG_MESSAGE:
            event = await asyncio.to_thread(parse_client_event, data, self.max_event_bytes)
        else:
            event = parse_client_event(data, self.max_event_bytes)
        if isinstance(event, ProtocolError):
            self.error(event)
            return
        handler = getattr(self, "_on_" + type(event).__name__)
        try:
            result = handler(event)
            if asyncio.iscoroutine(result):
                await result
        except Exception as err:  # a bug in one event must not end the session
            log.exception("handling %s failed", event.type)
            self.error(ProtocolError(type="server_error", code="server_error",
                                     message=f"{event.type}: internal error: {err}"[:300],
                                     event_id=event.event_id))

    def _on_SessionUpdate(self, ev: SessionUpdate) -> None:
        new = apply_session_update(self.config, ev.session, ev.event_id)
        if isinstance(new, ProtocolError):
            self.error(new)
            return
        if new.voice != self.config.voice and new.audio_output:
            problem = self.stages.speech.check_voice(new.speaker)
            if problem:
                self.error(ProtocolError(code="invalid_value", param="session.voice",
                                         message=f"session.voice: {problem}",
                                         event_id=ev.event_id))
                return
        dialect = session_update_dialect(ev.session)
        if dialect in ("beta", "ga"):
            self.dialect = dialect  # type: ignore[assignment]
        was_manual = self.config.turn_detection is None
        self.config = new
        self.context.instructions = new.instructions
        self.pump.vad.params = self._vad_params()
        if was_manual != (new.turn_detection is None) and not self.controller.state.startswith(
                "user"):
            self.turn.discard()  # the other mode opens its utterances itself
        self._do(self.controller.configure(ControllerConfig.from_session(new), self.now()))
        self.emit(SessionUpdated(session=new))

    async def _on_InputAudioBufferAppend(self, ev: InputAudioBufferAppend) -> None:
        fmt = self.config.input_format
        samples = decode_audio(ev.raw, fmt, ev.event_id)
        if isinstance(samples, ProtocolError):
            self.error(samples)
            return
        if not len(samples):
            return
        self.clock.on_audio(1000.0 * len(samples) / fmt.rate)
        self.stages.pump.put(self.pump, fmt.rate, samples)
        self._do(self.controller.tick(self.now()))
        await self._backpressure()

    def _backlogged(self) -> bool:
        ring_ms = (self.turn.unfed_samples / 16.0)
        return (self.pump.backlog_ms > self.max_backlog_ms
                or self.turn.lag_samples / 16.0 > self.max_backlog_ms
                or ring_ms > (RING_SECONDS - 1.5) * 1000.0)

    async def _backpressure(self) -> None:
        if not self._backlogged():
            return
        self.metrics.input_paused.inc()
        while self._backlogged() and not self.closing:
            self._drained.clear()
            try:
                await asyncio.wait_for(self._drained.wait(), 0.05)
            except TimeoutError:
                pass

    def _on_InputAudioBufferCommit(self, ev: InputAudioBufferCommit) -> None:
        now = self.now()
        self._do(self.controller.commit_input(now, now - self.buffer_start), ev.event_id)

    def _on_InputAudioBufferClear(self, ev: InputAudioBufferClear) -> None:
        self._do(self.controller.clear_input(self.now()), ev.event_id)

    def _on_ResponseCreate(self, ev: ResponseCreate) -> None:
        params = ev.response
        if params is not None and params.voice:
            speaker = DEFAULT_VOICE if params.voice in OPENAI_VOICES else params.voice
            problem = self.stages.speech.check_voice(speaker)
            if problem:
                self.error(ProtocolError(code="invalid_value", param="response.voice",
                                         message=f"response.voice: {problem}",
                                         event_id=ev.event_id))
                return
        self.next_response_params = params
        self._do(self.controller.create_response(self.now()), ev.event_id)
        self.next_response_params = None

    def _on_ResponseCancel(self, ev: ResponseCancel) -> None:
        rid = None
        if ev.response_id is not None:
            rid = next((r.rid for r in self.replies.values()
                        if r.response.id == ev.response_id), -1)
        self._do(self.controller.cancel_response(self.now(), rid), ev.event_id)

    def _on_ConversationItemTruncate(self, ev: ConversationItemTruncate) -> None:
        rid = self.reply_by_item.get(ev.item_id)
        if rid is None:
            known = ev.item_id in self.context
            self.error(ProtocolError(
                code="invalid_value", param="item_id", event_id=ev.event_id,
                message=f"conversation.item.truncate: item {ev.item_id!r} "
                + ("is not an assistant reply with audio" if known else "does not exist")))
            return
        if ev.content_index != 0:
            self.error(ProtocolError(code="invalid_value", param="content_index",
                                     event_id=ev.event_id,
                                     message="conversation.item.truncate: content_index must be 0"))
            return
        self._do(self.controller.truncate(self.now(), rid, ev.audio_end_ms), ev.event_id)

    def _on_ConversationItemDelete(self, ev: ConversationItemDelete) -> None:
        try:
            self.context.delete(ev.item_id)
        except ContextError as err:
            self.error(ProtocolError(code="invalid_value", param="item_id", message=str(err),
                                     event_id=ev.event_id))
            return
        self.items.pop(ev.item_id, None)
        self.emit(ConversationItemDeleted(item_id=ev.item_id))
        self._do(self.controller.input_changed(self.now()))

    def _on_ConversationItemRetrieve(self, ev: ConversationItemRetrieve) -> None:
        item = self.items.get(ev.item_id)
        if item is None or ev.item_id not in self.context:
            self.error(ProtocolError(code="invalid_value", param="item_id", event_id=ev.event_id,
                                     message=f"no item {ev.item_id!r} in the conversation"))
            return
        rid = self.reply_by_item.get(ev.item_id)
        if rid is not None and rid in self.replies:
            reply = self.replies[rid]
            item = reply.final_item()
            if reply.truncated_ms is not None and item.content:  # what the user heard
                item.content[0].transcript = self.context.get(ev.item_id).spoken_text
        self.emit(ConversationItemRetrieved(item=item))

    async def _on_ConversationItemCreate(self, ev: ConversationItemCreate) -> None:
        item = item_from_client(ev.item)
        prev = ev.previous_item_id
        if prev is not None and prev not in self.context:
            self.error(ProtocolError(code="invalid_value", param="previous_item_id",
                                     event_id=ev.event_id,
                                     message=f"previous_item_id {prev!r} is not in the conversation"))
            return
        if item.id in self.context:
            self.error(ProtocolError(code="invalid_value", param="item.id", event_id=ev.event_id,
                                     message=f"an item {item.id!r} already exists"))
            return
        size = sum(utf8_len(p.text) + utf8_len(p.transcript) for p in ev.item.content or [])
        if size > self.max_item_bytes:
            self.error(ProtocolError(
                code="item_too_large", param="item.content", event_id=ev.event_id,
                message=f"conversation.item.create: the item's text is {size} bytes, over this "
                f"server's limit of {self.max_item_bytes} (server.max_item_bytes)"))
            return
        if not self.context.room_for(size):
            self.error(ProtocolError(
                code="conversation_full", param="item", event_id=ev.event_id,
                message=f"conversation.item.create: the conversation holds {self.context.nbytes} "
                f"bytes and this item would take it past {self.context.max_bytes} "
                "(server.max_history_bytes); delete items (conversation.item.delete) first"))
            return
        audio_ids: list[int] = []
        for part in ev.item.content or []:
            if part.type == "input_audio" and part.audio:
                raw = decode_base64(part.audio, "item.content.audio", ev.event_id)
                fmt = self.config.input_format
                samples = raw if isinstance(raw, ProtocolError) else decode_audio(raw, fmt,
                                                                                   ev.event_id)
                if isinstance(samples, ProtocolError):
                    self.error(samples)
                    return
                tokens = await self.stages.tokenizer.tokenize(np.asarray(samples), fmt.rate)
                audio_ids += tokens.ids
        text = "".join((p.text or p.transcript or "") for p in item.content)
        anchor = prev if prev is not None else self.context.last_item_id()
        try:
            if item.role == "user" and audio_ids:
                self.context.add_user_audio(item.id, audio_ids, prev)
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
            self.error(ProtocolError(code="invalid_value", param="item", message=str(err),
                                     event_id=ev.event_id))
            return
        self._remember(item.id, item)
        self.emit(ConversationItemCreated(previous_item_id=anchor, item=item))
        self.emit(ConversationItemDone(previous_item_id=anchor, item=item))
        self._do(self.controller.input_changed(self.now()))

    def _remember(self, item_id: str, item: Any) -> None:
        self.items[item_id] = item
        while len(self.items) > 2 * self.context.max_items:
            self.items.popitem(last=False)

    # -- the input pipeline ---------------------------------------------------------------------

    def _on_pump(self, res: PumpResult) -> None:
        if self.closing:
            return
        self.turn.append(res.audio16k)
        self.vad_analysed_ms = res.analysed_ms
        self.vad_settled_ms = res.settled_ms
        self.vad_speaking = res.speaking
        for ev in res.events:
            at, det = self.clock.at(ev.at_ms), self.clock.at(ev.detected_ms)
            if ev.kind == "speech_start":
                self._do(self.controller.speech_started(at, det))
            else:
                self.speech_end_ms = ev.at_ms
                self._do(self.controller.speech_stopped(at, det))
        self._feed_tokenizer()
        self._do(self.controller.tick(self.now()))
        if not self._backlogged():
            self._drained.set()

    def _feed_tokenizer(self) -> None:
        """Move the tokenizer's feed limit to the audio whose reading is settled."""
        if self.config.turn_detection is None:
            if not self.turn.is_open and self.clock.audio_ms > self.clock.audio_at(
                    self.buffer_start) + 1:
                self.turn.open(self.clock.audio_at(self.buffer_start))
            if self.turn.is_open:
                self.turn.set_limit(self.vad_analysed_ms + 1e6)  # all audio received
            return
        if not self.turn.is_open:
            return
        self.turn.set_limit(self.vad_settled_ms if self.vad_speaking else self.speech_end_ms)
        if (not self.vad_speaking
                and self.vad_analysed_ms - self.speech_end_ms >= self.config.stepaudio.pause_ms):
            # The turn may end here: its final ids are computed now, while the silence runs (the
            # speculative reply and the end of the turn read them). The end is named as the
            # controller names it (whole clock ms), so that all three ask for the same audio.
            self.turn.prepare(self.clock.audio_at(round(self.clock.at(self.speech_end_ms))))

    def _tick(self) -> None:
        if not self.closing:
            if self.config.turn_detection is None:
                self._feed_tokenizer()
            self._do(self.controller.tick(self.now()))

    # -- controller actions -----------------------------------------------------------------------

    def _turn_item(self, turn_id: int) -> str:
        item = self.turn_items.get(turn_id)
        if item is None:
            item = self.turn_items[turn_id] = new_id("item")
            while len(self.turn_items) > 64:
                del self.turn_items[next(iter(self.turn_items))]
        return item

    def _do(self, actions: list[ctl.Action], event_id: str | None = None) -> None:
        if not actions:
            return
        # A barge-in is announced first: the client flushes its playback on speech_started, then
        # hears about the cancelled reply and its truncation.
        front = [a for a in actions if isinstance(a, ctl.SpeechStarted) and a.barge_in]
        if front:
            front += [a for a in actions if isinstance(a, ctl.StateChange)
                      and a.reason == "barge_in"]
            actions = front + [a for a in actions if a not in front]
        # The state moves to bot_replying before the reply's own events go out.
        starting = [a for a in actions if isinstance(a, ctl.StateChange)
                    and a.reason == "response_started"]
        if starting:
            rest = [a for a in actions if a not in starting]
            k = next((i for i, a in enumerate(rest)
                      if isinstance(a, (ctl.CommitSpeculation, ctl.StartResponse))), len(rest))
            actions = rest[:k] + starting + rest[k:]
        spec_commits = {a.turn_id: a.response_id for a in actions
                        if isinstance(a, ctl.CommitSpeculation)}
        for a in actions:
            try:
                self._act(a, spec_commits, event_id)
            except Exception:
                log.exception("carrying out %s failed", type(a).__name__)

    def _act(self, a: ctl.Action, spec_commits: dict[int, int], event_id: str | None) -> None:
        if isinstance(a, ctl.StateChange):
            self.emit(StateChanged(state=a.state, previous=a.previous, reason=a.reason,
                                   at_ms=a.at_ms))
        elif isinstance(a, ctl.SpeechStarted):
            self.emit(SpeechStarted(audio_start_ms=a.audio_start_ms,
                                    item_id=self._turn_item(a.turn_id)))
            if self.config.turn_detection is not None:
                self.turn.open(self.clock.audio_at(a.audio_start_ms))
                self._feed_tokenizer()
        elif isinstance(a, ctl.SpeechStopped):
            self.emit(SpeechStopped(audio_end_ms=a.audio_end_ms,
                                    item_id=self._turn_item(a.turn_id)))
        elif isinstance(a, ctl.CommitInput):
            self._commit_input(a, spec_commits.get(a.turn_id))
        elif isinstance(a, ctl.InputCleared):
            self.turn.discard()
            self.buffer_start = self.now()
            self.emit(InputAudioBufferCleared())
        elif isinstance(a, ctl.StartSpeculation):
            self._start_speculation(a)
        elif isinstance(a, ctl.CancelSpeculation):
            reply = self.replies.pop(a.response_id, None)
            if reply is not None:
                reply.cancel(a.reason)
                self.metrics.speculations.labels("cancelled").inc()
                self.emit(SpeculationEvent(action="cancelled", speculation_id=reply.response.id,
                                           item_id=reply.user_item or "",
                                           audio_end_ms=int(reply.spec_end_ms), reason=a.reason))
        elif isinstance(a, ctl.CommitSpeculation):
            self._commit_speculation(a)
        elif isinstance(a, ctl.StartResponse):
            self._start_response(a)
        elif isinstance(a, ctl.CancelResponse):
            reply = self.replies.get(a.response_id)
            if reply is not None:
                self.outbox.purge(reply.rid)
                reply.cancel(a.reason)
                if reply.attached:
                    self._sync_segments(reply, partial=True)
        elif isinstance(a, ctl.TruncateResponse):
            self._truncate(a)
        elif isinstance(a, ctl.Reject):
            self.error(ProtocolError(code=a.code, message=a.message, event_id=event_id))

    def _commit_input(self, a: ctl.CommitInput, spec_rid: int | None) -> None:
        item_id = self._turn_item(a.turn_id)
        prev = self.context.last_item_id()
        end_audio = self.clock.audio_at(a.audio_end_ms)
        spec = self.replies.get(spec_rid) if spec_rid is not None else None
        if spec is not None and spec.tokens_future is not None:
            self.turn.discard()  # the speculation read these very tokens
            tokens: asyncio.Future[Tokens] = spec.tokens_future
            self.metrics.turns.labels("speculation").inc()
        else:
            if not self.turn.is_open and self.config.turn_detection is not None:
                self.turn.open(self.clock.audio_at(a.audio_start_ms))
            tokens = self._spawn(self.turn.finish(end_audio), awaited=True)
            self.metrics.turns.labels("vad" if self.config.turn_detection else "manual").inc()
        self.buffer_start = a.audio_end_ms
        ut = UserTurn(item_id, prev, tokens)
        self.user_turns[item_id] = ut
        while len(self.user_turns) > 16:
            self.user_turns.popitem(last=False)
        self.emit(InputAudioBufferCommitted(item_id=item_id, previous_item_id=prev))
        item = Item(id=item_id, role="user", content=[ContentPart(type="input_audio")])
        self._remember(item_id, item)
        self.emit(ConversationItemCreated(previous_item_id=prev, item=item))
        self.emit(ConversationItemDone(previous_item_id=prev, item=item))
        self._end_of_turn = (time.perf_counter(), max(0.0, self.now() - a.audio_end_ms))
        self._spawn(self._insert_user_turn(ut))

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
            self._spawn(self._transcribe(ut.item_id, tokens.ids))

    async def wait_user_turn(self, item_id: str) -> None:
        ut = self.user_turns.get(item_id)
        if ut is not None:
            await ut.inserted

    async def _transcribe(self, item_id: str, ids: list[int]) -> None:
        # After the reply's first audio: the transcription must not delay what the user waits for.
        for _ in range(500):
            if all(r.finished or r.t.first_sent is not None or r.held is not None
                   for r in self.replies.values()):
                break
            await asyncio.sleep(0.01)
        async with self._asr_lock:
            try:
                heard = await self.stages.chat.transcribe(ids)
            except Exception as err:
                if self.config.transcription is not None:
                    self.emit(TranscriptionFailed(item_id=item_id, error=ProtocolError(
                        type="server_error", code="transcription_failed", message=str(err)[:300])))
                return
        text = self.context.transcript_text(heard.text, cut=heard.cut)
        if self.context.set_transcript(item_id, text):
            item = self.items.get(item_id)
            if item is not None and item.content:
                item.content[0].transcript = text
        if self.config.transcription is not None:
            self.emit(TranscriptionCompleted(
                item_id=item_id, transcript=text,
                usage={"type": "duration", "seconds": round(len(ids) / 41.67, 2)}))

    # -- replies ----------------------------------------------------------------------------------

    def _settings(self, params: ResponseParams | None) -> ReplySettings:
        c = self.config
        instructions, voice, audio = c.instructions, c.voice, c.audio_output
        fmt, temp, maxt = c.output_format, c.temperature, c.max_output_tokens
        tags = c.tts_instruction
        metadata = None
        if params is not None:
            if params.instructions is not None:
                instructions = params.instructions
            if params.voice:
                voice = params.voice
            mods = params.modalities or params.output_modalities
            if mods:
                audio = "audio" in mods
            if params.output_audio_format:
                fmt = AudioFormat(kind=params.output_audio_format)
            if params.audio and params.audio.output:
                if params.audio.output.format is not None:
                    fmt = AudioFormat(kind=_FORMAT_FROM_GA[params.audio.output.format.type])
                if params.audio.output.voice:
                    voice = params.audio.output.voice
            if params.temperature is not None:
                temp = params.temperature
            for m in (params.max_response_output_tokens, params.max_output_tokens):
                if m is not None:
                    maxt = m
            if params.stepaudio and params.stepaudio.instruction is not None:
                tags = params.stepaudio.instruction
            metadata = params.metadata
        speaker = DEFAULT_VOICE if voice in OPENAI_VOICES else voice
        return ReplySettings(
            instructions=instructions, speaker=speaker, voice=voice, tts_instruction=tags,
            audio_output=audio, output_format=fmt, temperature=temp,
            max_output_tokens=None if maxt == "inf" else int(maxt),  # type: ignore[arg-type]
            max_output_tokens_wire=maxt, metadata=metadata)

    def _keep(self, reply: Reply) -> None:
        self.replies[reply.rid] = reply
        while len(self.replies) > MAX_REPLIES_KEPT:
            rid, old = next(iter(self.replies.items()))
            if not old.finished:
                break
            del self.replies[rid]
            self.reply_by_item.pop(old.item.id, None)

    def _start_speculation(self, a: ctl.StartSpeculation) -> None:
        end_audio = self.clock.audio_at(a.audio_end_ms)
        tokens = self._spawn(self.turn.snapshot(end_audio), awaited=True)
        reply = Reply(self, a.response_id, self._settings(None), speculative=True, tokens=tokens,
                      user_item=self._turn_item(a.turn_id), pending_audio=True)
        reply.spec_end_ms = a.audio_end_ms
        self._keep(reply)
        self.emit(SpeculationEvent(action="started", speculation_id=reply.response.id,
                                   item_id=reply.user_item or "", audio_end_ms=a.audio_end_ms))

    def _created(self, reply: Reply) -> None:
        snapshot = reply.response.model_copy(update={"status": "in_progress", "output": [],
                                                     "usage": None, "reason": None})
        self.emit(ResponseCreated(response=snapshot))

    def _commit_speculation(self, a: ctl.CommitSpeculation) -> None:
        reply = self.replies.get(a.response_id)
        if reply is None:
            return
        self.metrics.speculations.labels("committed").inc()
        self.emit(SpeculationEvent(action="committed", speculation_id=reply.response.id,
                                   item_id=reply.user_item or "",
                                   audio_end_ms=int(reply.spec_end_ms)))
        reply.t.end_of_turn, reply.t.silence_wait_ms = self._end_of_turn
        self._created(reply)
        self.reply_by_item[reply.item.id] = reply.rid
        if reply.prompt is not None:
            self.attach_assistant(reply)
        reply.commit()
        if reply.finished:
            self._reply_done(reply)

    def _start_response(self, a: ctl.StartResponse) -> None:
        tokens = None
        user_item = None
        if a.turn_id is not None:
            user_item = self._turn_item(a.turn_id)
            ut = self.user_turns.get(user_item)
            tokens = ut.tokens if ut is not None else None
        reply = Reply(self, a.response_id, self._settings(self.next_response_params),
                      speculative=False, tokens=tokens, user_item=user_item, pending_audio=False)
        if a.reason == "end_of_turn":
            reply.t.end_of_turn, reply.t.silence_wait_ms = self._end_of_turn
        else:
            reply.t.end_of_turn = time.perf_counter()
        self._keep(reply)
        self.reply_by_item[reply.item.id] = reply.rid
        self._created(reply)

    def prompt_inputs(self, reply: Reply, pending: list[int] | None
                      ) -> tuple[str | None, list[tuple[str, str]], list[int] | None, str | None]:
        instr = reply.settings.instructions
        system, history, audio = self.context.chat_inputs(pending or None, instr)
        text_prompt = None if audio is not None else self.context.build_prompt(None, instr)
        return system, history, audio, text_prompt

    def attach_assistant(self, reply: Reply) -> None:
        """Put a (committed) reply into the history, after its user turn (which may still be
        waiting for its final tokens: then the reply joins once the turn is in)."""
        if reply.attached or reply.attaching:
            return
        reply.attaching = True
        ut = self.user_turns.get(reply.user_item or "")
        if ut is not None and not ut.inserted.done():
            self._spawn(self._attach_after_turn(reply, ut))
        else:
            self._attach(reply)

    async def _attach_after_turn(self, reply: Reply, ut: UserTurn) -> None:
        try:
            await ut.inserted
        except Exception:  # the turn's tokens failed: the reply still goes into the history
            pass
        self._attach(reply)

    def _attach(self, reply: Reply) -> None:
        prev = reply.user_item if reply.user_item in self.context else None
        try:
            self.context.add_assistant(reply.item.id, prev)
        except ContextError as err:
            log.warning("reply %s not stored: %s", reply.item.id, err)
            return
        reply.attached = True
        self._remember(reply.item.id, reply.item)
        if reply.done_sent:  # it finished before it could join: catch up at once
            self._finish_in_history(reply)
        else:
            self._sync_segments(reply, partial=False)

    def _finish_in_history(self, reply: Reply) -> None:
        """Everything the reply sent is out: the history gets what was spoken, and the reply
        joins the prompts."""
        if reply.item.id not in self.context:
            return
        self._sync_segments(reply, partial=True)
        if reply.truncated_ms is not None:
            try:
                self.context.truncate(reply.item.id, min(
                    reply.truncated_ms, self.context.get(reply.item.id).audio_ms))
            except ContextError:
                pass
        self.context.finish_assistant(reply.item.id)

    def _sync_segments(self, reply: Reply, partial: bool) -> None:
        """Bring the history's copy of a reply up to the audio actually sent."""
        if not reply.attached or reply.item.id not in self.context:
            return
        segs = reply.segments(partial_last=partial)
        for text, ms in segs[reply.segments_applied:]:
            self.context.add_assistant_segment(reply.item.id, text, ms)
        reply.segments_applied = len(segs)
        if not reply.settings.audio_output and reply.finished:
            turn = self.context.get(reply.item.id)
            if not turn.text:
                self.context.add_assistant_text(reply.item.id, reply.text)

    def reply_finished(self, reply: Reply) -> None:
        """Generation ended (completed, incomplete or failed)."""
        if reply.held is not None:  # a speculation: the client does not know it yet
            if reply.status == "failed":
                self.replies.pop(reply.rid, None)
                self._do(self.controller.speculation_failed(self.now(), reply.rid))
            return
        self._reply_done(reply)

    def _reply_done(self, reply: Reply) -> None:
        self.metrics.responses.labels(reply.status).inc()
        self._do(self.controller.response_done(self.now(), reply.rid))
        self._spawn(self._after_done(reply))

    async def _after_done(self, reply: Reply) -> None:
        # Timings once the last audio has left (the first audio may still be queued now).
        for _ in range(300):
            if reply.t.first_sent is not None or not reply.settings.audio_output:
                break
            await asyncio.sleep(0.01)
        timings = reply.timings()
        if "end_of_speech_to_first_audio" in timings:
            self.metrics.first_audio.labels(str(reply.speculative).lower()).observe(
                timings["end_of_speech_to_first_audio"] / 1000.0)
        if "server_overhead" in timings:
            self.metrics.overhead.observe(timings["server_overhead"] / 1000.0)
        for name in ("llm_first_token", "tts_first_audio"):
            if name in timings:
                self.metrics.stage_seconds.labels(name).observe(timings[name] / 1000.0)
        self.emit(Timings(response_id=reply.response.id, speculative=reply.speculative,
                          timings_ms=timings))

    def _truncate(self, a: ctl.TruncateResponse) -> None:
        reply = self.replies.get(a.response_id)
        if reply is None or not reply.settings.audio_output:
            return
        reply.truncated_ms = a.audio_end_ms
        if reply.attached and reply.item.id in self.context:
            self._sync_segments(reply, partial=True)
            try:
                self.context.truncate(reply.item.id, a.audio_end_ms)
            except ContextError as err:
                log.warning("truncating %s: %s", reply.item.id, err)
        self.emit(ConversationItemTruncated(item_id=reply.item.id, audio_end_ms=a.audio_end_ms))

    # -- the socket took a message ------------------------------------------------------------------

    def _on_sent(self, msg: Outgoing, wall: float) -> None:
        if msg.meta is None or self.closing:
            return
        reply, meta = msg.meta
        reply.on_sent(meta, msg.audio_ms, wall)
        if msg.audio_ms > 0:
            self._do(self.controller.response_audio(self.now(), reply.rid, msg.audio_ms))
            if reply.attached and reply.settings.audio_output:
                self._sync_segments(reply, partial=False)
        elif meta == "done":
            reply.done_sent = True
            if reply.attached:
                self._finish_in_history(reply)
