"""The openai engine against real servers on loopback, and against real sockets that misbehave.

Two real model servers serve the tiny Step-Audio-Chat checkpoint in their own processes:
``transformers serve`` (the unmodified transformers server, text prompts, standard fields, streams
that end without ``[DONE]``) and ``tests/openai_server.py`` (vLLM's request shape: token-id
prompts, ``stop_token_ids``, ``return_token_ids``, ``[DONE]``). The error paths use a closed port
and small asyncio servers in the test process that answer garbage over real TCP.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from backend_process import TESTS, free_port, openai_server, running

from stepaudio.cli import main as cli_main
from stepaudio.llm.engine import (
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    EngineUnsupported,
    FinishReason,
    RepetitionRule,
    SamplingParams,
)
from stepaudio.llm.engine_openai import OpenAIEngine, completion_body, parse_sse_line
from stepaudio.llm.engine_transformers import TransformersEngine
from stepaudio.llm.prompt import build_chat_prompt
from stepaudio.llm.tokenizer import load_text_tokenizer

HAVE_SERVING = all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "openai"))


@pytest.fixture(scope="module")
def chat_dir(tiny_root: Path) -> Path:
    return tiny_root / "Step-Audio-Chat"


@pytest.fixture(scope="module")
def tokenizer(chat_dir: Path):
    return load_text_tokenizer(chat_dir)


@pytest.fixture(scope="module")
def prompt(tokenizer) -> str:
    return build_chat_prompt([65536 + 3, 65536 + 1024 + 9] * 12, [("user", "hi")], system="brief")


def _server_process(script: str, args: list[str], tmp_path_factory) -> Iterator[str]:
    """``tests/<script> ARGS --port P`` in its own process until healthy; yields its …/v1 URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("srv") / f"{script}.log"
    with running([sys.executable, str(TESTS / script), *args, "--port", str(port)], port,
                 log) as url:
        yield url


@pytest.fixture(scope="module")
def vllm_like(chat_dir: Path, tmp_path_factory) -> Iterator[str]:
    """tests/openai_server.py in its own process; yields its base URL (…/v1)."""
    with openai_server(chat_dir, tmp_path_factory.mktemp("srv") / "openai_server.log") as url:
        yield url


@pytest.fixture(scope="module")
def hf_serve(chat_dir: Path, tmp_path_factory) -> Iterator[str]:
    """The real ``transformers serve`` in its own process; yields its base URL (…/v1)."""
    if not HAVE_SERVING:
        pytest.skip("transformers[serving] is not installed")
    port = free_port()
    log = tmp_path_factory.mktemp("srv") / "transformers_serve.log"
    with running([sys.executable, str(TESTS / "transformers_serve_step1.py"), str(chat_dir),
                  "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"], port, log) as url:
        yield url


# --- request and stream format (no server) ----------------------------------------------------


def test_vllm_dialect_sends_stop_ids_top_k_and_asks_for_token_ids():
    body = completion_body([1, 4, 5], SamplingParams(seed=2), "step-audio-chat", "vllm")
    assert body["prompt"] == [1, 4, 5] and body["stream"] is True
    assert body["stop_token_ids"] == [3] and body["top_k"] == 50 and body["seed"] == 2
    assert body["return_token_ids"] is True and body["skip_special_tokens"] is False
    assert body["stream_options"] == {"include_usage": True}


def test_openai_dialect_sends_only_standard_fields():
    body = completion_body("hi", SamplingParams(), "m", "openai")
    assert set(body) <= {"model", "prompt", "max_tokens", "temperature", "top_p", "stream",
                         "stream_options", "seed"}


@pytest.mark.parametrize(
    "line, expected",
    [("", None), (": keep-alive", None), ("event: completion", None),
     ("data: [DONE]", {"done": True}), ('data: {"choices": []}', {"choices": []})],
)
def test_sse_lines_are_parsed(line, expected):
    assert parse_sse_line(line) == expected


@pytest.mark.parametrize("line", ["<html>oops</html>", "data: {not json", "data: [1, 2]"])
def test_non_sse_lines_are_protocol_errors(line):
    with pytest.raises(EngineProtocolError):
        parse_sse_line(line)


def test_remote_engine_refuses_in_process_hooks():
    engine = OpenAIEngine("http://127.0.0.1:9/v1", "m")
    with pytest.raises(EngineUnsupported):
        engine.generate("x", SamplingParams(logits_hook=lambda ids, logits: logits))
    # The rule can only be asked of a vLLM server, and only the reference's rule.
    with pytest.raises(EngineUnsupported):
        engine.generate("x", SamplingParams(repetition=RepetitionRule(window=8)))
    with pytest.raises(EngineUnsupported):
        OpenAIEngine("http://127.0.0.1:9/v1", "m", dialect="openai").generate(
            "x", SamplingParams(repetition=RepetitionRule()))


def test_tts_requests_ask_the_server_for_the_repetition_rule():
    from stepaudio.tts.sampling import tts_sampling_params

    body = completion_body([1, 4, 5], tts_sampling_params(300, seed=1), "step-audio-tts-3b", "vllm")
    assert body["vllm_xargs"] == {"stepaudio_repetition": 1}
    assert body["top_k"] == 50 and body["temperature"] == 0.7 and body["top_p"] == 1.0
    off = tts_sampling_params(300, seed=1, repetition_rule=False)
    assert "vllm_xargs" not in completion_body([1], off, "m", "vllm")
    engine = OpenAIEngine("http://127.0.0.1:9/v1", "m")
    assert engine.repetition_rule  # TTS requests ask unless the start-up check says otherwise


# --- a vLLM-shaped real server -------------------------------------------------------------------


async def test_remote_reply_equals_the_in_process_engine_with_the_same_seed(
    vllm_like, chat_dir, tokenizer, prompt
):
    engine = OpenAIEngine(vllm_like, "step-audio-chat", tokenizer=tokenizer)
    params = SamplingParams(max_new_tokens=12, seed=11)
    try:
        gen = engine.generate(prompt, params)
        text, ids = await gen.collect()
        by_ids = await engine.generate(tokenizer.encode(prompt), params).collect()
    finally:
        await engine.aclose()
    local = TransformersEngine.from_pretrained(chat_dir)
    try:
        expected = await local.generate(prompt, params).collect()
    finally:
        local.close()
    assert (text, ids) == expected == by_ids
    assert gen.finish_reason is FinishReason.LENGTH
    assert gen.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert gen.usage.completion_tokens == 12


async def test_closing_a_stream_stops_generation_on_the_server(vllm_like, tokenizer, prompt):
    engine = OpenAIEngine(vllm_like, "step-audio-chat", tokenizer=tokenizer)
    stats = vllm_like.removesuffix("/v1") + "/stats"
    try:
        gen = engine.generate(prompt, SamplingParams(max_new_tokens=1_000_000, seed=0))
        n = 0
        async for delta in gen:
            n += len(delta.token_ids)
            if n >= 5:
                break
        await gen.aclose()
        async with httpx.AsyncClient() as client:
            deadline = time.monotonic() + 5
            # another process's counter: polling its HTTP endpoint is all there is to wait on
            while (await client.get(stats)).json()["active"] and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            first = (await client.get(stats)).json()
            await asyncio.sleep(0.3)
            second = (await client.get(stats)).json()
        assert first["active"] == 0
        assert second["forward_calls"] == first["forward_calls"]  # the server stopped generating
    finally:
        await engine.aclose()


async def test_cancel_from_another_task_ends_the_stream_as_cancelled(vllm_like, tokenizer, prompt):
    engine = OpenAIEngine(vllm_like, "step-audio-chat", tokenizer=tokenizer)
    try:
        gen = engine.generate(prompt, SamplingParams(max_new_tokens=1_000_000, seed=0))
        first = await gen.__anext__()
        assert first.token_ids
        asyncio.get_running_loop().call_later(0.05, gen.cancel)
        rest = [d async for d in gen]
        assert rest[-1].finish_reason is FinishReason.CANCELLED
        assert gen.finish_reason is FinishReason.CANCELLED
    finally:
        await engine.aclose()


async def test_chat_cli_through_the_openai_engine(vllm_like, tiny_root, tmp_path, capsys, audio_dir):
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(f"llm:\n  engine: openai\n  base_url: {vllm_like}\n  dialect: vllm\n")
    rc = await asyncio.to_thread(
        cli_main,
        ["chat", "--models", str(tiny_root), str(audio_dir / "multilingual1.wav"),
         "--config", str(cfg), "--max-new-tokens", "8", "--seed", "1"],
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip() and "[openai]" in captured.err and "reply 8 tokens" in captured.err


# --- the real transformers serve -----------------------------------------------------------------


async def test_transformers_serve_stream_without_done_is_accepted(hf_serve, chat_dir, tokenizer,
                                                                  prompt):
    engine = OpenAIEngine(hf_serve, str(chat_dir), tokenizer=tokenizer, dialect="openai")
    try:
        gen = engine.generate(prompt, SamplingParams(max_new_tokens=6, seed=1))
        deltas = [d async for d in gen]
    finally:
        await engine.aclose()
    assert gen.finish_reason is FinishReason.LENGTH
    assert "".join(d.text for d in deltas)
    assert gen.usage.completion_tokens == 6
    assert gen.usage.prompt_tokens == len(tokenizer.encode(prompt))


async def test_transformers_serve_rejecting_vllm_fields_is_one_clear_error(hf_serve, chat_dir,
                                                                           tokenizer, prompt):
    engine = OpenAIEngine(hf_serve, str(chat_dir), tokenizer=tokenizer, dialect="vllm")
    try:
        with pytest.raises(EngineError, match="HTTP 422"):
            await engine.generate(prompt, SamplingParams(max_new_tokens=2)).collect()
        ok = engine.__class__(hf_serve, str(chat_dir), tokenizer=tokenizer, dialect="openai")
        _, _ = await ok.generate(prompt, SamplingParams(max_new_tokens=2)).collect()
        await ok.aclose()
    finally:
        await engine.aclose()


# --- failures over real sockets ------------------------------------------------------------------


async def test_closed_port_fails_after_a_bounded_number_of_attempts():
    port = free_port()  # bound then released: nothing listens there
    engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", connect_retries=2,
                          retry_backoff_s=0.05, connect_timeout_s=1)
    started = time.perf_counter()
    with pytest.raises(EngineUnavailable, match="after 3 attempt"):
        await engine.generate("hello", SamplingParams(max_new_tokens=2)).collect()
    elapsed = time.perf_counter() - started
    assert 0.15 <= elapsed < 3  # two backoffs (0.05 + 0.1), then it gives up
    await engine.aclose()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]


async def _serve(handler: Handler, port: int = 0) -> tuple[asyncio.Server, str]:
    async def wrapped(reader, writer):
        try:
            await reader.readuntil(b"\r\n\r\n")
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", port)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"


def _raw(status: str, ctype: str, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


def _sse(*events: str) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    return head + b"".join(f"data: {e}\n\n".encode() for e in events)


def _chunk(text: str, ids: list[int] | None = None, finish: str | None = None) -> str:
    choice: dict = {"index": 0, "text": text, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    return json.dumps({"id": "x", "object": "text_completion", "choices": [choice]})


GARBAGE = {
    "html page": (_raw("200 OK", "text/html", b"<html><body>welcome</body></html>"),
                  EngineProtocolError, "non-SSE"),
    "bad json": (_sse("{not json"), EngineProtocolError, "invalid JSON"),
    "no choices": (_sse('{"hello": 1}'), EngineProtocolError, "choices"),
    "cut short": (_sse(_chunk("a", [5])), EngineProtocolError, "without a finish reason"),
    "http 500": (_raw("500 Internal Server Error", "application/json",
                      b'{"error": {"message": "CUDA out of memory"}}'), EngineError,
                 "HTTP 500: CUDA out of memory"),
    "error mid-stream": (_sse(_chunk("a", [5]), '{"error": {"message": "engine dead"}}'),
                         EngineError, "engine dead"),
    "odd finish": (_sse(_chunk("a", [5], finish="content_filter")), EngineError,
                   "content_filter"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
async def test_a_server_answering_garbage_is_a_clear_error(case):
    payload, error, message = GARBAGE[case]

    async def handler(reader, writer):
        writer.write(payload)
        await writer.drain()

    server, url = await _serve(handler)
    engine = OpenAIEngine(url, "m", connect_retries=0)
    try:
        gen = engine.generate("hello", SamplingParams(max_new_tokens=4))
        with pytest.raises(error, match=message):
            await gen.collect()
        assert gen.finish_reason is FinishReason.ERROR and gen.error is not None
        assert "\n" not in str(gen.error)
    finally:
        await engine.aclose()
        server.close()


async def test_silent_server_times_out_instead_of_hanging():
    async def handler(reader, writer):
        await asyncio.sleep(10)

    server, url = await _serve(handler)
    engine = OpenAIEngine(url, "m", read_timeout_s=0.3, connect_retries=0)
    started = time.perf_counter()
    try:
        with pytest.raises(EngineTimeout):
            await engine.generate("hello", SamplingParams(max_new_tokens=4)).collect()
    finally:
        await engine.aclose()
        server.close()
    assert time.perf_counter() - started < 3


async def test_stream_with_done_strips_the_stop_id_and_reads_usage():
    stream = _sse(
        _chunk(" Hel", [10]),
        _chunk("lo", [11, 3], finish="stop"),
        json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}),
        "[DONE]",
    )

    async def handler(reader, writer):
        writer.write(stream)
        await writer.drain()

    server, url = await _serve(handler)
    engine = OpenAIEngine(url, "m")  # no tokenizer: the server's text is used as is
    try:
        gen = engine.generate([1, 2, 3, 4, 5, 6, 7], SamplingParams())
        text, ids = await gen.collect()
    finally:
        await engine.aclose()
        server.close()
    assert (text, ids) == (" Hello", [10, 11])
    assert gen.finish_reason is FinishReason.STOP
    assert (gen.usage.prompt_tokens, gen.usage.completion_tokens) == (7, 3)


async def test_a_failed_response_leaves_the_engine_serving_the_next_one():
    replies = [_raw("200 OK", "text/html", b"<html>proxy error</html>"),
               _sse(_chunk("ok", [7], finish="length"), "[DONE]")]

    async def handler(reader, writer):
        writer.write(replies.pop(0))
        await writer.drain()

    server, url = await _serve(handler)
    engine = OpenAIEngine(url, "m", connect_retries=0)
    try:
        with pytest.raises(EngineProtocolError):
            await engine.generate("a", SamplingParams()).collect()
        assert await engine.generate("b", SamplingParams()).collect() == ("ok", [7])
    finally:
        await engine.aclose()
        server.close()


async def test_connection_retry_reaches_a_server_that_comes_up_late():
    port = free_port()
    stream = _sse(_chunk("up", [9], finish="length"))

    async def handler(reader, writer):
        writer.write(stream)
        await writer.drain()

    async def start_later():
        await asyncio.sleep(0.3)
        return await _serve(handler, port)

    starter = asyncio.create_task(start_later())
    engine = OpenAIEngine(f"http://127.0.0.1:{port}/v1", "m", connect_retries=4,
                          retry_backoff_s=0.1)
    try:
        assert await engine.generate("x", SamplingParams()).collect() == ("up", [9])
    finally:
        await engine.aclose()
        server, _ = await starter
        server.close()


# --- the TTS-3B repetition rule on a remote server: checked at start-up --------------------------


def _tts_server(tts_dir: Path, tmp_path_factory, *extra: str) -> Iterator[str]:
    yield from _server_process("openai_server.py",
                      [str(tts_dir), "--served-model-name", "step-audio-tts-3b", *extra],
                      tmp_path_factory)


@pytest.fixture(scope="module")
def plain_tts(tiny_root: Path, tmp_path_factory) -> Iterator[str]:
    """A vLLM-shaped server of the tiny TTS-3B without the stepaudio logits processor."""
    yield from _tts_server(tiny_root / "Step-Audio-TTS-3B", tmp_path_factory)


@pytest.fixture(scope="module")
def ruled_tts(tiny_root: Path, tmp_path_factory) -> Iterator[str]:
    """The same server started with the processor, as `stepaudio vllm-command --tts` starts vLLM."""
    from stepaudio.llm.vllm_args import TTS_LOGITS_PROCESSOR

    yield from _tts_server(tiny_root / "Step-Audio-TTS-3B", tmp_path_factory,
                           "--logits-processors", TTS_LOGITS_PROCESSOR)


def _tts_config(url: str, rule: str):
    from stepaudio.config import Config

    return Config.model_validate({"tts": {"engine": "openai", "base_url": url,
                                          "repetition_rule": rule}})


def test_a_tts_server_without_the_rule_is_refused_at_start_up(plain_tts, tiny_root):
    from server.workers import _load_synthesizer
    from stepaudio.tts.remote_rule import RepetitionRuleMissing

    with pytest.raises(RepetitionRuleMissing) as err:
        _load_synthesizer(_tts_config(plain_tts, "on"), tiny_root, None)
    msg = str(err.value)
    assert "does not apply the TTS-3B repetition rule" in msg
    assert "stepaudio vllm-command --tts" in msg and "tts.repetition_rule: off" in msg


def test_repetition_rule_off_allows_that_server_with_a_warning(plain_tts, tiny_root, caplog):
    from server.workers import _load_synthesizer

    with caplog.at_level("WARNING"):
        synth = _load_synthesizer(_tts_config(plain_tts, "off"), tiny_root, None)
    assert synth.engine.repetition_rule is False
    assert any("repetition_rule is off" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)


async def test_the_check_passes_a_server_that_applies_the_rule_and_tts_asks_for_it(
        ruled_tts, tiny_root):
    from server.workers import _load_synthesizer
    from stepaudio.tts.remote_rule import PROBE_ID, PROBE_PROMPT

    synth = await asyncio.to_thread(_load_synthesizer, _tts_config(ruled_tts, "on"), tiny_root, None)
    try:
        assert synth.engine.repetition_rule is True
        # What the server does with the requests TTS sends: the newest id fills the last ten,
        # so the rule bans it; asked to switch the rule off, the same request gets it.
        bias = {"logit_bias": {str(PROBE_ID): 100}}
        greedy = SamplingParams(temperature=0.0, top_k=0, max_new_tokens=1, stop_token_ids=(),
                                repetition=RepetitionRule())
        _, on = await synth.engine.generate(PROBE_PROMPT, greedy, extra_body=bias).collect()
        _, off = await synth.engine.generate(
            PROBE_PROMPT, greedy.replace(repetition=None),
            extra_body={**bias, "vllm_xargs": {"stepaudio_repetition": 0}},
        ).collect()
        assert off == [PROBE_ID] and on != off
    finally:
        await synth.aclose()


def test_every_replica_of_a_tts_pool_is_checked(ruled_tts, plain_tts, tiny_root):
    """One replica that applies the rule does not vouch for another that does not."""
    from server.workers import _load_synthesizer
    from stepaudio.tts.remote_rule import RepetitionRuleMissing

    with pytest.raises(RepetitionRuleMissing) as err:
        _load_synthesizer(_tts_config([ruled_tts, plain_tts], "on"), tiny_root, None)
    assert plain_tts in str(err.value) and ruled_tts not in str(err.value)


@pytest.fixture(scope="module")
def hf_serve_tts(tiny_root: Path, tmp_path_factory) -> Iterator[str]:
    """The real ``transformers serve`` of the tiny TTS-3B; yields its base URL (…/v1)."""
    if not HAVE_SERVING:
        pytest.skip("transformers[serving] is not installed")
    yield from _server_process("transformers_serve_step1.py",
                      [str(tiny_root / "Step-Audio-TTS-3B"), "--host", "127.0.0.1", "--device",
                       "cpu"], tmp_path_factory)


async def test_transformers_serve_as_tts_server_is_refused(hf_serve_tts):
    """A plain OpenAI-compatible server (vLLM's fields answered 422) cannot be asked for the rule."""
    from stepaudio.tts.remote_rule import probe

    engine = OpenAIEngine(hf_serve_tts, "step-audio-tts-3b")
    try:
        problem = await probe(engine)
    finally:
        await engine.aclose()
    assert problem is not None and hf_serve_tts in problem
