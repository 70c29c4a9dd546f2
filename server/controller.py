"""Turn-taking: the controller state machine of one session, as a pure synchronous object.

States (Step-Audio report §3.4): ``silence → user_speaking → user_paused → bot_replying``.

- ``user_paused`` for ``pause_ms`` (250): start a *speculative* reply on the user's audio so far;
  if the user resumes, cancel it.
- ``user_paused`` for the end-of-turn silence (``silence_duration_ms``, 750): commit the user turn,
  then commit the latest speculation if its input is the final input, else start a fresh reply.
- ``bot_replying`` and the user speaks for ``min_barge_in_ms`` (300): barge-in. Cancel the reply,
  tell the client to flush its playback, truncate the reply to what was played.
- Manual turns (``turn_detection: null``): VAD events are ignored; the client commits and asks.

The controller owns no sockets, threads, models or clocks: the session calls it with VAD events,
client requests and the time, and carries out the :class:`Action` objects it returns, in order.
Every interruption of a reply goes through :meth:`Controller._interrupt` (barge-in,
``response.cancel``, session close), so what "interrupted" means (cancel generation, cut playback,
truncate to what was played) is decided in one place.

Clock: every call takes ``now_ms`` on one monotonic clock shared with the VAD event times. The
session uses the input-audio clock (ms of audio received) while the client streams, and advances it
with wall time while the input stalls, so that a client that stops sending still gets an end of turn
and a playback estimate. Times going backwards are clamped.

Playback model (for truncation when the client does not report what it played): audio sent to the
client is a queue drained in real time from the moment it is sent; played = sent − still queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from server.protocol import MIN_COMMIT_MS, ControllerState, SessionConfig

if TYPE_CHECKING:  # the controller only reads event fields; keep torch out of its import
    from stepaudio.vad import VADEvent

CancelReason = Literal["turn_detected", "client_cancelled", "session_closed"]


@dataclass(frozen=True)
class ControllerConfig:
    """The session settings the controller reads (see :meth:`from_session` for the mapping)."""

    turn_detection: bool = True
    pause_ms: int = 250
    silence_duration_ms: int = 750
    prefix_padding_ms: int = 300
    min_barge_in_ms: int = 300
    speculative: bool = True
    create_response: bool = True
    interrupt_response: bool = True

    @classmethod
    def from_session(cls, cfg: SessionConfig) -> ControllerConfig:
        td = cfg.turn_detection
        sa = cfg.stepaudio
        if td is None:
            return cls(
                turn_detection=False,
                pause_ms=sa.pause_ms,
                min_barge_in_ms=sa.min_barge_in_ms,
                speculative=sa.speculative,
            )
        return cls(
            turn_detection=True,
            pause_ms=sa.pause_ms,
            silence_duration_ms=td.end_of_turn_ms,
            prefix_padding_ms=td.prefix_padding_ms,
            min_barge_in_ms=sa.min_barge_in_ms,
            speculative=sa.speculative,
            create_response=td.create_response,
            interrupt_response=td.interrupt_response,
        )

    @property
    def speculation_enabled(self) -> bool:
        return (
            self.turn_detection
            and self.speculative
            and self.create_response
            and (self.pause_ms < self.silence_duration_ms)
        )


# --------------------------------------------------------------------------------------------------
# Actions: what the session must do, in the order given


@dataclass(frozen=True)
class Action:
    pass


@dataclass(frozen=True)
class StateChange(Action):
    """→ ``stepaudio.state``."""

    state: ControllerState
    previous: ControllerState
    reason: str
    at_ms: int


@dataclass(frozen=True)
class SpeechStarted(Action):
    """→ ``input_audio_buffer.speech_started`` (the client flushes playback). ``turn_id`` names the
    user item this speech will become."""

    turn_id: int
    audio_start_ms: int
    barge_in: bool = False


@dataclass(frozen=True)
class SpeechStopped(Action):
    """→ ``input_audio_buffer.speech_stopped`` (at end of turn, as OpenAI sends it)."""

    turn_id: int
    audio_end_ms: int


@dataclass(frozen=True)
class CommitInput(Action):
    """The user turn is final: → ``input_audio_buffer.committed`` + the user item; finish the
    tokenizer stream over ``[audio_start_ms, audio_end_ms]`` and start its transcription.
    ``speculation``: the speculative reply that the :class:`CommitSpeculation` right after this
    will commit (its tokens are this turn's: the stream need not be finished again)."""

    turn_id: int
    audio_start_ms: int
    audio_end_ms: int
    speculation: int | None = None


@dataclass(frozen=True)
class InputCleared(Action):
    """→ ``input_audio_buffer.cleared``; drop the buffered audio and the tokenizer stream."""


@dataclass(frozen=True)
class StartSpeculation(Action):
    """Generate a reply on the user's audio up to ``audio_end_ms`` and hold its output back.

    ``input_version`` identifies that input: the speculation can only be committed while the
    controller's input version is still the same.
    """

    response_id: int
    turn_id: int
    input_version: int
    audio_start_ms: int
    audio_end_ms: int


@dataclass(frozen=True)
class CancelSpeculation(Action):
    """Stop the speculative reply and discard its held output (the client never saw it)."""

    response_id: int
    reason: str


@dataclass(frozen=True)
class CommitSpeculation(Action):
    """The speculation becomes the reply to ``turn_id``: → ``response.created`` and release its
    held output to the client."""

    response_id: int
    turn_id: int


@dataclass(frozen=True)
class StartResponse(Action):
    """Generate a reply now: → ``response.created``. ``turn_id`` is None for ``response.create``
    (the reply is to the conversation as it stands)."""

    response_id: int
    turn_id: int | None
    reason: Literal["end_of_turn", "client_request"]


@dataclass(frozen=True)
class CancelResponse(Action):
    """Stop the reply. ``generating``: LLM/TTS are still running (cancel them and send
    ``response.done`` cancelled); otherwise only playback is cut."""

    response_id: int
    reason: CancelReason
    generating: bool


@dataclass(frozen=True)
class TruncateResponse(Action):
    """Keep only the first ``audio_end_ms`` of the reply in the context (→ the context manager and
    ``conversation.item.truncated``). ``source`` is "client" (it reported what it played) or
    "estimate" (the playback model's guess at interruption time; a later client report wins).
    A text-only reply has no audio to measure: the session ignores this for it."""

    response_id: int
    audio_end_ms: int
    source: Literal["client", "estimate"]


@dataclass(frozen=True)
class Reject(Action):
    """The client asked for something this state does not allow: → ``error``."""

    code: str
    message: str


# --------------------------------------------------------------------------------------------------


@dataclass
class _Playback:
    sent_ms: float = 0.0
    queue_end_ms: float = -math.inf  # when the audio sent so far finishes playing
    generating: bool = True

    def add(self, now: float, ms: float) -> None:
        self.queue_end_ms = max(self.queue_end_ms, now) + ms
        self.sent_ms += ms

    def played(self, now: float) -> float:
        return max(0.0, self.sent_ms - max(0.0, self.queue_end_ms - now))

    def finished(self, now: float) -> bool:
        return not self.generating and now >= self.queue_end_ms


@dataclass
class _Speculation:
    response_id: int
    input_version: int
    audio_end_ms: float


@dataclass
class Controller:
    """One session's turn-taking. Every public method returns the actions to carry out."""

    config: ControllerConfig = field(default_factory=ControllerConfig)
    state: ControllerState = "silence"

    def __post_init__(self) -> None:
        self._now = 0.0
        self._next_id = 1
        self.turn_id = self._new_id()
        self._turn_start = 0.0  # where the current turn's speech began
        self._buffer_start = 0.0  # start of uncommitted input audio
        self._speech_end = 0.0  # end of the user's last speech in this turn
        self.input_version = 0
        self._vad_speaking = False
        self._vad_since = 0.0
        self.speculation: _Speculation | None = None
        self._failed_version = -1  # a speculation failed on this input: do not retry it
        self.response_id: int | None = None  # the reply the client is hearing (or about to)
        self._playback: dict[int, _Playback] = {}
        self._out: list[Action] = []

    # -- helpers --------------------------------------------------------------------------------

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def _advance(self, now_ms: float) -> None:
        self._now = max(self._now, float(now_ms))

    def _emit(self, action: Action) -> None:
        self._out.append(action)

    def _flush(self) -> list[Action]:
        out, self._out = self._out, []
        return out

    def _set_state(self, state: ControllerState, reason: str) -> None:
        if state != self.state:
            self._emit(StateChange(state, self.state, reason, round(self._now)))
            self.state = state

    def _audio_start(self, speech_start: float) -> int:
        return round(max(self._buffer_start, speech_start - self.config.prefix_padding_ms))

    def _cancel_speculation(self, reason: str) -> None:
        if self.speculation is not None:
            self._emit(CancelSpeculation(self.speculation.response_id, reason))
            self.speculation = None

    def _interrupt(self, reason: CancelReason) -> None:
        """The one place where things stop: speculation, reply generation, playback, truncation."""
        self._cancel_speculation(reason)
        rid = self.response_id
        if rid is None:
            return
        pb = self._playback[rid]
        self._emit(CancelResponse(rid, reason, pb.generating))
        pb.generating = False
        self._emit(TruncateResponse(rid, math.floor(pb.played(self._now)), "estimate"))
        pb.queue_end_ms = self._now  # nothing more plays
        self.response_id = None

    def _begin_turn(self, speech_start: float, barge_in: bool) -> None:
        self._turn_start = speech_start
        self.input_version += 1
        self._emit(SpeechStarted(self.turn_id, self._audio_start(speech_start), barge_in))
        self._set_state("user_speaking", "barge_in" if barge_in else "speech_started")

    def _start_response(
        self, turn_id: int | None, reason: Literal["end_of_turn", "client_request"]
    ) -> None:
        rid = self._new_id()
        self._open_response(rid, StartResponse(rid, turn_id, reason))

    def _open_response(self, rid: int, start: StartResponse | CommitSpeculation) -> None:
        """The reply ``rid`` is the one the client hears now: the state changes, then ``start``
        (its ``response.created``)."""
        pb = _Playback()
        if self.response_id is not None:  # the previous reply is still playing: queue behind it
            pb.queue_end_ms = self._playback[self.response_id].queue_end_ms
        self.response_id = rid
        self._playback[rid] = pb
        while len(self._playback) > 32:  # bounded: old replies cannot be truncated any more
            del self._playback[next(iter(self._playback))]
        self._set_state("bot_replying", "response_started")
        self._emit(start)

    def _end_of_turn(self) -> None:
        cfg = self.config
        turn = self.turn_id
        spec, self.speculation = self.speculation, None
        kept = (spec if spec is not None and cfg.create_response
                and spec.input_version == self.input_version else None)
        self._emit(SpeechStopped(turn, round(self._speech_end)))
        self._emit(CommitInput(turn, self._audio_start(self._turn_start), round(self._speech_end),
                               kept.response_id if kept is not None else None))
        self.turn_id = self._new_id()
        self._buffer_start = self._speech_end
        if kept is not None:
            self._open_response(kept.response_id, CommitSpeculation(kept.response_id, turn))
            return
        if spec is not None:
            reason = "input_changed" if cfg.create_response else "no_response_wanted"
            self._emit(CancelSpeculation(spec.response_id, reason))
        if not cfg.create_response:
            self._set_state("silence", "end_of_turn")
            return
        self._start_response(turn, "end_of_turn")

    def _run_timers(self) -> None:
        """Everything that happens because time passed; called at the start of every input."""
        cfg, now = self.config, self._now
        if self.state == "user_paused" and cfg.turn_detection:
            silence = now - self._speech_end
            if silence >= cfg.silence_duration_ms:
                self._end_of_turn()
            elif (
                cfg.speculation_enabled
                and silence >= cfg.pause_ms
                and self.input_version != self._failed_version
                and (
                    self.speculation is None or self.speculation.input_version != self.input_version
                )
            ):
                self._cancel_speculation("input_changed")
                rid = self._new_id()
                self.speculation = _Speculation(rid, self.input_version, self._speech_end)
                self._emit(
                    StartSpeculation(
                        rid,
                        self.turn_id,
                        self.input_version,
                        self._audio_start(self._turn_start),
                        round(self._speech_end),
                    )
                )
        if self.state == "bot_replying":
            playing = self.response_id
            if (
                playing is not None
                and cfg.turn_detection
                and cfg.interrupt_response
                and self._vad_speaking
            ):
                if now - self._vad_since >= cfg.min_barge_in_ms:
                    # speech_started first: the client flushes its playback, then hears about
                    # the cancelled reply and its truncation
                    self._begin_turn(self._vad_since, barge_in=True)
                    self._interrupt("turn_detected")
                    return
            if playing is not None and self._playback[playing].finished(now):
                self.response_id = None
                self._set_state("silence", "response_finished")
                if cfg.turn_detection and self._vad_speaking:  # the user began as the bot ended
                    self._begin_turn(self._vad_since, barge_in=False)

    # -- inputs: time and VAD -------------------------------------------------------------------

    def tick(self, now_ms: float) -> list[Action]:
        self._advance(now_ms)
        self._run_timers()
        return self._flush()

    # VAD events arrive after the fact (the VAD needs min_speech_ms / min_silence_ms to decide).
    # Time is first run up to the event's own time, so a batch of late events is handled as if
    # each had come on time; then up to now.

    def speech_started(self, at_ms: float, now_ms: float) -> list[Action]:
        self._advance(min(at_ms, now_ms))
        self._run_timers()
        self._vad_speaking, self._vad_since = True, float(at_ms)
        if self.config.turn_detection:
            if self.state == "silence":
                self._begin_turn(float(at_ms), barge_in=False)
            elif self.state == "user_paused":
                self._cancel_speculation("user_resumed")
                self.input_version += 1
                self._set_state("user_speaking", "user_resumed")
        self._advance(now_ms)
        self._run_timers()  # a late start may already be past the barge-in minimum
        return self._flush()

    def speech_stopped(self, at_ms: float, now_ms: float) -> list[Action]:
        self._advance(min(at_ms, now_ms))
        self._run_timers()  # still speaking up to at_ms: a barge-in may have been due
        self._vad_speaking = False
        if self.config.turn_detection and self.state == "user_speaking":
            self._speech_end = float(at_ms)
            self._set_state("user_paused", "speech_stopped")
        self._advance(now_ms)
        self._run_timers()
        return self._flush()

    def on_vad(self, event: VADEvent, now_ms: float | None = None) -> list[Action]:
        """A :class:`~stepaudio.vad.VADEvent`; ``now_ms`` defaults to the time it was detected."""
        now = event.detected_ms if now_ms is None else now_ms
        if event.kind == "speech_start":
            return self.speech_started(event.at_ms, now)
        return self.speech_stopped(event.at_ms, now)

    def input_changed(self, now_ms: float) -> list[Action]:
        """The input a speculation would read changed without new speech (late tokens, a client
        truncation that rewrote the history): a running speculation is stale and is redone."""
        self._advance(now_ms)
        self.input_version += 1
        self._run_timers()
        return self._flush()

    # -- inputs: the client -----------------------------------------------------------------------

    def configure(self, config: ControllerConfig, now_ms: float) -> list[Action]:
        """New settings (``session.update``). Switching to manual turns ends any VAD turn in
        progress; its audio stays in the buffer for the client's commit."""
        self._advance(now_ms)
        was_vad = self.config.turn_detection
        self.config = config
        if was_vad and not config.turn_detection and self.state in ("user_speaking", "user_paused"):
            self._cancel_speculation("turn_detection_off")
            self._set_state("silence", "turn_detection_off")
        elif not config.speculation_enabled:
            self._cancel_speculation("speculation_off")
        self._run_timers()
        return self._flush()

    def commit_input(self, now_ms: float, buffered_ms: float) -> list[Action]:
        """``input_audio_buffer.commit``: the buffered audio (``buffered_ms`` long) is a user turn."""
        self._advance(now_ms)
        self._run_timers()
        if buffered_ms < MIN_COMMIT_MS:
            return [
                *self._flush(),
                Reject(
                    "input_audio_buffer_commit_empty",
                    f"buffer too small: expected at least {MIN_COMMIT_MS} ms of audio, have {buffered_ms:.0f} ms",
                ),
            ]
        self._cancel_speculation("committed_by_client")
        end = self._now
        self._emit(
            CommitInput(self.turn_id, round(max(self._buffer_start, end - buffered_ms)), round(end))
        )
        self.turn_id = self._new_id()
        self._buffer_start = end
        if self.state in ("user_speaking", "user_paused"):
            self._set_state("silence", "committed_by_client")
        return self._flush()

    def clear_input(self, now_ms: float) -> list[Action]:
        """``input_audio_buffer.clear``: forget the uncommitted audio and any turn built on it."""
        self._advance(now_ms)
        self._run_timers()
        self._cancel_speculation("input_cleared")
        self._emit(InputCleared())
        self._buffer_start = self._now
        if self.state in ("user_speaking", "user_paused"):
            self.turn_id = self._new_id()
            self._set_state("silence", "input_cleared")
        return self._flush()

    def create_response(self, now_ms: float) -> list[Action]:
        """``response.create``: reply to the conversation as it stands."""
        self._advance(now_ms)
        self._run_timers()
        if self._generating():
            return [
                *self._flush(),
                Reject(
                    "conversation_already_has_active_response",
                    "a response is in progress; cancel it (response.cancel) or wait for response.done",
                ),
            ]
        if self.config.turn_detection and self.state in ("user_speaking", "user_paused"):
            return [
                *self._flush(),
                Reject(
                    "user_turn_in_progress",
                    "the user is speaking; with server VAD the reply starts at the end of the turn",
                ),
            ]
        self._start_response(None, "client_request")
        return self._flush()

    def _generating(self) -> bool:
        return self.response_id is not None and self._playback[self.response_id].generating

    def cancel_response(self, now_ms: float, response_id: int | None = None) -> list[Action]:
        """``response.cancel`` of the current reply (``response_id``, if given, must name it).

        A reply that finished generating but is still playing can be cancelled too: its playback
        is cut and it is truncated, with ``generating=False`` so no second ``response.done`` goes out.
        """
        self._advance(now_ms)
        self._run_timers()
        if self.response_id is None or (
            response_id is not None and response_id != self.response_id
        ):
            return [
                *self._flush(),
                Reject("response_cancel_not_active", "there is no response in progress to cancel"),
            ]
        self._interrupt("client_cancelled")
        self._set_state("silence", "client_cancelled")
        return self._flush()

    def truncate(self, now_ms: float, response_id: int, audio_end_ms: int) -> list[Action]:
        """``conversation.item.truncate`` of a reply's item: the client played ``audio_end_ms``."""
        self._advance(now_ms)
        self._run_timers()
        pb = self._playback.get(response_id)
        if pb is None:
            return [
                *self._flush(),
                Reject("invalid_value", "that item has no audio this session can truncate"),
            ]
        if audio_end_ms > math.ceil(pb.sent_ms):
            return [
                *self._flush(),
                Reject(
                    "invalid_value",
                    f"audio_end_ms {audio_end_ms} is past the {math.ceil(pb.sent_ms)} ms of audio sent for that item",
                ),
            ]
        self._emit(TruncateResponse(response_id, int(audio_end_ms), "client"))
        if response_id == self.response_id and not pb.generating:
            pb.queue_end_ms = self._now  # the client stopped playing it: the reply is over
        if self.speculation is not None:  # its prompt carried the old text of that reply
            self.input_version += 1
        self._run_timers()
        return self._flush()

    # -- inputs: the reply pipeline ---------------------------------------------------------------

    def response_audio(self, now_ms: float, response_id: int, audio_ms: float) -> list[Action]:
        """``audio_ms`` of reply audio was just sent to the client."""
        self._advance(now_ms)
        pb = self._playback.get(response_id)
        if pb is not None and response_id == self.response_id:
            pb.add(self._now, audio_ms)
        self._run_timers()
        return self._flush()

    def response_done(self, now_ms: float, response_id: int) -> list[Action]:
        """Generation of the reply ended (completed or failed); playback may still be running."""
        self._advance(now_ms)
        pb = self._playback.get(response_id)
        if pb is not None:
            pb.generating = False
        self._run_timers()
        return self._flush()

    def speculation_failed(self, now_ms: float, response_id: int) -> list[Action]:
        """The speculative reply died (model error): forget it and do not retry on the same input
        (a failing model would otherwise be restarted every tick); the end of turn starts afresh."""
        self._advance(now_ms)
        if self.speculation is not None and self.speculation.response_id == response_id:
            self._failed_version = self.speculation.input_version
            self.speculation = None
        self._run_timers()
        return self._flush()

    def close(self, now_ms: float) -> list[Action]:
        """The connection is going away: stop everything."""
        self._advance(now_ms)
        self._interrupt("session_closed")
        self._set_state("silence", "session_closed")
        return self._flush()

    # -- queries ----------------------------------------------------------------------------------

    def played_ms(self, response_id: int) -> float:
        """The playback model's estimate of how much of a reply the client has played by now."""
        pb = self._playback.get(response_id)
        return 0.0 if pb is None else pb.played(self._now)

    def sent_ms(self, response_id: int) -> float:
        pb = self._playback.get(response_id)
        return 0.0 if pb is None else pb.sent_ms
