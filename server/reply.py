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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.protocol import (
    AudioDelta,
    AudioDone,
    AudioFormat,
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
    Response,
    ResponseDone,
    ServerEvent,
    SessionConfig,
    TextDelta,
    TextDone,
    Usage,
    new_id,
)
from server.workers import Prompt, Stages, Tokens, new_seed
from stepaudio.audio import StreamingResampler
from stepaudio.errors import StepAudioError
from stepaudio.llm.engine import FinishReason
from stepaudio.llm.pool import CONVERSATION
from stepaudio.tts.text import split_leading_tags

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


async def _side_by_side(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines together until all are done; the first to fail cancels the others
    and its exception is raised (none is left running or unretrieved)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task in done and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class ReplySettings:
    """The session settings one reply uses, frozen at its start (plus ``response.create``'s
    overrides)."""

    instructions: str
    speaker: str
    voice: str
    tts_instruction: str
    audio_output: bool
    output_format: AudioFormat
    temperature: float | None
    max_output_tokens: int | None
    max_output_tokens_wire: int | str
    metadata: dict[str, str] | None = None


class ReplyHost(Protocol):
    """What a reply needs from its session."""

    stages: Stages
    config: SessionConfig

    def emit(self, event: ServerEvent, *, reply: Reply | None = None, audio_ms: float = 0.0,
             meta: Any = None) -> None: ...

    def prompt_inputs(self, reply: Reply, pending: list[int] | None
                      ) -> tuple[str | None, list[tuple[str, str]], list[int] | None, str | None]:
        ...

    async def wait_user_turn(self, item_id: str) -> None: ...

    def attach_assistant(self, reply: Reply) -> None: ...

    def reply_finished(self, reply: Reply) -> None: ...


def _speakable(clause: str) -> str:
    """A clause as caption/history text: without the instruction tags repeated in front of it."""
    return split_leading_tags(clause)[1]


#: Rough speaking rate to place a cut inside a clause that was interrupted before its audio was
#: complete (ms per character): CJK characters are syllables, Latin letters are not.
_MS_PER_CJK_CHAR = 230.0
_MS_PER_LATIN_CHAR = 65.0


def _spoken_prefix(text: str, audio_ms: float) -> str:
    """The part of ``text`` that ``audio_ms`` of speech probably covered."""
    total = sum(_MS_PER_LATIN_CHAR if c.isascii() else _MS_PER_CJK_CHAR for c in text)
    if total <= 0 or audio_ms >= total:
        return text
    return text[: int(len(text) * audio_ms / total)]


@dataclass
class Clock:
    """Wall times (perf_counter) of one reply, for ``stepaudio.timings`` and the metrics."""

    created: float = field(default_factory=time.perf_counter)
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
                 pending_audio: bool) -> None:
        self.host = host
        self.rid = rid
        self.settings = settings
        self.speculative = speculative
        self.held: list[tuple[ServerEvent, float, Any]] | None = [] if speculative else None
        self.held_audio_ms = 0.0
        self._released = asyncio.Event()
        self.tokens_future = tokens
        self.user_item = user_item
        #: The prompt reads the user's audio as a pending (uncommitted) turn: speculation.
        self.pending_audio = pending_audio
        self.response = Response(
            id=new_id("resp"),
            audio_output=settings.audio_output,
            output_format=settings.output_format,
            voice=settings.voice,
            max_output_tokens=settings.max_output_tokens_wire,  # type: ignore[arg-type]
            metadata=settings.metadata,
        )
        kind = "audio" if settings.audio_output else "text"
        self.item = Item(id=new_id("item"), role="assistant", status="in_progress",
                         content=[ContentPart(type=kind, transcript="" if kind == "audio" else None,
                                              text="" if kind == "text" else None)])
        self.text = ""  # everything the LLM wrote
        self.transcript = ""  # captions sent (clauses whose audio started)
        self.prompt: Prompt | None = None
        self.status: str = "in_progress"
        self.finished = False
        self.closed_sent = False
        self.started_sent = False
        self.committed = not speculative
        self.attached = False  # in the session's history
        self.attaching = False
        self.done_sent = False  # response.done has reached the socket
        self.t = Clock()
        self.spec_started = time.perf_counter() if speculative else None
        self.spec_end_ms = 0
        self.usage = Usage()
        self.flow_tokens = 0
        # audio sent, per clause, for the history: [(clause text, audio ms)]
        self.sent_clauses: list[list[Any]] = []
        self.segments_applied = 0
        self.truncated_ms: float | None = None
        self._gen: Any = None
        self._tts: Any = None
        self._resampler: StreamingResampler | None = None
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"reply-{rid}")

    # -- output ---------------------------------------------------------------------------------

    def _emit(self, event: ServerEvent, audio_ms: float = 0.0, meta: Any = None) -> None:
        if self.held is not None:
            self.held.append((event, audio_ms, meta))
            self.held_audio_ms += audio_ms
            return
        self.host.emit(event, reply=self, audio_ms=audio_ms, meta=meta)

    def commit(self) -> None:
        """The speculation becomes the reply: release what it held, in order, and go live."""
        held, self.held = self.held or [], None
        self.committed = True
        for event, audio_ms, meta in held:
            self.host.emit(event, reply=self, audio_ms=audio_ms, meta=meta)
        self._released.set()

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
        try:
            pending: list[int] | None = None
            if self.tokens_future is not None:
                with _stage("audio tokenizer"):
                    tokens = await self.tokens_future
                self.t.tokens = tokens
                if self.pending_audio:
                    pending = tokens.ids
            if self.user_item is not None and not self.pending_audio:
                with _stage("audio tokenizer"):
                    await self.host.wait_user_turn(self.user_item)
            with _stage("prompt"):
                system, history, audio, text_prompt = self.host.prompt_inputs(self, pending)
                t0 = time.perf_counter()
                self.prompt = await st.chat.fit(system, history, audio, text_prompt)
            self.t.prompt_ms = (time.perf_counter() - t0) * 1000.0
            self.usage.input_audio_tokens = self.prompt.audio_tokens
            self.usage.input_text_tokens = max(0, len(self.prompt.ids) - self.prompt.audio_tokens)
            if self.committed:
                self.host.attach_assistant(self)
            self._emit_start()
            with _stage("chat model"):
                params = st.chat.params(self.settings.temperature, self.settings.max_output_tokens)
                self.t.llm_start = time.perf_counter()
                self._gen = st.chat.generate(self.prompt, params)
            if self.settings.audio_output:
                with _stage("speech synthesis"):
                    self._tts = st.speech.open(self.settings.speaker, new_seed())
                    if self.settings.tts_instruction:
                        self._tts.push_text(self.settings.tts_instruction)
                await _side_by_side(self._pump_llm(), self._pump_audio())
            else:
                await self._pump_llm()
            reason = self._gen.finish_reason
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

    async def _pump_llm(self) -> None:
        with _stage("chat model"):
            await self._read_llm()
        if self._tts is not None:
            with _stage("speech synthesis"):
                self._tts.end_text()

    async def _read_llm(self) -> None:
        gen = self._gen
        async for delta in gen:
            if delta.text:
                if self.t.llm_first is None:
                    self.t.llm_first = time.perf_counter()
                self.text += delta.text
                if self._tts is not None:
                    if self.t.tts_start is None:
                        self.t.tts_start = time.perf_counter()
                    self._tts.push_text(delta.text)
                else:
                    if self.t.first_ready is None:
                        self.t.first_ready = time.perf_counter()
                    self._emit(TextDelta(**self._ids(), delta=delta.text), meta="text")
        self.t.llm_end = time.perf_counter()
        if gen.usage is not None:
            self.usage.output_text_tokens = gen.usage.completion_tokens

    async def _pump_audio(self) -> None:
        st = self.host.stages
        fmt = self.settings.output_format
        clause = -1
        tts = aiter(self._tts)
        while True:
            with _stage("speech synthesis"):
                try:
                    chunk = await anext(tts)
                except StopAsyncIteration:
                    break
            if self.t.tts_first is None:
                self.t.tts_first = time.perf_counter()
            with _stage("audio encoding"):
                if self._resampler is None and chunk.sample_rate != fmt.rate:
                    self._resampler = StreamingResampler(chunk.sample_rate, fmt.rate)
                b64, n = await st.speech.encode(self._resampler, chunk.pcm, fmt)
            if n == 0:
                continue
            if self.t.first_ready is None:
                self.t.first_ready = time.perf_counter()
            if chunk.clause != clause:
                clause = chunk.clause
                text = _speakable(chunk.text)
                if text:
                    self._emit(AudioTranscriptDelta(**self._ids(), delta=text),
                               meta=("caption", text))
            ms = 1000.0 * n / fmt.rate
            self._emit(AudioDelta(**self._ids(), delta=b64), audio_ms=ms,
                       meta=("audio", clause, _speakable(chunk.text)))
            if self.held is not None and self.held_audio_ms >= HOLD_LIMIT_MS:
                await self._released.wait()
        self.t.tts_end = time.perf_counter()
        report = getattr(self._tts, "report", None)
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
        self._emit(ResponseDone(response=self.response), meta="done")

    def final_item(self, status: str | None = None) -> Item:
        status = status or self.status
        kind = "audio" if self.settings.audio_output else "text"
        part = (ContentPart(type="audio", transcript=self.transcript) if kind == "audio"
                else ContentPart(type="text", text=self.text))
        return Item(id=self.item.id, role="assistant",
                    status="completed" if status == "completed" else "incomplete", content=[part])

    # -- playback accounting (called by the session as the socket takes each message) -------------

    def on_sent(self, meta: Any, audio_ms: float, wall: float) -> None:
        if not isinstance(meta, tuple):
            return
        if meta[0] == "caption":
            self.transcript += meta[1]
        elif meta[0] == "audio":
            if self.t.first_sent is None:
                self.t.first_sent = wall
            _, clause, text = meta
            if self.sent_clauses and self.sent_clauses[-1][0] == clause:
                self.sent_clauses[-1][2] += audio_ms
            else:
                self.sent_clauses.append([clause, text, audio_ms])

    def segments(self, partial_last: bool) -> list[tuple[str, float]]:
        """(text, audio ms) per clause sent so far; the clause still being spoken (unless the
        reply is over) is left out until its audio is complete, or cut by the speaking rate."""
        out = []
        for i, (_, text, ms) in enumerate(self.sent_clauses):
            last = i == len(self.sent_clauses) - 1
            if last and not self.finished:
                if not partial_last:
                    break
                text = _spoken_prefix(text, ms)
            elif last and self.status != "completed":
                text = _spoken_prefix(text, ms)
            out.append((text, ms))
        return out

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
