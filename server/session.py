"""One realtime connection: client events in, the controller's decisions carried out, events out.

The session is glue; decisions and records live elsewhere. The controller decides turn-taking (it
returns actions, carried out here in the order given, which is the wire's order), the
:class:`~server.conversation.Conversation` keeps the items, the user turns and the history true
to what was played, each :class:`~server.reply.Reply` runs one response, the stages in
``server/workers.py`` do all model work off the loop, and the :class:`~server.outbox.Outbox`
sends. What the session itself owns:

- the socket and the client events' handlers;
- the input path: base64 → samples → the turn clock → the VAD pump (one resampling to 16 kHz,
  shared with the tokenizer) → VAD events → the controller; the tokenizer stream is fed as the VAD
  confirms speech (``server/turn_input.py``);
- playback accounting: each reply message is reported (to the reply, the controller and the
  conversation) when the socket takes it, so a barge-in truncates to what was sent, or to what
  the client says it played;
- backpressure: past ``max_input_backlog_ms`` of unanalysed audio the session stops reading its
  socket until the workers catch up, so audio sent faster than real time cannot pile up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from server import controller as ctl
from server.clock import InputClock
from server.context import ContextManager
from server.controller import Controller, ControllerConfig
from server.conversation import Conversation
from server.outbox import Outbox, Outgoing, Sent, SentAudio, SentDone
from server.protocol import (
    ConversationItemCreate,
    ConversationItemDelete,
    ConversationItemRetrieve,
    ConversationItemTruncate,
    Dialect,
    InputAudioBufferAppend,
    InputAudioBufferClear,
    InputAudioBufferCleared,
    InputAudioBufferCommit,
    ProfileInfo,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    ResponseParams,
    ServerEvent,
    SessionConfig,
    SessionCreated,
    SessionUpdate,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    StateChanged,
    apply_session_update,
    decode_audio,
    new_id,
    parse_client_event,
    session_update_dialect,
    speaker_of,
)
from server.reply import Reply
from server.turn_input import RING_SECONDS, TurnInput
from server.waiting import TaskSet, first_of
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


@dataclass
class SessionEnv:
    """What every session of a server shares."""

    cfg: Config
    stages: Stages
    metrics: Metrics
    defaults: SessionConfig
    #: The wall clock (seconds) of the turn clock, the outbox and the timings; tests move it.
    wall: Callable[[], float] = time.perf_counter


class Session:
    """One WebSocket connection (see the module docstring)."""

    def __init__(self, ws: Any, env: SessionEnv, dialect: Dialect) -> None:
        self.ws = ws
        self.env = env
        self.wall = env.wall
        self.stages = env.stages
        self.metrics = env.metrics
        self.dialect: Dialect = dialect
        scfg = env.cfg.server
        self.config = env.defaults.model_copy(update={"id": new_id("sess")})
        self.controller = Controller(ControllerConfig.from_session(self.config))
        self.conversation = Conversation(self, ContextManager(
            instructions=self.config.instructions, max_tokens=self.stages.chat.budget,
            max_bytes=scfg.max_history_bytes))
        self.max_item_bytes = min(scfg.max_item_bytes, scfg.max_send_queue_bytes // 4)
        self.clock = InputClock(scfg.stall_grace_ms, env.wall)
        self.turn = TurnInput(self.stages.tokenizer)
        self.pump = self.stages.pump.client(self._vad_params(), self._on_pump)
        self.outbox: Outbox[Reply] = Outbox(ws, scfg.max_send_queue_bytes, self._on_sent,
                                            self.metrics.send_queue_bytes.inc, wall=env.wall)
        self.max_backlog_ms = float(scfg.max_input_backlog_ms)
        self.max_event_bytes = scfg.max_event_bytes
        self.vad_analysed_ms = 0.0
        self.vad_settled_ms = 0.0
        self.vad_speaking = False
        self.speech_end_ms = 0.0  # audio ms where the last speech ended
        self.buffer_start = 0.0  # clock ms where the uncommitted input begins
        self.next_response_params: ResponseParams | None = None
        self.tasks = TaskSet()
        self._drained = asyncio.Event()
        self.closing = False
        #: (wall time, silence wait ms) of the latest end of turn, for the reply it starts.
        self._end_of_turn: tuple[float, float | None] = (env.wall(), 0.0)

    # -- helpers --------------------------------------------------------------------------------

    def _vad_params(self) -> VADParams:
        td = self.config.turn_detection
        return VADParams(threshold=td.threshold if td is not None else 0.5)

    def spawn(self, coro: Coroutine[Any, Any, Any], *, awaited: bool = False
              ) -> asyncio.Task[Any]:
        """A task that ends with the session (see :class:`~server.waiting.TaskSet`)."""
        return self.tasks.spawn(coro, awaited=awaited)

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
             sent: Sent | None = None) -> None:
        """Queue a server event (rendered in the session's dialect now)."""
        if event.type.startswith("stepaudio.") and not self.config.stepaudio.events:
            return
        wire = event.to_json(self.dialect)
        if wire is None:
            return
        if event.type == "error":
            self.metrics.errors.labels(event.error.code).inc()  # type: ignore[attr-defined]
        self.outbox.put(Outgoing(wire, len(wire), reply, audio_ms, sent))

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
        self._drained.set()
        self.stages.pump.tickers.discard(self._tick)
        self.stages.pump.remove(self.pump)
        try:
            self._do(self.controller.close(self.now()))
        except Exception:
            log.exception("closing the controller failed")
        replies = list(self.conversation.replies.values())
        for reply in replies:
            reply.cancel("session_closed")
        self.turn.discard()
        self.tasks.cancel()
        await self.outbox.aclose()
        running = [r.task for r in replies if not r.task.done()]
        if running:  # their cleanup (closing the LLM stream and the TTS) is short
            await asyncio.wait(running, timeout=5.0)
        # The session, its replies, its outbox and its pump client point at each other: let go
        # of the conversation now, not at the next collection of reference cycles.
        self.conversation.forget()
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
        if new.voice != self.config.voice and new.audio_output and not self._voice_ok(
                new.voice, "session.voice", ev.event_id):
            return
        dialect = session_update_dialect(ev.session)
        if isinstance(dialect, str):
            self.dialect = dialect
        was_manual = self.config.turn_detection is None
        self.config = new
        self.conversation.context.instructions = new.instructions
        self.pump.vad.params = self._vad_params()
        if was_manual != (new.turn_detection is None) and not self.controller.state.startswith(
                "user"):
            self.turn.discard()  # the other mode opens its utterances itself
        self._do(self.controller.configure(ControllerConfig.from_session(new), self.now()))
        self.emit(SessionUpdated(session=new))

    def _voice_ok(self, voice: str, param: str, event_id: str | None) -> bool:
        """Whether the synthesizer has this voice's speaker; if not, the client is told."""
        problem = self.stages.speech.check_voice(speaker_of(voice))
        if problem:
            self.error(ProtocolError(code="invalid_value", param=param,
                                     message=f"{param}: {problem}", event_id=event_id))
        return not problem

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
        """Stop reading the socket while the input is backlogged. The pump's results wake this;
        the tokenizer's progress does not, so it looks again every 50 ms as well."""
        if not self._backlogged():
            return
        self.metrics.input_paused.inc()
        while self._backlogged() and not self.closing:
            self._drained.clear()
            await first_of([self._drained], 0.05)

    def _on_InputAudioBufferCommit(self, ev: InputAudioBufferCommit) -> None:
        now = self.now()
        self._do(self.controller.commit_input(now, now - self.buffer_start), ev.event_id)

    def _on_InputAudioBufferClear(self, ev: InputAudioBufferClear) -> None:
        self._do(self.controller.clear_input(self.now()), ev.event_id)

    def _on_ResponseCreate(self, ev: ResponseCreate) -> None:
        params = ev.response
        if params is not None and params.voice and not self._voice_ok(
                params.voice, "response.voice", ev.event_id):
            return
        self.next_response_params = params
        self._do(self.controller.create_response(self.now()), ev.event_id)
        self.next_response_params = None

    def _on_ResponseCancel(self, ev: ResponseCancel) -> None:
        rid = None
        if ev.response_id is not None:
            rid = self.conversation.rid_of_response(ev.response_id)
        self._do(self.controller.cancel_response(self.now(), rid), ev.event_id)

    def _on_ConversationItemTruncate(self, ev: ConversationItemTruncate) -> None:
        rid = self.conversation.truncatable(ev)
        if isinstance(rid, ProtocolError):
            self.error(rid)
            return
        self._do(self.controller.truncate(self.now(), rid, ev.audio_end_ms), ev.event_id)

    def _on_ConversationItemDelete(self, ev: ConversationItemDelete) -> None:
        problem = self.conversation.delete_item(ev.item_id, ev.event_id)
        if problem is not None:
            self.error(problem)
            return
        self._do(self.controller.input_changed(self.now()))

    def _on_ConversationItemRetrieve(self, ev: ConversationItemRetrieve) -> None:
        problem = self.conversation.retrieve_item(ev.item_id, ev.event_id)
        if problem is not None:
            self.error(problem)

    async def _on_ConversationItemCreate(self, ev: ConversationItemCreate) -> None:
        problem = await self.conversation.create_item(ev, self.config.input_format,
                                                      self.max_item_bytes)
        if problem is not None:
            self.error(problem)
            return
        self._do(self.controller.input_changed(self.now()))

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

    def _do(self, actions: list[ctl.Action], event_id: str | None = None) -> None:
        """Carry out the controller's actions in the order given (the wire's order)."""
        for a in actions:
            try:
                self._act(a, event_id)
            except Exception:
                log.exception("carrying out %s failed", type(a).__name__)

    def _act(self, a: ctl.Action, event_id: str | None) -> None:
        conv = self.conversation
        if isinstance(a, ctl.StateChange):
            self.emit(StateChanged(state=a.state, previous=a.previous, reason=a.reason,
                                   at_ms=a.at_ms))
        elif isinstance(a, ctl.SpeechStarted):
            self.emit(SpeechStarted(audio_start_ms=a.audio_start_ms,
                                    item_id=conv.item_for_turn(a.turn_id)))
            if self.config.turn_detection is not None:
                self.turn.open(self.clock.audio_at(a.audio_start_ms))
                self._feed_tokenizer()
        elif isinstance(a, ctl.SpeechStopped):
            self.emit(SpeechStopped(audio_end_ms=a.audio_end_ms,
                                    item_id=conv.item_for_turn(a.turn_id)))
        elif isinstance(a, ctl.CommitInput):
            self._commit_input(a)
        elif isinstance(a, ctl.InputCleared):
            self.turn.discard()
            self.buffer_start = self.now()
            self.emit(InputAudioBufferCleared())
        elif isinstance(a, ctl.StartSpeculation):
            self._start_speculation(a)
        elif isinstance(a, ctl.CancelSpeculation):
            reply = conv.drop_reply(a.response_id)
            if reply is not None:
                reply.cancel(a.reason)
                self.metrics.speculations.labels("cancelled").inc()
                self.emit(reply.speculation_event("cancelled", a.reason))
        elif isinstance(a, ctl.CommitSpeculation):
            self._commit_speculation(a)
        elif isinstance(a, ctl.StartResponse):
            self._start_response(a)
        elif isinstance(a, ctl.CancelResponse):
            reply = conv.reply(a.response_id)
            if reply is not None:
                self.outbox.purge(reply)
                reply.cancel(a.reason)
                conv.cut(reply)
        elif isinstance(a, ctl.TruncateResponse):
            reply = conv.reply(a.response_id)
            if reply is not None:
                conv.truncate(reply, a.audio_end_ms)
        elif isinstance(a, ctl.Reject):
            self.error(ProtocolError(code=a.code, message=a.message, event_id=event_id))

    def _commit_input(self, a: ctl.CommitInput) -> None:
        item_id = self.conversation.item_for_turn(a.turn_id)
        spec = self.conversation.reply(a.speculation) if a.speculation is not None else None
        if spec is not None and spec.tokens_future is not None:
            self.turn.discard()  # the speculation read these very tokens
            tokens: asyncio.Future[Tokens] = spec.tokens_future
            self.metrics.turns.labels("speculation").inc()
        else:
            if not self.turn.is_open and self.config.turn_detection is not None:
                self.turn.open(self.clock.audio_at(a.audio_start_ms))
            end_audio = self.clock.audio_at(a.audio_end_ms)
            tokens = self.spawn(self.turn.finish(end_audio), awaited=True)
            self.metrics.turns.labels("vad" if self.config.turn_detection else "manual").inc()
        self.buffer_start = a.audio_end_ms
        self.conversation.commit_user_turn(item_id, tokens)
        self._end_of_turn = (self.wall(), max(0.0, self.now() - a.audio_end_ms))

    # -- replies ----------------------------------------------------------------------------------

    def _start_speculation(self, a: ctl.StartSpeculation) -> None:
        end_audio = self.clock.audio_at(a.audio_end_ms)
        tokens = self.spawn(self.turn.snapshot(end_audio), awaited=True)
        reply = Reply(self, a.response_id, self.config.reply_settings(), speculative=True,
                      tokens=tokens, user_item=self.conversation.item_for_turn(a.turn_id),
                      spec_end_ms=a.audio_end_ms)
        self.conversation.add_reply(reply)
        self.emit(reply.speculation_event("started"))

    def _commit_speculation(self, a: ctl.CommitSpeculation) -> None:
        reply = self.conversation.reply(a.response_id)
        if reply is None:
            return
        self.metrics.speculations.labels("committed").inc()
        self.emit(reply.speculation_event("committed"))
        self.emit(reply.created_event())
        self.conversation.commit(reply)
        reply.commit(self._end_of_turn)
        if reply.finished:
            self._reply_done(reply)

    def _start_response(self, a: ctl.StartResponse) -> None:
        user_item = self.conversation.item_for_turn(a.turn_id) if a.turn_id is not None else None
        tokens = self.conversation.tokens_of(user_item) if user_item is not None else None
        end_of_turn = self._end_of_turn if a.reason == "end_of_turn" else (self.wall(), None)
        reply = Reply(self, a.response_id, self.config.reply_settings(self.next_response_params),
                      speculative=False, tokens=tokens, user_item=user_item,
                      end_of_turn=end_of_turn)
        self.conversation.add_reply(reply)
        self.emit(reply.created_event())

    def reply_finished(self, reply: Reply) -> None:
        """Generation ended (completed, incomplete or failed)."""
        if reply.held is not None:  # a speculation: the client does not know it yet
            if reply.status == "failed":
                self.conversation.drop_reply(reply.rid)
                self._do(self.controller.speculation_failed(self.now(), reply.rid))
            return
        self._reply_done(reply)

    def _reply_done(self, reply: Reply) -> None:
        self.metrics.responses.labels(reply.status).inc()
        self._do(self.controller.response_done(self.now(), reply.rid))
        self.spawn(reply.report_timings(self.metrics))

    # -- the socket took a message ------------------------------------------------------------------

    def _on_sent(self, msg: Outgoing[Reply], wall: float) -> None:
        reply, sent = msg.reply, msg.sent
        if reply is None or sent is None or self.closing:
            return
        reply.on_sent(sent, wall)
        if isinstance(sent, SentAudio):
            self.conversation.clause_sent(reply, sent, msg.audio_ms)
            self._do(self.controller.response_audio(self.now(), reply.rid, msg.audio_ms))
        elif isinstance(sent, SentDone):
            self.conversation.done_sent(reply)
