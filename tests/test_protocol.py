"""Wire protocol: parsing never raises, errors name the field, both dialects render as OpenAI's."""

from __future__ import annotations

import base64
import json
import random
import typing
import warnings

import numpy as np
import pytest

from server import protocol as p
from server.protocol import (
    AudioFormat,
    ProtocolError,
    SessionConfig,
    apply_session_update,
    dialect_from_handshake,
    parse_client_event,
)

# --- G.711 codecs ------------------------------------------------------------------------------


def test_ulaw_known_values():
    assert p.ulaw_encode(np.array([0, 32767, -32768, 1000], dtype=np.int16)).tolist() == [
        0xFF,
        0x80,
        0x00,
        0xCE,
    ]
    assert p.ulaw_decode(bytes([0x00, 0x80, 0xFF, 0x7F])).tolist() == [-32124, 32124, 0, 0]


def test_alaw_known_values():
    assert p.alaw_encode(np.array([0, 32767, -32768, -1], dtype=np.int16)).tolist() == [
        0xD5,
        0xAA,
        0x2A,
        0x55,
    ]
    assert p.alaw_decode(bytes([0xD5, 0x55, 0x00, 0x80])).tolist() == [8, -8, -5504, 5504]


def test_codecs_match_the_retired_audioop_on_every_sample():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")  # gone in Python 3.13; the known values above stay
    pcm = np.arange(-32768, 32768, dtype=np.int16)
    raw = pcm.astype("<i2").tobytes()
    codes = bytes(range(256))
    assert p.ulaw_encode(pcm).tobytes() == audioop.lin2ulaw(raw, 2)
    assert p.alaw_encode(pcm).tobytes() == audioop.lin2alaw(raw, 2)
    assert p.ulaw_decode(codes).astype("<i2").tobytes() == audioop.ulaw2lin(codes, 2)
    assert p.alaw_decode(codes).astype("<i2").tobytes() == audioop.alaw2lin(codes, 2)


@pytest.mark.parametrize("kind", ["pcm16", "g711_ulaw", "g711_alaw"])
def test_audio_round_trip_through_each_wire_format(kind):
    fmt = AudioFormat(kind=kind)
    t = np.arange(fmt.rate // 10) / fmt.rate
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    b64 = p.encode_audio_b64(x, fmt)
    raw = p.decode_base64(b64)
    assert isinstance(raw, bytes) and len(raw) == len(x) * fmt.bytes_per_sample
    assert fmt.ms(len(raw)) == pytest.approx(100.0)
    y = p.decode_audio(raw, fmt)
    assert isinstance(y, np.ndarray)
    err = np.abs(y - x).max()
    assert err < (1e-4 if kind == "pcm16" else 0.02)  # G.711: ~8 bits of precision near 0.5


def test_pcm16_with_an_odd_byte_count_is_an_error():
    err = p.decode_audio(b"\x00\x01\x02", AudioFormat(), event_id="e9")
    assert isinstance(err, ProtocolError)
    assert (err.code, err.param, err.event_id) == ("invalid_audio", "audio", "e9")
    assert "even number of bytes" in err.message
    assert isinstance(p.decode_audio(b"\x00\x01\x02", AudioFormat(kind="g711_ulaw")), np.ndarray)


# --- parsing ---------------------------------------------------------------------------------------


def err_of(data, max_bytes: int = 1 << 20) -> ProtocolError:
    out = parse_client_event(data, max_bytes)
    assert isinstance(out, ProtocolError), out
    return out


def test_append_decodes_base64_audio():
    pcm = np.arange(8, dtype="<i2").tobytes()
    ev = parse_client_event(
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})
    )
    assert isinstance(ev, p.InputAudioBufferAppend) and ev.raw == pcm


@pytest.mark.parametrize(
    ("audio", "code"),
    [
        ("not base64!", "invalid_base64"),
        ("AAA", "invalid_base64"),
        ("QUJD\nREVG", "invalid_base64"),
        ("", "invalid_audio"),
    ],
)
def test_append_rejects_bad_base64(audio, code):
    err = err_of(
        json.dumps({"type": "input_audio_buffer.append", "audio": audio, "event_id": "c1"})
    )
    assert (err.code, err.param, err.event_id) == (code, "audio", "c1")


def test_malformed_json_is_an_error():
    assert err_of('{"type": "session.update", ').code == "invalid_json"
    assert err_of(b"\xff\xfe\x00").code == "invalid_json"
    assert err_of('{"type": "response.create", "x": NaN}').code == "invalid_json"
    assert err_of("[" * 100000 + "]" * 100000).code in ("invalid_json", "invalid_event")


def test_event_must_be_an_object_with_a_string_type():
    assert err_of("[1, 2]").code == "invalid_event"
    assert err_of("{}").code == "missing_required_parameter"
    assert err_of('{"type": 5}').param == "type"


def test_unknown_event_type_lists_the_known_ones():
    err = err_of('{"type": "session.upate", "event_id": "e1"}')
    assert err.code == "unknown_event_type" and err.event_id == "e1"
    assert "session.update" in err.message
    assert "server event" in err_of('{"type": "response.audio.delta"}').message


def test_wrong_field_type_names_the_field():
    err = err_of(
        json.dumps(
            {
                "type": "session.update",
                "session": {"turn_detection": {"silence_duration_ms": "900"}},
            }
        )
    )
    assert err.code == "invalid_type"
    assert err.param == "session.turn_detection.silence_duration_ms"
    assert "session.turn_detection.silence_duration_ms" in err.message and '"900"' in err.message


def test_out_of_range_value_names_the_field():
    err = err_of(json.dumps({"type": "session.update", "session": {"stepaudio": {"pause_ms": 5}}}))
    assert err.code == "invalid_value" and err.param == "session.stepaudio.pause_ms"


def test_unknown_field_is_reported_like_openai_does():
    err = err_of(
        json.dumps({"type": "session.update", "session": {"turn_detection": {"silence_ms": 900}}})
    )
    assert err.code == "unknown_parameter"
    assert "Unknown parameter: 'session.turn_detection.silence_ms'." in err.message


def test_missing_field_is_reported():
    err = err_of('{"type": "conversation.item.truncate", "item_id": "x", "content_index": 0}')
    assert err.code == "missing_required_parameter" and err.param == "audio_end_ms"


def test_integral_floats_are_integers_but_fractions_are_not():
    ok = parse_client_event(
        '{"type":"conversation.item.truncate","item_id":"i","content_index":0,"audio_end_ms":1500.0}'
    )
    assert isinstance(ok, p.ConversationItemTruncate) and ok.audio_end_ms == 1500
    assert (
        err_of('{"type":"conversation.item.truncate","item_id":"i","audio_end_ms":1500.5}').param
        == "audio_end_ms"
    )
    assert (
        err_of('{"type":"conversation.item.truncate","item_id":"i","audio_end_ms":true}').code
        == "invalid_type"
    )


def test_oversized_message_is_refused_before_parsing():
    big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 5000})
    assert err_of(big, max_bytes=4096).code == "message_too_large"
    assert err_of(big.encode(), max_bytes=4096).code == "message_too_large"
    wide = json.dumps(
        {"type": "session.update", "session": {"instructions": "说" * 1500}}, ensure_ascii=False
    )
    assert len(wide) < 4096 < len(wide.encode())
    assert err_of(wide, max_bytes=4096).code == "message_too_large"


def test_item_create_checks_roles_and_content():
    def create(item):
        return parse_client_event(json.dumps({"type": "conversation.item.create", "item": item}))

    ok = create(
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "你好"}]}
    )
    assert isinstance(ok, p.ConversationItemCreate)
    assert p.item_from_client(ok.item).content[0].text == "你好"
    bad = create(
        {"type": "message", "role": "user", "content": [{"type": "output_text", "text": "x"}]}
    )
    assert isinstance(bad, ProtocolError) and bad.param == "item.content[0].type"
    tool = create({"type": "function_call", "name": "f", "arguments": "{}"})
    assert isinstance(tool, ProtocolError) and tool.code == "unsupported_feature"
    audio = create(
        {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": "%%"}]}
    )
    assert isinstance(audio, ProtocolError) and audio.param == "item.content[0].audio"
    ga_reply = create(
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "嗯"}]}
    )
    assert isinstance(ga_reply, p.ConversationItemCreate)


def test_response_create_overrides_and_refusals():
    ev = parse_client_event(
        json.dumps(
            {
                "type": "response.create",
                "response": {
                    "instructions": "简短",
                    "voice": {"id": "Tingting"},
                    "stepaudio": {"instruction": "(高兴1)(粤语)"},
                },
            },
            ensure_ascii=False,
        )
    )
    assert isinstance(ev, p.ResponseCreate) and ev.response.voice == "Tingting"
    assert (
        err_of('{"type":"response.create","response":{"conversation":"none"}}').param
        == "response.conversation"
    )
    assert (
        err_of('{"type":"response.create","response":{"tools":[{"type":"function"}]}}').code
        == "unsupported_feature"
    )
    assert (
        err_of('{"type":"response.create","response":{"stepaudio":{"instruction":"happy"}}}').code
        == "invalid_value"
    )


def test_parser_never_raises_on_garbage():
    rng = random.Random(5)
    seeds = [
        '{"type":"session.update","session":{"audio":{"input":{"format":{"type":"audio/pcm","rate":24000}}}}}',
        '{"type":"input_audio_buffer.append","audio":"AAAA"}',
        '{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[]}}',
    ]
    for _ in range(3000):
        s = bytearray(rng.choice(seeds).encode())
        for _ in range(rng.randint(1, 6)):
            op = rng.random()
            i = rng.randrange(len(s))
            if op < 0.4:
                s[i] = rng.randrange(256)
            elif op < 0.7:
                del s[i]
            else:
                s.insert(i, rng.choice(b'{}[]":,0123456789.-eEtruefalsn\\'))
        out = parse_client_event(bytes(s), 4096)
        assert isinstance(out, (ProtocolError, p.ClientEventBase))


# --- dialects and session configuration ------------------------------------------------------------


def test_handshake_dialect_follows_what_the_sdks_send():
    assert dialect_from_handshake({"OpenAI-Beta": "realtime=v1"}) == "beta"
    assert dialect_from_handshake({}, ["realtime", "openai-beta.realtime-v1"]) == "beta"
    assert dialect_from_handshake({"Authorization": "Bearer x"}) == "ga"
    assert dialect_from_handshake({"OpenAI-Beta": "realtime=v1"}, query={"dialect": "ga"}) == "ga"


def patch(session: dict) -> p.SessionPatch:
    ev = parse_client_event(
        json.dumps({"type": "session.update", "session": session}, ensure_ascii=False)
    )
    assert isinstance(ev, p.SessionUpdate), ev
    return ev.session


def test_session_update_reveals_the_dialect():
    assert p.session_update_dialect(patch({"input_audio_format": "g711_ulaw"})) == "beta"
    assert p.session_update_dialect(patch({"type": "realtime", "instructions": "x"})) == "ga"
    assert p.session_update_dialect(patch({"instructions": "x", "voice": "Tingting"})) is None
    mixed = p.session_update_dialect(patch({"turn_detection": None, "audio": {}}))
    assert isinstance(mixed, ProtocolError) and mixed.code == "mixed_dialect"


def test_beta_and_ga_updates_reach_the_same_configuration():
    beta = apply_session_update(
        SessionConfig(),
        patch(
            {
                "input_audio_format": "g711_ulaw",
                "output_audio_format": "g711_alaw",
                "turn_detection": {
                    "type": "server_vad",
                    "silence_duration_ms": 900,
                    "threshold": 0.6,
                },
                "voice": "alloy",
            }
        ),
    )
    ga = apply_session_update(
        SessionConfig(),
        patch(
            {
                "type": "realtime",
                "audio": {
                    "input": {
                        "format": {"type": "audio/pcmu"},
                        "turn_detection": {
                            "type": "server_vad",
                            "silence_duration_ms": 900,
                            "threshold": 0.6,
                        },
                    },
                    "output": {"format": {"type": "audio/pcma"}, "voice": "alloy"},
                },
            }
        ),
    )
    assert isinstance(beta, SessionConfig) and isinstance(ga, SessionConfig)
    assert beta.model_dump(exclude={"id"}) == ga.model_dump(exclude={"id"})
    assert beta.input_format.rate == 8000 and beta.output_format.kind == "g711_alaw"
    assert beta.speaker == p.DEFAULT_VOICE  # OpenAI voice names fall back to the default speaker


def test_defaults_are_step_audio_defaults():
    cfg = SessionConfig()
    assert cfg.turn_detection.silence_duration_ms == 750 and cfg.stepaudio.pause_ms == 250
    assert cfg.input_format == AudioFormat(kind="pcm16") and cfg.input_format.rate == 24000


def test_turn_detection_null_means_manual_turns_and_nested_fields_merge():
    cfg = apply_session_update(SessionConfig(), patch({"turn_detection": None}))
    assert cfg.turn_detection is None
    cfg = apply_session_update(cfg, patch({"turn_detection": {"silence_duration_ms": 1000}}))
    assert (
        cfg.turn_detection.type == "server_vad" and cfg.turn_detection.silence_duration_ms == 1000
    )
    cfg = apply_session_update(cfg, patch({"turn_detection": {"prefix_padding_ms": 100}}))
    assert (cfg.turn_detection.silence_duration_ms, cfg.turn_detection.prefix_padding_ms) == (
        1000,
        100,
    )
    cfg = apply_session_update(
        cfg, patch({"turn_detection": {"type": "semantic_vad", "eagerness": "high"}})
    )
    assert cfg.turn_detection.end_of_turn_ms == 400


def test_stepaudio_extras_merge_and_drive_the_tts_instruction():
    cfg = apply_session_update(
        SessionConfig(), patch({"stepaudio": {"instruction": "(高兴1)", "min_barge_in_ms": 500}})
    )
    cfg = apply_session_update(cfg, patch({"speed": 1.4, "stepaudio": {"pause_ms": 200}}))
    assert (cfg.stepaudio.pause_ms, cfg.stepaudio.min_barge_in_ms) == (200, 500)
    assert cfg.tts_instruction == "(高兴1)(快速2)"


def test_rejected_update_changes_nothing():
    cfg = SessionConfig()
    out = apply_session_update(
        cfg, patch({"instructions": "新的", "tools": [{"type": "function", "name": "f"}]})
    )
    assert isinstance(out, ProtocolError) and out.param == "session.tools"
    assert cfg.instructions == p.DEFAULT_INSTRUCTIONS


def test_pcm_rates_other_than_24k_are_refused():
    out = parse_client_event(
        json.dumps(
            {
                "type": "session.update",
                "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            }
        )
    )
    assert isinstance(out, ProtocolError) and out.param == "session.audio.input.format.rate"


# --- server events -----------------------------------------------------------------------------------


def test_renamed_events_follow_the_dialect():
    ev = p.AudioDelta(response_id="r", item_id="i", delta="AAAA")
    assert ev.to_wire("beta")["type"] == "response.audio.delta"
    assert ev.to_wire("ga")["type"] == "response.output_audio.delta"
    tr = p.AudioTranscriptDone(response_id="r", item_id="i", transcript="好")
    assert tr.to_wire("ga")["type"] == "response.output_audio_transcript.done"
    item = p.Item(role="user", content=[p.ContentPart(type="input_audio")])
    assert p.ConversationItemCreated(item=item).to_wire("ga")["type"] == "conversation.item.added"
    assert p.ConversationItemDone(item=item).to_wire("beta") is None
    state = p.StateChanged(
        state="user_speaking", previous="silence", reason="speech_started", at_ms=5
    )
    assert state.to_wire("beta")["type"] == state.to_wire("ga")["type"] == "stepaudio.state"


def test_assistant_content_types_follow_the_dialect():
    item = p.Item(role="assistant", content=[p.ContentPart(type="audio", transcript="好")])
    assert item.render("beta")["content"][0]["type"] == "audio"
    assert item.render("ga")["content"][0]["type"] == "output_audio"


def test_response_done_carries_status_reason_and_usage():
    resp = p.Response(
        status="cancelled",
        reason="turn_detected",
        usage=p.Usage(input_audio_tokens=30, output_text_tokens=5),
    )
    wire = p.ResponseDone(response=resp).to_wire("ga")["response"]
    assert wire["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert (
        wire["usage"]["total_tokens"] == 35
        and wire["usage"]["input_token_details"]["audio_tokens"] == 30
    )
    failed = p.Response(
        status="failed",
        error=ProtocolError(type="server_error", code="model_error", message="boom"),
    )
    assert failed.render("beta")["status_details"]["error"]["code"] == "model_error"


def test_error_event_echoes_the_client_event_id():
    wire = err_of('{"type":"nope","event_id":"client-7"}').to_event().to_wire("beta")
    assert wire["type"] == "error" and wire["error"]["event_id"] == "client-7"
    assert set(wire["error"]) == {"type", "code", "message", "param", "event_id"}


# --- against the official SDK's own types (a third party's reading of the protocol) ------------------


def _sdk_events(dialect: str):
    item = p.Item(
        role="assistant", status="in_progress", content=[p.ContentPart(type="audio", transcript="")]
    )
    resp = p.Response(output=[item], usage=p.Usage(input_text_tokens=3))
    common = dict(response_id=resp.id, item_id=item.id)
    return [
        p.SessionCreated(session=SessionConfig()),
        p.SessionUpdated(session=SessionConfig(turn_detection=None)),
        p.SpeechStarted(audio_start_ms=700, item_id="item_u"),
        p.SpeechStopped(audio_end_ms=2000, item_id="item_u"),
        p.InputAudioBufferCommitted(item_id="item_u"),
        p.InputAudioBufferCleared(),
        p.ConversationItemCreated(
            item=p.Item(role="user", content=[p.ContentPart(type="input_audio")])
        ),
        p.TranscriptionCompleted(
            item_id="item_u", transcript="你好", usage={"type": "duration", "seconds": 1.5}
        ),
        p.ConversationItemTruncated(item_id=item.id, audio_end_ms=900),
        p.ConversationItemDeleted(item_id=item.id),
        p.ResponseCreated(response=resp),
        p.OutputItemAdded(response_id=resp.id, item=item),
        p.ContentPartAdded(**common, part=p.Part()),
        p.AudioDelta(**common, delta="AAAA"),
        p.AudioDone(**common),
        p.AudioTranscriptDelta(**common, delta="你"),
        p.AudioTranscriptDone(**common, transcript="你好"),
        p.ResponseDone(response=resp.model_copy(update={"status": "completed"})),
        err_of("{}").to_event(),
    ]


@pytest.mark.parametrize("dialect", ["beta", "ga"])
def test_server_events_validate_against_the_openai_sdk_types(dialect):
    mod = pytest.importorskip(
        "openai.types.realtime" if dialect == "ga" else "openai.types.beta.realtime"
    )
    union = typing.get_args(mod.RealtimeServerEvent)[0]  # Annotated[Union[...], discriminator]
    by_type = {}
    for cls in typing.get_args(union):
        name = typing.get_args(cls.model_fields["type"].annotation)
        by_type.update(dict.fromkeys(name, cls))
    for ev in _sdk_events(dialect):
        wire = ev.to_wire(dialect)
        if wire["type"].startswith("session.") and dialect == "beta":
            wire["session"]["model"] = (
                "gpt-realtime"  # the beta SDK enumerates OpenAI's model names
            )
        by_type[wire["type"]].model_validate(wire)  # raises on any shape difference
