"""The turn-taking state machine, driven by a fake clock and scripted VAD events."""

from __future__ import annotations

import pytest

from server.controller import (
    CancelResponse,
    CancelSpeculation,
    CommitInput,
    CommitSpeculation,
    Controller,
    ControllerConfig,
    InputCleared,
    Reject,
    SpeechStarted,
    SpeechStopped,
    StartResponse,
    StartSpeculation,
    StateChange,
    TruncateResponse,
)
from server.protocol import SessionConfig, SessionPatch, TurnDetectionIn, apply_session_update
from stepaudio.vad import VADEvent

VAD_DELAY = 128  # ms between a speech change and the VAD's decision (min_speech / min_silence)


def kinds(actions):
    return [type(a).__name__ for a in actions if not isinstance(a, StateChange)]


def order(actions):
    """Every action in the order given, state changes by their reason (the wire's order)."""
    return [f"state:{a.reason}" if isinstance(a, StateChange) else type(a).__name__
            for a in actions]


def only(actions, cls):
    found = [a for a in actions if isinstance(a, cls)]
    assert len(found) == 1, f"expected one {cls.__name__} in {actions}"
    return found[0]


class Script:
    """A session's view of time: VAD events land VAD_DELAY after the fact, ticks every 10 ms."""

    def __init__(self, **config) -> None:
        self.c = Controller(ControllerConfig(**config))
        self.now = 0.0
        self.log: list = []

    def until(self, t: float) -> list:
        out = []
        while self.now + 10 <= t:
            self.now += 10
            out += self.c.tick(self.now)
        self.now = max(self.now, t)
        out += self.c.tick(self.now)
        self.log += out
        return out

    def speech(self, start: float, end: float | None = None) -> list:
        """The user speaks from start to end (None: still speaking)."""
        out = self.until(start + VAD_DELAY)
        out += self.c.speech_started(start, self.now)
        if end is not None:
            out += self.until(end + VAD_DELAY)
            out += self.c.speech_stopped(end, self.now)
        self.log += out
        return out

    def states(self) -> list[str]:
        return [a.state for a in self.log if isinstance(a, StateChange)]


def test_speech_start_begins_a_turn_with_prefix_padding():
    s = Script(prefix_padding_ms=300)
    out = s.speech(1000)
    started = only(out, SpeechStarted)
    assert started.audio_start_ms == 700 and not started.barge_in
    assert s.c.state == "user_speaking"


def test_speculation_started_after_short_pause():
    s = Script(pause_ms=250, silence_duration_ms=750)
    s.speech(1000, 2000)
    assert kinds(s.until(2240)) == []  # 240 ms of silence: nothing yet
    spec = only(s.until(2250), StartSpeculation)
    assert spec.audio_end_ms == 2000 and spec.audio_start_ms == 700
    assert s.c.state == "user_paused"


def test_speculation_cancelled_when_user_resumes():
    s = Script()
    s.speech(1000, 2000)
    spec = only(s.until(2300), StartSpeculation)
    out = s.speech(2400, 3000)
    cancel = only(out, CancelSpeculation)
    assert cancel.response_id == spec.response_id and cancel.reason == "user_resumed"
    assert SpeechStarted not in map(type, out)  # still the same user turn: no second speech_started
    # The next pause speculates again, on the longer input, and that one is committed.
    spec2 = only(s.until(3250), StartSpeculation)
    assert spec2.audio_end_ms == 3000 and spec2.input_version != spec.input_version
    end = s.until(3750)
    assert only(end, CommitSpeculation).response_id == spec2.response_id
    assert only(end, CommitInput).audio_end_ms == 3000


def test_speculation_committed_when_input_unchanged():
    s = Script(pause_ms=250, silence_duration_ms=750)
    turn = only(s.speech(1000, 2000), SpeechStarted).turn_id
    spec = only(s.until(2250), StartSpeculation)
    assert kinds(s.until(2740)) == []
    end = s.until(2750)
    # the state changes before the reply's response.created; the commit names the speculation
    assert order(end) == ["SpeechStopped", "CommitInput", "state:response_started",
                          "CommitSpeculation"]
    assert only(end, SpeechStopped).audio_end_ms == 2000
    assert only(end, CommitInput).speculation == spec.response_id
    assert only(end, CommitSpeculation) == CommitSpeculation(spec.response_id, turn)
    assert s.c.state == "bot_replying" and s.c.response_id == spec.response_id


def test_stale_speculation_replaced_by_fresh_response_at_end_of_turn():
    s = Script()
    s.speech(1000, 2000)
    spec = only(s.until(2300), StartSpeculation)
    s.c.speculation_failed(s.now, spec.response_id)
    end = s.until(2750)
    assert order(end) == ["SpeechStopped", "CommitInput", "state:response_started",
                          "StartResponse"]
    assert only(end, StartResponse).reason == "end_of_turn"
    assert only(end, CommitInput).speculation is None  # the turn's own tokens


def test_input_change_without_speech_restarts_the_speculation():
    s = Script()
    s.speech(1000, 2000)
    first = only(s.until(2300), StartSpeculation)
    out = s.c.input_changed(2400)
    assert only(out, CancelSpeculation).response_id == first.response_id
    second = only(out, StartSpeculation)
    assert second.input_version > first.input_version
    assert only(s.until(2750), CommitSpeculation).response_id == second.response_id


def test_no_speculation_when_disabled_or_pause_not_shorter_than_end_of_turn():
    for cfg in ({"speculative": False}, {"pause_ms": 800, "silence_duration_ms": 750}):
        s = Script(**cfg)
        s.speech(1000, 2000)
        assert kinds(s.until(3000)) == ["SpeechStopped", "CommitInput", "StartResponse"]


def test_end_of_turn_follows_silence_duration_per_session():
    s = Script(silence_duration_ms=1200, speculative=False)
    s.speech(1000, 2000)
    assert kinds(s.until(3190)) == []
    assert kinds(s.until(3200)) == ["SpeechStopped", "CommitInput", "StartResponse"]


def test_state_sequence_of_a_whole_turn():
    s = Script()
    s.speech(1000, 2000)
    s.until(2750)
    rid = s.c.response_id
    s.c.response_audio(2800, rid, 500)
    s.c.response_done(2900, rid)
    s.until(3299)
    assert s.c.state == "bot_replying"  # generation is over but the client is still playing
    s.until(3300)
    assert s.states() == ["user_speaking", "user_paused", "bot_replying", "silence"]


def test_barge_in_cancels_and_truncates_to_played_audio():
    s = Script(min_barge_in_ms=300, prefix_padding_ms=300)
    s.speech(1000, 2000)
    s.until(2750)
    rid = s.c.response_id
    s.c.response_audio(3000, rid, 2000)  # 2 s of reply sent at t=3000: plays until 5000
    out = s.speech(3800)  # the user talks over it; the VAD reports the start at 3928
    assert kinds(out) == []  # not yet long enough
    out = s.until(4100)
    # speech_started first (the client flushes its playback), then the cancel and the cut
    assert order(out) == ["SpeechStarted", "state:barge_in", "CancelResponse",
                          "TruncateResponse"]
    assert only(out, CancelResponse) == CancelResponse(rid, "turn_detected", True)
    assert only(out, TruncateResponse) == TruncateResponse(rid, 1100, "estimate")  # 3000 → 4100
    started = only(out, SpeechStarted)
    assert started.barge_in and started.audio_start_ms == 3500
    assert s.c.state == "user_speaking"
    # The client reports what it really played; that wins over the estimate.
    out = s.c.truncate(4150, rid, 900)
    assert only(out, TruncateResponse) == TruncateResponse(rid, 900, "client")


def test_short_speech_during_reply_does_not_interrupt():
    s = Script(min_barge_in_ms=300)
    s.speech(1000, 2000)
    s.until(2750)
    rid = s.c.response_id
    s.c.response_audio(2800, rid, 3000)
    out = s.speech(3000, 3150)  # an "uh-huh" of 150 ms
    out += s.until(3600)
    assert kinds(out) == []
    assert s.c.state == "bot_replying" and s.c.response_id == rid


def test_barge_in_found_when_events_arrive_late_in_one_batch():
    s = Script(min_barge_in_ms=300)
    s.speech(1000, 2000)
    s.until(2750)
    rid = s.c.response_id
    s.c.response_audio(2800, rid, 3000)
    # No tick in between: the start and the stop of a 400 ms interjection come together.
    out = s.c.speech_started(3000, 3500) + s.c.speech_stopped(3400, 3500)
    assert only(out, CancelResponse).response_id == rid
    assert only(out, SpeechStarted).barge_in
    assert s.c.state == "user_paused"


def test_no_barge_in_when_interrupt_response_is_off_and_turn_begins_when_bot_ends():
    s = Script(interrupt_response=False)
    s.speech(1000, 2000)
    s.until(2750)
    rid = s.c.response_id
    s.c.response_audio(2800, rid, 1000)
    s.c.response_done(2900, rid)
    out = s.speech(3000) + s.until(3790)
    assert kinds(out) == []
    out = s.until(3800)  # playback over, the user is still talking: that is their new turn
    started = only(out, SpeechStarted)
    assert not started.barge_in and s.c.state == "user_speaking"


def test_barge_in_on_finished_reply_still_playing_cuts_playback_only():
    s = Script()
    s.speech(1000, 2000)
    s.until(2750)
    rid = s.c.response_id
    s.c.response_audio(2800, rid, 3000)
    s.c.response_done(2850, rid)
    s.speech(3500)
    out = s.until(3800)
    assert only(out, CancelResponse) == CancelResponse(rid, "turn_detected", False)
    assert only(out, TruncateResponse).audio_end_ms == 1000


def test_manual_turn_with_commit_and_response_create():
    c = Controller(ControllerConfig(turn_detection=False))
    # VAD events do not make turns in manual mode.
    assert kinds(c.speech_started(1000, 1128) + c.speech_stopped(2000, 2128) + c.tick(4000)) == []
    out = c.commit_input(4000, buffered_ms=4000)
    commit = only(out, CommitInput)
    assert (commit.audio_start_ms, commit.audio_end_ms) == (0, 4000)
    out = c.create_response(4010)
    assert order(out) == ["state:response_started", "StartResponse"]
    start = only(out, StartResponse)
    assert start.turn_id is None and start.reason == "client_request"
    assert c.state == "bot_replying"
    c.response_audio(4100, start.response_id, 1000)
    out = c.cancel_response(4600)
    assert only(out, CancelResponse).reason == "client_cancelled"
    assert only(out, TruncateResponse).audio_end_ms == 500
    assert c.state == "silence"
    # The next manual turn starts where the last commit ended.
    assert only(c.commit_input(6000, buffered_ms=2000), CommitInput).audio_start_ms == 4000


def test_manual_commit_of_an_almost_empty_buffer_is_rejected():
    c = Controller(ControllerConfig(turn_detection=False))
    assert (
        only(c.commit_input(50, buffered_ms=50), Reject).code == "input_audio_buffer_commit_empty"
    )


def test_response_create_rejected_while_a_response_is_generating():
    c = Controller(ControllerConfig(turn_detection=False))
    c.create_response(0)
    assert only(c.create_response(10), Reject).code == "conversation_already_has_active_response"


def test_response_create_rejected_while_the_user_is_speaking_with_server_vad():
    s = Script()
    s.speech(1000)
    assert only(s.c.create_response(s.now), Reject).code == "user_turn_in_progress"


def test_response_cancel_without_a_response_is_rejected():
    c = Controller()
    assert only(c.cancel_response(0), Reject).code == "response_cancel_not_active"


def test_client_truncate_past_the_audio_sent_is_rejected():
    c = Controller(ControllerConfig(turn_detection=False))
    rid = only(c.create_response(0), StartResponse).response_id
    c.response_audio(10, rid, 800)
    assert only(c.truncate(20, rid, 1500), Reject).code == "invalid_value"
    assert only(c.truncate(20, 999, 10), Reject).code == "invalid_value"


def test_client_truncate_during_speculation_makes_it_stale():
    s = Script()
    s.speech(1000, 2000)
    s.until(2750)
    old = s.c.response_id
    s.c.response_audio(2800, old, 2000)
    s.speech(3200, 4000)  # barge-in, then the new turn pauses
    spec = only(s.until(4260), StartSpeculation)
    out = s.c.truncate(4300, old, 350)
    assert only(out, CancelSpeculation).response_id == spec.response_id
    assert only(out, StartSpeculation).input_version > spec.input_version


def test_clear_input_cancels_speculation_and_ends_the_turn():
    s = Script()
    turn = only(s.speech(1000, 2000), SpeechStarted).turn_id
    s.until(2300)
    out = s.c.clear_input(2310)
    assert kinds(out) == ["CancelSpeculation", "InputCleared"]
    assert s.c.state == "silence" and s.c.turn_id != turn
    assert kinds(s.until(3500)) == []
    assert isinstance(out[1], InputCleared)


def test_create_response_false_commits_without_replying():
    s = Script(create_response=False)
    s.speech(1000, 2000)
    assert kinds(s.until(2800)) == ["SpeechStopped", "CommitInput"]
    assert s.c.state == "silence"
    assert kinds(s.c.create_response(2900)) == ["StartResponse"]


def test_switching_to_manual_turns_mid_turn_ends_the_vad_turn():
    s = Script()
    s.speech(1000, 2000)
    s.until(2300)
    out = s.c.configure(ControllerConfig(turn_detection=False), 2310)
    assert kinds(out) == ["CancelSpeculation"]
    assert s.c.state == "silence"
    assert kinds(s.until(4000)) == []


def test_resume_that_began_before_end_of_turn_is_not_committed_as_two_turns():
    s = Script()
    s.speech(1000, 2000)
    s.until(2600)
    # Speech resumed at 2700 (before the 2750 end of turn); the event lands at 2828 with no tick
    # in between, so it is applied at its own time and the turn goes on.
    out = s.c.speech_started(2700, 2828)
    assert kinds(out) == ["CancelSpeculation"]
    assert s.c.state == "user_speaking"


def test_on_vad_uses_the_detection_time():
    c = Controller()
    out = c.on_vad(VADEvent("speech_start", 1000.0, 1128.0))
    assert only(out, SpeechStarted).audio_start_ms == 700
    out = c.on_vad(VADEvent("speech_end", 2000.0, 2128.0))
    assert c.state == "user_paused"


def test_time_going_backwards_is_clamped():
    s = Script()
    s.speech(1000, 2000)
    s.until(2300)
    assert kinds(s.c.tick(100)) == []
    assert s.c.state == "user_paused"


def test_close_cancels_the_reply():
    c = Controller(ControllerConfig(turn_detection=False))
    rid = only(c.create_response(0), StartResponse).response_id
    out = c.close(10)
    assert only(out, CancelResponse) == CancelResponse(rid, "session_closed", True)
    assert c.state == "silence"


@pytest.mark.parametrize(("eagerness", "silence"), [("low", 1500), ("auto", 750), ("high", 400)])
def test_config_from_session_maps_semantic_vad_eagerness(eagerness, silence):
    patch = SessionPatch(turn_detection=TurnDetectionIn(type="semantic_vad", eagerness=eagerness))
    cfg = apply_session_update(SessionConfig(), patch)
    assert ControllerConfig.from_session(cfg).silence_duration_ms == silence


def test_config_from_session_manual_turns():
    cfg = apply_session_update(
        SessionConfig(), SessionPatch.model_validate({"turn_detection": None})
    )
    cc = ControllerConfig.from_session(cfg)
    assert not cc.turn_detection and not cc.speculation_enabled


def test_real_speech_through_the_vad_drives_one_turn_with_a_cancelled_speculation(audio_dir):
    """A recording with a 350 ms pause mid-sentence: the pause speculates, the user goes on, the
    speculation is cancelled; the final silence speculates again and that reply is committed."""
    import numpy as np

    from stepaudio.audio import load_audio
    from stepaudio.vad import SileroVAD, StreamingVAD

    wav, sr = load_audio(audio_dir / "prompt_wav_yuqian.wav")
    pad = np.zeros(sr, dtype=np.float32)
    wav = np.concatenate([pad, wav, pad, pad])
    vad = StreamingVAD(SileroVAD(), sample_rate=sr)
    ctrl = Controller()
    actions = []
    for i in range(0, len(wav), sr // 50):
        for ev in vad.process(wav[i : i + sr // 50]):
            actions += ctrl.on_vad(ev)
        actions += ctrl.tick(vad.now_ms)
    names = kinds(actions)
    assert names.count("SpeechStarted") == 1  # one user turn, pauses and all
    assert names.count("CommitInput") == 1
    cancels = [a for a in actions if isinstance(a, CancelSpeculation)]
    assert cancels and all(c.reason == "user_resumed" for c in cancels)
    committed = only(actions, CommitSpeculation)
    last_spec = [a for a in actions if isinstance(a, StartSpeculation)][-1]
    assert committed.response_id == last_spec.response_id
    assert names[-3:] == ["SpeechStopped", "CommitInput", "CommitSpeculation"]
    assert ctrl.state == "bot_replying"
