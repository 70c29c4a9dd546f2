"""One response: prompt → chat model text → TTS by clause → wire audio, with held output for
speculation and one way to stop.

A speculative reply runs exactly like a committed one, except that its events are held back (the
client has not been told about it yet). Committing releases them in order behind
``response.created``; cancelling throws them away. Held audio is bounded: past
:data:`HOLD_LIMIT_MS` the reply stops pulling from the TTS until it is committed or cancelled.

Interruption is one method, :meth:`Reply.cancel`: it stops the LLM and the TTS at once (each
checks its flag between steps), and, if the client was already hearing the reply, sends the
closing events so ``response.done`` (cancelled) follows the barge-in immediately.

Failure is one path too: an exception in any stage (tokenizer, prompt, chat model, speech, wire
encoding) ends the reply with an ``error`` event and ``response.done`` (failed, the stage and the
reason in ``status_details``). The chat model and the speech run side by side, and the first of
them to fail stops the other: a chat backend that dies mid-reply must not leave the speech
waiting for text that never comes.

Each message of the reply carries a tag (:mod:`server.outbox`'s ``Sent*``) that comes back when
the socket takes it (:meth:`Reply.on_sent`): the reply keeps its captions and first-audio time;
the session tells the controller (playback) and the conversation (the clause sent, with its ms of
audio), which keeps the history to what was actually heard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from server.outbox import Sent, SentAudio, SentCaption, SentDone, SentText
from server.protocol import (
    AudioDelta,
    AudioDone,
    AudioTranscriptDelta,
    AudioTranscriptDone,
    ContentPart,
    ContentPartAdded,
    ContentPartDone,
    ConversationItemCreated,
    ConversationItemDone,
    ErrorEvent,
    Item,
    OutputItemAdded,
    OutputItemDone,
    Part,
    ProtocolError,
    ReplySettings,
    Response,
    ResponseCreated,
    ResponseDone,
    ServerEvent,
    SessionConfig,
    SpeculationEvent,
    TextDelta,
    TextDone,
    Timings,
    Usage,
    new_id,
)
from server.waiting import first_of, side_by_side
from server.workers import Prompt, SpeechStream, Stages, Tokens, new_seed
from stepaudio.audio import StreamingResampler
from stepaudio.errors import StepAudioError
from stepaudio.llm.engine import FinishReason, Generation
from stepaudio.llm.pool import CONVERSATION
from stepaudio.tts.text import split_leading_tags

if TYPE_CHECKING:
    from collections.abc import Callable

    from server.conversation import Conversation
    from server.metrics import Metrics

log = logging.getLogger(__name__)

#: A speculation holds at most this much audio before it waits for its commit.
HOLD_LIMIT_MS = 3000.0


class StageFailed(Exception):
    """A model stage raised during a reply; the message names the stage."""

    def __init__(self, stage: str, err: BaseException) -> None:
        super().__init__(f"{stage}: {err}")
        self.stage = stage
        self.err = err


@contextlib.contextmanager
def _stage(name: str) -> Iterator[None]:
    """Name the stage of whatever fails in this block (for the client's error and the log)."""
    try:
        yield
    except (StageFailed, asyncio.CancelledError):
        raise
    except Exception as err:
        raise StageFailed(name, err) from err


class ReplyHost(Protocol):
    """What a reply needs from its session."""

    stages: Stages
    config: SessionConfig
    conversation: Conversation
    wall: Callable[[], float]

    def emit(self, event: ServerEvent, *, reply: Reply | None = None, audio_ms: float = 0.0,
             sent: Sent | None = None) -> None: ...

    def reply_finished(self, reply: Reply) -> None: ...


def _speakable(clause: str) -> str:
    """A clause as caption/history text: without the instruction tags repeated in front of it."""
    return split_leading_tags(clause)[1]


@dataclass
class Clock:
    """Wall times (the session's clock) of one reply, for ``stepaudio.timings`` and the
    metrics."""

    created: float
    end_of_turn: float | None = None  # the deliberate silence wait ended here
    silence_wait_ms: float | None = None  # end of speech → end of turn (input clock)
    tokens: Tokens | None = None
    prompt_ms: float = 0.0
    llm_start: float | None = None
    llm_first: float | None = None
    llm_end: float | None = None
    tts_start: float | None = None
    tts_first: float | None = None
    tts_end: float | None = None
    first_ready: float | None = None  # first audio (or text) ready to send
    first_sent: float | None = None


class Reply:
    """One response, from its prompt to ``response.done``."""

    def __init__(self, host: ReplyHost, rid: int, settings: ReplySettings, *, speculative: bool,
                 tokens: asyncio.Future[Tokens] | None, user_item: str | None,
                 end_of_turn: tuple[float, float | None] | None = None,
                 spec_end_ms: int = 0) -> None:
        self.host = host
        self.rid = rid
        self.settings = settings
        self.speculative = speculative
        self.held: list[tuple[ServerEvent, float, Sent | None]] | None = (
            [] if speculative else None)
        self.held_audio_ms = 0.0
        self._released = asyncio.Event()
        self.tokens_future = tokens
        self.user_item = user_item
        #: A speculation: where the user's audio it answers ends (ms, for its events).
        self.spec_end_ms = spec_end_ms
        self.response = Response(
            id=new_id("resp"),
            audio_output=settings.audio_output,
            output_format=settings.output_format,
            voice=settings.voice,
            max_output_tokens=settings.max_output_tokens_wire,
            metadata=settings.metadata,
        )
        kind: Literal["audio", "text"] = "audio" if settings.audio_output else "text"
        self.item = Item(id=new_id("item"), role="assistant", status="in_progress",
                         content=[ContentPart(type=kind, transcript="" if kind == "audio" else None,
                                              text="" if kind == "text" else None)])
        self.text = ""  # everything the LLM wrote
        self.transcript = ""  # captions sent (clauses whose audio started)
        self.prompt: Prompt | None = None
        self.status: str = "in_progress"
        self.finished = False
        #: Set when the reply ends (completed, incomplete, failed or cancelled).
        self.ended = asyncio.Event()
        #: Set when its first audio has reached the socket.
        self.audio_out = asyncio.Event()
        #: Set when its ``response.done`` has reached the socket (nothing of it follows).
        self.done_out = asyncio.Event()
        self.closed_sent = False
        self.started_sent = False
        self.committed = not speculative
        self.t = Clock(created=host.wall())
        self.spec_started = self.t.created if speculative else None
        if end_of_turn is not None:
            self.t.end_of_turn, self.t.silence_wait_ms = end_of_turn
        self.usage = Usage()
        self._gen: Generation | None = None
        self._tts: SpeechStream | None = None
        self._resampler: StreamingResampler | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"reply-{rid}")

    # -- output ---------------------------------------------------------------------------------

    def _emit(self, event: ServerEvent, audio_ms: float = 0.0, sent: Sent | None = None) -> None:
        if self.held is not None:
            self.held.append((event, audio_ms, sent))
            self.held_audio_ms += audio_ms
            return
        self.host.emit(event, reply=self, audio_ms=audio_ms, sent=sent)

    def commit(self, end_of_turn: tuple[float, float | None]) -> None:
        """The speculation becomes the reply to the turn that ended at ``end_of_turn`` (wall
        time, silence wait ms): release what it held, in order, and go live."""
        self.t.end_of_turn, self.t.silence_wait_ms = end_of_turn
        held, self.held = self.held or [], None
        self.committed = True
        for event, audio_ms, sent in held:
            self.host.emit(event, reply=self, audio_ms=audio_ms, sent=sent)
        self._released.set()

    def created_event(self) -> ResponseCreated:
        return ResponseCreated(response=self.response.model_copy(update={
            "status": "in_progress", "output": [], "usage": None, "reason": None}))

    def speculation_event(self, action: Literal["started", "committed", "cancelled"],
                          reason: str | None = None) -> SpeculationEvent:
        return SpeculationEvent(action=action, speculation_id=self.response.id,
                                item_id=self.user_item or "", audio_end_ms=self.spec_end_ms,
                                reason=reason)

    # -- control ----------------------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """Stop now: LLM and TTS within one step; the closing events go out at once."""
        if self._gen is not None:
            self._gen.cancel()
        if self._tts is not None:
            self._tts.cancel()
        if not self.task.done():
            self.task.cancel()
        self._released.set()
        if self.finished:
            return
        self.finished = True
        self.ended.set()
        self.status = "cancelled"
        self.response.reason = reason
        if self.held is not None:  # never seen by the client: nothing to close
            self.held = []
            return
        self._send_closing("cancelled")

    # -- the pipeline -----------------------------------------------------------------------------

    def _ids(self) -> dict[str, Any]:
        return {"response_id": self.response.id, "item_id": self.item.id}

    def _emit_start(self) -> None:
        self._emit(OutputItemAdded(response_id=self.response.id, item=self.item))
        self._emit(ConversationItemCreated(previous_item_id=self.user_item, item=self.item))
        part = Part(type="audio", transcript="") if self.settings.audio_output else Part(
            type="text", text="")
        self._emit(ContentPartAdded(**self._ids(), part=part))
        self.started_sent = True

    async def _run(self) -> None:
        st = self.host.stages
        # Every model request of this reply (chat, speech) goes to its conversation's replica
        # of a pool, whose prefix cache holds the conversation so far (stepaudio.llm.pool).
        CONVERSATION.set(self.host.config.id)
        conv = self.host.conversation
        try:
            pending: list[int] | None = None
            if self.tokens_future is not None:
                with _stage("audio tokenizer"):
                    tokens = await self.tokens_future
                self.t.tokens = tokens
                if self.speculative:  # the turn is not in the history yet: its audio is pending
                    pending = tokens.ids
            if self.user_item is not None and not self.speculative:
                with _stage("audio tokenizer"):
                    await conv.wait_user_turn(self.user_item)
            with _stage("prompt"):
                system, history, audio, text_prompt = conv.prompt_inputs(
                    self.settings.instructions, pending)
                t0 = self.host.wall()
                self.prompt = await st.chat.fit(system, history, audio, text_prompt)
            self.t.prompt_ms = (self.host.wall() - t0) * 1000.0
            self.usage.input_audio_tokens = self.prompt.audio_tokens
            self.usage.input_text_tokens = max(0, len(self.prompt.ids) - self.prompt.audio_tokens)
            if self.committed:
                conv.attach(self)
            self._emit_start()
            with _stage("chat model"):
                params = st.chat.params(self.settings.temperature, self.settings.max_output_tokens)
                self.t.llm_start = self.host.wall()
                gen = self._gen = st.chat.generate(self.prompt, params)
            if self.settings.audio_output:
                with _stage("speech synthesis"):
                    tts = self._tts = st.speech.open(self.settings.speaker, new_seed())
                    if self.settings.tts_instruction:
                        tts.push_text(self.settings.tts_instruction)
                await side_by_side(self._pump_llm(gen, tts), self._pump_audio(tts))
            else:
                await self._pump_llm(gen, None)
            reason = gen.finish_reason
            self._finish("incomplete" if reason is FinishReason.LENGTH else "completed")
        except asyncio.CancelledError:
            if not self.finished:  # cancelled from outside without cancel(): the session closed
                self.cancel("session_closed")
        except StageFailed as err:
            expected = isinstance(err.err, (StepAudioError, OSError))
            log.log(logging.WARNING if expected else logging.ERROR, "response %s failed in the "
                    "%s: %s", self.response.id, err.stage, err.err, exc_info=not expected)
            self._fail(err)
        except Exception as err:  # a bug ends this reply, never the session
            log.exception("response %s failed", self.response.id)
            self._fail(err)
        finally:
            for thing in (self._gen, self._tts):
                if thing is not None:
                    try:
                        await asyncio.shield(thing.aclose())
                    except BaseException:  # noqa: BLE001 - closing must not mask the outcome
                        pass

    async def _pump_llm(self, gen: Generation, tts: SpeechStream | None) -> None:
        with _stage("chat model"):
            await self._read_llm(gen, tts)
        if tts is not None:
            with _stage("speech synthesis"):
                tts.end_text()

    async def _read_llm(self, gen: Generation, tts: SpeechStream | None) -> None:
        async for delta in gen:
            if delta.text:
                if self.t.llm_first is None:
                    self.t.llm_first = self.host.wall()
                self.text += delta.text
                if tts is not None:
                    if self.t.tts_start is None:
                        self.t.tts_start = self.host.wall()
                    tts.push_text(delta.text)
                else:
                    if self.t.first_ready is None:
                        self.t.first_ready = self.host.wall()
                    self._emit(TextDelta(**self._ids(), delta=delta.text), sent=SentText())
        self.t.llm_end = self.host.wall()
        if gen.usage is not None:
            self.usage.output_text_tokens = gen.usage.completion_tokens

    async def _pump_audio(self, stream: SpeechStream) -> None:
        st = self.host.stages
        fmt = self.settings.output_format
        clause = -1
        tts = aiter(stream)
        while True:
            with _stage("speech synthesis"):
                try:
                    chunk = await anext(tts)
                except StopAsyncIteration:
                    break
            if self.t.tts_first is None:
                self.t.tts_first = self.host.wall()
            with _stage("audio encoding"):
                if self._resampler is None and chunk.sample_rate != fmt.rate:
                    self._resampler = StreamingResampler(chunk.sample_rate, fmt.rate)
                b64, n = await st.speech.encode(self._resampler, chunk.pcm, fmt)
            if n == 0:
                continue
            if self.t.first_ready is None:
                self.t.first_ready = self.host.wall()
            if chunk.clause != clause:
                clause = chunk.clause
                text = _speakable(chunk.text)
                if text:
                    self._emit(AudioTranscriptDelta(**self._ids(), delta=text),
                               sent=SentCaption(text))
            ms = 1000.0 * n / fmt.rate
            self._emit(AudioDelta(**self._ids(), delta=b64), audio_ms=ms,
                       sent=SentAudio(clause, _speakable(chunk.text)))
            if self.held is not None and self.held_audio_ms >= HOLD_LIMIT_MS:
                await self._released.wait()
        self.t.tts_end = self.host.wall()
        report = getattr(stream, "report", None)
        if report is not None:
            self.usage.output_audio_tokens = int(getattr(report, "flow_tokens", 0))

    # -- the end ----------------------------------------------------------------------------------

    def _fail(self, err: BaseException) -> None:
        """The reply ends here: an ``error`` event, then the closing events (failed). The audio
        already sent stays the reply's, and its history holds what that audio said."""
        if self.finished:
            return
        where = f"in the {err}" if isinstance(err, StageFailed) else f"(internal error: {err})"
        self.response.error = ProtocolError(type="server_error", code="response_failed",
                                            message=f"the reply failed {where}"[:300])
        self._emit(ErrorEvent(error=self.response.error))
        self._finish("failed")

    def _finish(self, status: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.ended.set()
        self.status = status
        if status == "incomplete":
            self.response.reason = "max_output_tokens"
        self._send_closing(status)
        self.host.reply_finished(self)

    def _send_closing(self, status: str) -> None:
        if self.closed_sent:
            return
        self.closed_sent = True
        ids = self._ids()
        if self.started_sent:
            if self.settings.audio_output:
                self._emit(AudioDone(**ids))
                self._emit(AudioTranscriptDone(**ids, transcript=self.transcript))
                part = Part(type="audio", transcript=self.transcript)
            else:
                self._emit(TextDone(**ids, text=self.text))
                part = Part(type="text", text=self.text)
            self._emit(ContentPartDone(**ids, part=part))
            item = self.final_item(status)
            self._emit(OutputItemDone(response_id=self.response.id, item=item))
            self._emit(ConversationItemDone(previous_item_id=self.user_item, item=item))
            self.response.output = [item]
        self.response.status = status  # type: ignore[assignment]
        self.response.usage = self.usage
        self._emit(ResponseDone(response=self.response), sent=SentDone())

    def final_item(self, status: str | None = None) -> Item:
        status = status or self.status
        kind = "audio" if self.settings.audio_output else "text"
        part = (ContentPart(type="audio", transcript=self.transcript) if kind == "audio"
                else ContentPart(type="text", text=self.text))
        return Item(id=self.item.id, role="assistant",
                    status="completed" if status == "completed" else "incomplete", content=[part])

    # -- what reached the socket (the session reports each message of this reply) ---------------

    def on_sent(self, sent: Sent, wall: float) -> None:
        if isinstance(sent, SentCaption):
            self.transcript += sent.text
        elif isinstance(sent, SentAudio):
            if self.t.first_sent is None:
                self.t.first_sent = wall
                self.audio_out.set()
        elif isinstance(sent, SentDone):
            self.done_out.set()

    async def report_timings(self, metrics: Metrics) -> None:
        """``stepaudio.timings`` (and the latency metrics) once the first audio has left (it may
        still be queued when generation ends), or the ``response.done`` without any."""
        if self.settings.audio_output:
            await first_of([self.audio_out, self.done_out], 3.0)
        timings = self.timings()
        metrics.observe_reply(timings, self.speculative)
        self.host.emit(Timings(response_id=self.response.id, speculative=self.speculative,
                               timings_ms=timings))

    def timings(self) -> dict[str, float]:
        """``stepaudio.timings`` for this reply (ms; names in docs/protocol.md)."""
        t = self.t

        def ms(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else round((b - a) * 1000.0, 2)

        out: dict[str, float | None] = {
            "tokenizer": round(t.tokens.compute_ms, 2) if t.tokens else None,
            "prompt": round(t.prompt_ms, 2),
            "llm_first_token": ms(t.llm_start, t.llm_first),
            "llm_total": ms(t.llm_start, t.llm_end),
            "tts_first_audio": ms(t.tts_start, t.tts_first),
            "tts_total": ms(t.tts_start, t.tts_end),
        }
        report = getattr(self._tts, "report", None)  # the synthesizer's own clock
        if report is not None and getattr(report, "first_request_at", None) is not None:
            out["tts_request_to_first_audio"] = ms(report.first_request_at, report.first_chunk_at)
        if t.end_of_turn is not None and t.first_sent is not None:
            after = (t.first_sent - t.end_of_turn) * 1000.0
            model = self.model_critical_ms()
            out["end_of_turn_to_first_audio"] = round(after, 2)
            out["model_critical_path"] = round(model, 2)
            out["server_overhead"] = round(max(0.0, after - model), 2)
            if t.silence_wait_ms is not None:
                out["silence_wait"] = round(t.silence_wait_ms, 2)
                out["end_of_speech_to_first_audio"] = round(t.silence_wait_ms + after, 2)
            if self.spec_started is not None and t.first_ready is not None:
                head = (t.end_of_turn - self.spec_started) * 1000.0
                ready = (t.first_ready - self.spec_started) * 1000.0
                out["speculation_saved"] = round(max(0.0, min(head, ready)), 2)
        return {k: v for k, v in out.items() if v is not None}

    def model_critical_ms(self) -> float:
        """Model compute between the end of the turn and the first audio being ready: the
        tokenizer's last call and the span from the LLM request to the TTS's first chunk, where
        they overlap that window. The rest of that window is the server's own overhead."""
        t = self.t
        if t.end_of_turn is None or t.first_ready is None:
            return 0.0
        lo, hi = t.end_of_turn, t.first_ready
        spans = []
        if t.tokens is not None and t.tokens.ended:
            spans.append((t.tokens.started, t.tokens.ended))
        first = t.tts_first if self.settings.audio_output else t.llm_first
        if t.llm_start is not None and first is not None:
            spans.append((t.llm_start, first))
        total, last = 0.0, lo
        for a, b in sorted(spans):
            a, b = max(a, last), min(b, hi)
            if b > a:
                total += b - a
                last = b
        return total * 1000.0
