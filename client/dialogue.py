"""One spoken dialogue with the server: send audio in real time, play replies, report as it goes.

Three tasks share a :class:`Dialogue`: the sender (audio, paced like a live microphone, silence
whenever the user says nothing, so the server's turn clock keeps running), the reader (server
events → printed lines, playback, barge-in) and the script (which file to say when). Latency is
measured at the client, where the user waits: from the moment the last speech sample left (the end
of speech the server reports, mapped back to when that sample was sent) to the first reply audio.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from client.playback import Player
from client.realtime import (
    SAMPLE_RATE,
    ClientError,
    Connection,
    decode_pcm16,
    encode_pcm16,
    event_type,
)

TINY_NOTE = ("note: this server runs the tiny random-weight checkpoints, so the replies are "
             "babble: that is expected (the machinery is real, the words are not)")

#: The server's per-reply timings worth a line (``--verbose`` prints all of them).
TIMINGS = ("end_of_speech_to_first_audio", "silence_wait", "llm_first_token", "tts_first_audio",
           "server_overhead", "speculation_saved")


@dataclass
class Turn:
    """One reply as the client saw it."""

    response_id: str
    created: float
    end_of_speech: float | None  # monotonic time the user's last speech sample was sent
    first_audio: float | None = None
    done: float | None = None
    status: str = "in_progress"
    server_ms: float | None = None

    @property
    def latency_ms(self) -> float | None:
        if self.first_audio is None or self.end_of_speech is None:
            return None
        return (self.first_audio - self.end_of_speech) * 1000.0


@dataclass
class _SendClock:
    """Maps the server's input-audio clock (ms of audio sent) back to when it was sent."""

    speed: float
    sent_ms: float = 0.0
    marks: collections.deque[tuple[float, float]] = field(
        default_factory=lambda: collections.deque(maxlen=3000))

    def sent(self, samples: int) -> None:
        self.sent_ms += samples * 1000.0 / SAMPLE_RATE
        self.marks.append((self.sent_ms, time.monotonic()))

    def wall_at(self, ms: float) -> float:
        """When the sample at ``ms`` would have been spoken: its chunk's send time, less the part
        of the chunk after it (a live microphone sends a chunk once it is complete)."""
        for end_ms, t in self.marks:
            if end_ms >= ms:
                return t - (end_ms - ms) / 1000.0 / self.speed
        return time.monotonic()


class Dialogue:
    """The state of one session as the client tracks it."""

    def __init__(self, conn: Connection, player: Player, *, chunk_ms: int = 40,
                 speed: float = 1.0, verbose: bool = False, max_text: int = 240,
                 out: TextIO = sys.stdout) -> None:
        self.conn = conn
        self.player = player
        self.chunk_ms = chunk_ms
        self.speed = speed
        self.verbose = verbose
        self.out = out
        self.clock = _SendClock(speed)
        self.pending: collections.deque[np.ndarray] = collections.deque()
        self.drained = asyncio.Event()
        self.turns: list[Turn] = []
        self.by_id: dict[str, Turn] = {}
        self.end_of_speech: float | None = None
        self.profile: str | None = None
        self.errors: list[str] = []
        self.barge_ins = 0
        self._done_items: set[str] = set()
        self.max_text = max_text
        self._line_open = False  # a bot transcript is being written inline
        self._bot_chars = 0
        self.changed = asyncio.Event()  # pulsed on every event, for the script's waits
        self._sending: set[asyncio.Task[None]] = set()  # sends started from event handlers

    # -- output -----------------------------------------------------------------------------------

    def say(self, tag: str, text: str) -> None:
        self._end_line()
        print(f"[{tag}] {text}", file=self.out, flush=True)

    def _end_line(self) -> None:
        if self._line_open:
            self.out.write("\n")
            self._line_open = False

    def _clip(self, text: str) -> str:
        return text if self.verbose or len(text) <= self.max_text else \
            text[:self.max_text] + " ..."

    # -- sending ----------------------------------------------------------------------------------

    def queue_speech(self, samples: np.ndarray) -> None:
        from client.sources import chunks

        self.drained.clear()
        self.pending.extend(chunks(samples, self.chunk_ms))

    async def send_paced(self, stop: asyncio.Event) -> None:
        """Queued speech, else silence, one chunk per ``chunk_ms / speed``, until ``stop``."""
        period = self.chunk_ms / 1000.0 / self.speed
        silence = np.zeros(SAMPLE_RATE * self.chunk_ms // 1000, dtype=np.float32)
        next_t = time.monotonic()
        while not stop.is_set():
            chunk = self.pending.popleft() if self.pending else silence
            await self._send_audio(chunk)
            if not self.pending:
                self.drained.set()
            next_t += period
            delay = next_t - time.monotonic()
            if delay < -1.0:  # fell far behind (a stalled loop): do not burst to catch up
                next_t = time.monotonic()
            await asyncio.sleep(max(0.0, delay))

    async def send_stream(self, blocks: AsyncIterator[np.ndarray]) -> None:
        """A live source (the microphone) paces itself."""
        async for block in blocks:
            await self._send_audio(block)

    async def _send_audio(self, samples: np.ndarray) -> None:
        await self.conn.send({"type": "input_audio_buffer.append",
                              "audio": encode_pcm16(samples)})
        self.clock.sent(samples.size)

    # -- receiving --------------------------------------------------------------------------------

    async def read(self) -> None:
        """Handle server events until the connection closes (raises :class:`ClientError`)."""
        while True:
            event = await self.conn.recv()
            self.handle(event)
            self.changed.set()

    def handle(self, event: dict[str, Any]) -> None:
        kind = event_type(event)
        handler: Callable[[dict[str, Any]], None] | None = getattr(
            self, "_on_" + kind.replace(".", "_"), None)
        if handler is not None:
            handler(event)
        elif self.verbose:
            self.say("event", kind)

    def _on_session_created(self, event: dict[str, Any]) -> None:
        s = event.get("session", {})
        self.say("session", f"{s.get('id', '?')} open ({self.conn.url})")

    def _on_session_updated(self, event: dict[str, Any]) -> None:
        s = event.get("session", {})
        audio = s.get("audio") or {}
        voice = (audio.get("output") or {}).get("voice", s.get("voice"))
        td = (audio.get("input") or {}).get("turn_detection", s.get("turn_detection")) or {}
        extra = s.get("stepaudio") or {}
        self.say("session", f"updated: voice {voice}, vad threshold {td.get('threshold')}, "
                 f"end of turn {td.get('silence_duration_ms')} ms, pause "
                 f"{extra.get('pause_ms')} ms, instruction {extra.get('instruction') or '-'}")

    def _on_stepaudio_profile(self, event: dict[str, Any]) -> None:
        self.profile = event.get("profile")
        models = event.get("models") or {}
        names = ", ".join(f"{k} {v}" for k, v in models.items())
        self.say("server", f"profile {self.profile}" + (f" ({names})" if names else ""))
        if self.profile == "tiny":
            print(TINY_NOTE, file=self.out, flush=True)
        elif event.get("note"):
            self.say("server", str(event["note"]))

    def _on_stepaudio_state(self, event: dict[str, Any]) -> None:
        self.say("state", f"{event.get('previous')} -> {event.get('state')} "
                 f"({event.get('reason')})")

    def _on_stepaudio_speculation(self, event: dict[str, Any]) -> None:
        if self.verbose:
            self.say("speculation", f"{event.get('action')} {event.get('speculation_id')}")

    def _on_input_audio_buffer_speech_started(self, event: dict[str, Any]) -> None:
        """The user talks: if a reply is playing, stop it now and tell the server how much of
        it was heard (the OpenAI barge-in sequence)."""
        cut = self.player.flush()
        if cut is None:
            return
        item_id, played_ms = cut
        self._done_items.add(item_id)
        self.barge_ins += 1
        self.say("barge-in", f"playback flushed after {played_ms} ms of {item_id}; "
                 "truncating the reply to what was heard")
        task = asyncio.get_running_loop().create_task(self.conn.send({
            "type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
            "audio_end_ms": played_ms}))
        self._sending.add(task)  # referenced until sent: asyncio keeps only a weak reference
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled():
            task.exception()  # a lost connection is reported by the reader, not here

    def _on_input_audio_buffer_speech_stopped(self, event: dict[str, Any]) -> None:
        end_ms = event.get("audio_end_ms")
        if isinstance(end_ms, (int, float)):
            self.end_of_speech = self.clock.wall_at(float(end_ms))

    def _on_conversation_item_input_audio_transcription_completed(self, event: dict[str, Any]
                                                                  ) -> None:
        self.say("you", self._clip(str(event.get("transcript", "")).strip())
                 or "(nothing recognised)")

    def _on_response_created(self, event: dict[str, Any]) -> None:
        rid = str(event.get("response", {}).get("id", "?"))
        turn = Turn(rid, time.monotonic(), self.end_of_speech)
        self.end_of_speech = None
        self._bot_chars = 0
        self.turns.append(turn)
        self.by_id[rid] = turn

    def _on_response_output_audio_delta(self, event: dict[str, Any]) -> None:
        samples = decode_pcm16(str(event.get("delta", "")))
        item_id = str(event.get("item_id", "?"))
        if item_id in self._done_items:  # already flushed: a late delta must not restart it
            return
        turn = self.by_id.get(str(event.get("response_id")))
        if turn is not None and turn.first_audio is None:
            turn.first_audio = time.monotonic()
            lat = turn.latency_ms
            self.say("latency", f"turn {len(self.turns)}: first audio "
                     + (f"{lat:.0f} ms after the end of speech" if lat is not None
                        else "(no end of speech seen: manual turn)"))
        self.player.add(item_id, samples)

    def _on_response_output_audio_done(self, event: dict[str, Any]) -> None:
        self._done_items.add(str(event.get("item_id")))
        self.player.item_done(str(event.get("item_id")))

    def _on_response_output_audio_transcript_delta(self, event: dict[str, Any]) -> None:
        """The reply's text, written inline as it is spoken (clipped unless --verbose: the tiny
        models babble for minutes)."""
        delta = str(event.get("delta", ""))
        room = len(delta) if self.verbose else self.max_text - self._bot_chars
        self._bot_chars += len(delta)
        if room <= 0:
            return
        if not self._line_open:
            self.out.write("[bot] " + ("... " if self._bot_chars > len(delta) else ""))
            self._line_open = True
        self.out.write(delta[:room] + (" ..." if room < len(delta) else ""))
        self.out.flush()

    _on_response_output_text_delta = _on_response_output_audio_transcript_delta

    def _on_response_done(self, event: dict[str, Any]) -> None:
        resp = event.get("response", {})
        turn = self.by_id.get(str(resp.get("id")))
        status = str(resp.get("status", "?"))
        if turn is not None:
            turn.done = time.monotonic()
            turn.status = status
        details = resp.get("status_details") or {}
        why = details.get("reason") or (details.get("error") or {}).get("message") or ""
        self.say("reply", f"{resp.get('id')} {status}" + (f" ({why})" if why else ""))

    def _on_stepaudio_timings(self, event: dict[str, Any]) -> None:
        t = event.get("timings_ms") or {}
        turn = self.by_id.get(str(event.get("response_id")))
        wait = t.get("end_of_speech_to_first_audio")
        if turn is not None and isinstance(wait, (int, float)):
            turn.server_ms = float(wait)
        keys = TIMINGS if not self.verbose else list(t)
        shown = ", ".join(f"{k.replace('_', ' ')} {t[k]:.0f}" for k in keys
                          if isinstance(t.get(k), (int, float)))
        spec = ", speculative" if event.get("speculative") else ""
        self.say("timings", f"{event.get('response_id')} (server{spec}): {shown} ms")

    def _on_conversation_item_truncated(self, event: dict[str, Any]) -> None:
        self.say("truncated", f"{event.get('item_id')} at {event.get('audio_end_ms')} ms")

    def _on_error(self, event: dict[str, Any]) -> None:
        err = event.get("error") or {}
        msg = f"{err.get('code') or err.get('type')}: {err.get('message')}"
        self.errors.append(msg)
        self.say("error", msg)

    # -- waiting ----------------------------------------------------------------------------------

    async def wait_for(self, condition: Callable[[], object], timeout_s: float, what: str
                       ) -> None:
        """Wait until ``condition()`` is true (checked on every event and every 50 ms)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClientError(f"timed out after {timeout_s:g} s waiting for {what}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(0.05, left))
            except (TimeoutError, asyncio.TimeoutError):
                pass

    def reply_finished_since(self, t0: float) -> bool:
        """A reply created after ``t0`` has ended and its audio has played out."""
        return any(t.created >= t0 and t.done is not None for t in self.turns) \
            and self.player.idle()

    def reply_audio_since(self, t0: float) -> Turn | None:
        return next((t for t in self.turns if t.created >= t0 and t.first_audio is not None),
                    None)

    def summary(self) -> str:
        lat = [t.latency_ms for t in self.turns if t.latency_ms is not None]
        parts = [f"{len(self.turns)} repl{'y' if len(self.turns) == 1 else 'ies'}",
                 f"{self.barge_ins} barge-in{'' if self.barge_ins == 1 else 's'}"]
        if lat:
            parts.append("end of speech -> first audio " + ", ".join(f"{x:.0f}" for x in lat)
                         + f" ms (median {statistics.median(lat):.0f} ms)")
        return "; ".join(parts)
