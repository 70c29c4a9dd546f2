"""A small, real OpenAI-compatible completions server for tests, shaped like ``vllm serve``.

Why it exists: ``transformers serve`` (the other real server the tests use) accepts text prompts
only and answers 422 to vLLM's extra fields (``stop_token_ids``, ``return_token_ids``...), so the
request shape our engine sends to vLLM could not be exercised against it. This server speaks that
shape over real HTTP on loopback, generating with our transformers engine on a tiny checkpoint,
and ends streams with ``data: [DONE]`` as vLLM does. ``/stats`` reports the model's forward calls
so tests can see that closing a stream stops generation on the server, and every request (its
prompt, the ids it sent back, and how many prompt tokens the engine's prefix cache served, which the
usage also carries as ``prompt_tokens_details.cached_tokens``, as ``vllm serve
--enable-prompt-tokens-details`` does; a request cancelled before its end has no count).

It also fails on request, the ways a real backend fails mid-reply (a vLLM restart, a proxy timing
out, an overloaded GPU): ``POST /fault`` with ``{"mode": ..., "after": N, "requests": K,
"hold": bool, "text": "..."}`` makes the next K completion streams send N chunks and then

- ``hang``: send nothing more and keep the connection open;
- ``close``: close the connection cleanly without a finish reason;
- ``reset``: abort the connection with a TCP reset;
- ``garbage``: send bytes that are not an event stream;
- ``error500``: send the error object vLLM sends when the engine dies mid-stream (code 500);
- ``http500``: (before any chunk) answer HTTP 500 instead of a stream.

``hold`` makes a stream wait after its N chunks (sending SSE keep-alive comments) until
``POST /fault/release``, so a test can let the fault happen once the reply's first audio is out.
``text`` streams that text, two characters a chunk, instead of the model's babble (a reply whose
clauses are known). ``/fault`` with ``{"mode": "none"}`` restores normal service.

Like vLLM it honours ``logit_bias`` and ignores ``vllm_xargs`` it has no processor for: a plain
server that cannot apply the TTS-3B repetition rule. Started with ``--logits-processors
stepaudio.tts.vllm_repetition:RepetitionAwareV2`` it applies the rule as that processor does
(``vllm_xargs.stepaudio_repetition``: on unless 0), through our engine's own rule.

Run: ``python tests/openai_server.py MODEL_DIR [--port 0]``; prints ``READY <port>`` when serving.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")

from stepaudio.llm.engine import (  # noqa: E402
    Delta,
    EngineError,
    FinishReason,
    RepetitionRule,
    SamplingParams,
)
from stepaudio.llm.engine_transformers import TransformersEngine  # noqa: E402

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}
FAULTS = ("none", "hang", "close", "reset", "garbage", "error500", "http500")
KEEPALIVE_S = 0.2
MAX_LOG = 500


@dataclass
class Fault:
    mode: str = "none"
    after: int = 0  # chunks sent before the fault
    requests: int = 1  # completion streams it applies to, then service is normal again
    hold: bool = False  # wait for POST /fault/release after the chunks
    text: str | None = None  # scripted reply text instead of the model's

    @classmethod
    def from_json(cls, obj: dict) -> Fault:
        fault = cls(**obj)
        if fault.mode not in FAULTS:
            raise ValueError(f"unknown fault mode {fault.mode!r}; one of {', '.join(FAULTS)}")
        return fault


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return method, path, body


def _json_response(status: int, obj: object) -> bytes:
    payload = json.dumps(obj).encode()
    return (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


def _bias_hook(bias: dict):
    """OpenAI ``logit_bias`` (token id strings to -100..100) as an engine logits hook."""
    if not bias:
        return None
    pairs = [(int(k), max(-100.0, min(100.0, float(v)))) for k, v in bias.items()]

    def hook(ids, logits):
        for token, value in pairs:
            logits[token] += value
        return logits

    return hook


class Server:
    def __init__(self, engine: TransformersEngine, served_name: str, send_done: bool,
                 repetition_processor: bool = False) -> None:
        self.engine = engine
        self.served_name = served_name
        self.send_done = send_done
        self.fault = Fault()
        self.release = asyncio.Event()
        self.faults_done = 0
        self.repetition_processor = repetition_processor
        self.log: list[dict] = []  # the last MAX_LOG requests

    def _prefix_counters(self) -> dict:
        """The fast decoder's own totals of prompt tokens copied and computed (when it runs)."""
        decoder = getattr(getattr(self.engine, "_steps", None), "decoder", None)
        if decoder is None:
            return {}
        return {"prefix_hits": decoder.prefix_hits, "prefix_misses": decoder.prefix_misses}

    def _next_fault(self) -> Fault:
        """The fault for a new stream (and one fewer left to apply)."""
        fault = self.fault
        if fault.mode == "none" and fault.text is None:
            return fault
        fault.requests -= 1
        if fault.requests <= 0:
            self.fault = Fault()
        return fault

    def _rule(self, req: dict) -> RepetitionRule | None:
        if not self.repetition_processor:
            return None
        from stepaudio.tts.vllm_repetition import EXTRA_ARGS_KEY, check_switch

        class Params:
            extra_args = req.get("vllm_xargs") or {}

        check_switch(Params)  # ValueError: a 400, as vLLM's validate_params makes it
        return RepetitionRule() if Params.extra_args.get(EXTRA_ARGS_KEY, 1) else None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, body = await _read_request(reader)
            if method == "GET" and path == "/health":
                writer.write(_json_response(200, {"status": "ok"}))
            elif method == "GET" and path == "/stats":
                writer.write(_json_response(200, {
                    "forward_calls": self.engine.forward_calls,
                    "active": self.engine.active_requests,
                    "requests": self.log,
                    **self._prefix_counters(),
                }))
            elif method == "POST" and path == "/fault":
                try:
                    self.fault = Fault.from_json(json.loads(body))
                except (TypeError, ValueError) as exc:
                    writer.write(_json_response(400, {"error": {"message": str(exc)}}))
                else:
                    self.release.clear()
                    writer.write(_json_response(200, {"fault": self.fault.mode}))
            elif method == "POST" and path == "/fault/release":
                self.release.set()
                writer.write(_json_response(200, {"released": True}))
            elif method == "GET" and path == "/fault":
                writer.write(_json_response(200, {"mode": self.fault.mode,
                                                  "faults_done": self.faults_done}))
            elif method == "POST" and path == "/v1/completions":
                await self.complete(json.loads(body), reader, writer)
            else:
                writer.write(_json_response(404, {"error": {"message": f"no route {path}"}}))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def complete(self, req: dict, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        if req.get("model") not in (None, self.served_name):
            writer.write(_json_response(404, {"error": {"message": "model not found"}}))
            return
        if not req.get("stream"):
            writer.write(_json_response(400, {"error": {"message": "this server only streams"}}))
            return
        try:
            params = SamplingParams(
                temperature=float(req.get("temperature", 1.0)),
                top_p=float(req.get("top_p", 1.0)),
                top_k=max(0, int(req.get("top_k") or 0)),
                max_new_tokens=int(req.get("max_tokens", 16)),
                stop_token_ids=tuple(req.get("stop_token_ids") or ()),
                seed=req.get("seed"),
                skip_special_tokens=bool(req.get("skip_special_tokens", True)),
                logits_hook=_bias_hook(req.get("logit_bias") or {}),
                repetition=self._rule(req),
            )
            gen = self.engine.generate(req["prompt"], params)
        except (EngineError, ValueError, KeyError) as exc:
            writer.write(_json_response(400, {"error": {"message": str(exc)}}))
            return
        fault = self._next_fault()
        record: dict = {"prompt": req["prompt"], "output": [], "cached_tokens": None}
        self.log = self.log[-(MAX_LOG - 1):] + [record]
        if fault.mode == "http500":
            await gen.aclose()
            self.faults_done += 1
            writer.write(_json_response(500, {"error": {"message": "engine crashed (fault "
                                                        "injected by the test server)"}}))
            return
        rid = f"cmpl-{uuid.uuid4().hex}"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n")
        # The peer closing its socket is the only cancel signal a completions client has.
        watcher = asyncio.ensure_future(reader.read(1))
        watcher.add_done_callback(lambda _: gen.cancel())
        with_ids = bool(req.get("return_token_ids")) and fault.text is None
        deltas = gen if fault.text is None else _scripted(fault.text)
        sent = 0
        try:
            async for delta in deltas:
                if fault.mode != "none" and sent >= fault.after:
                    await self._fail(fault, writer, watcher)
                    return
                sent += 1
                choice: dict = {"index": 0, "text": delta.text, "finish_reason": None}
                if delta.finish_reason is not None:
                    choice["finish_reason"] = delta.finish_reason.value
                    stop_ids = [] if delta.finish_reason.value != "stop" else params.stop_token_ids[:1]
                    ids = list(delta.token_ids) + list(stop_ids)  # vLLM returns the stop id
                else:
                    ids = list(delta.token_ids)
                record["output"] += list(delta.token_ids)
                if with_ids:
                    choice["token_ids"] = ids
                chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": self.served_name, "choices": [choice]}
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
            if fault.mode != "none":  # the reply had fewer chunks than the fault waits for
                await self._fail(fault, writer, watcher)
                return
            usage = gen.usage if fault.text is None else None
            if usage is not None:
                record["cached_tokens"] = usage.cached_prompt_tokens
            if usage is not None and (req.get("stream_options") or {}).get("include_usage"):
                chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": self.served_name, "choices": [],
                         "usage": {"prompt_tokens": usage.prompt_tokens,
                                   "completion_tokens": usage.completion_tokens,
                                   "total_tokens": usage.total_tokens,
                                   "prompt_tokens_details": {
                                       "cached_tokens": usage.cached_prompt_tokens}}}
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.send_done:
                writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        except EngineError as exc:
            writer.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
        finally:
            watcher.cancel()
            await gen.aclose()

    async def _fail(self, fault: Fault, writer: asyncio.StreamWriter,
                    watcher: asyncio.Future) -> None:
        """Break the stream the way ``fault.mode`` says."""
        if fault.hold:
            while not self.release.is_set() and not watcher.done():
                writer.write(b": keep-alive\n\n")  # comments keep the client's read timeout away
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.release.wait(), KEEPALIVE_S)
        self.faults_done += 1
        if fault.mode == "hang":
            await watcher  # nothing more, until the client gives up
        elif fault.mode == "close":
            await writer.drain()
            writer.close()
        elif fault.mode == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        elif fault.mode == "garbage":
            writer.write(b"\x00\xffHTTP/1.1 502 Bad Gateway\r\n<html><body>upstream gone"
                         b"</body></html>\n\n")
        elif fault.mode == "error500":
            err = {"error": {"object": "error", "message": "EngineDeadError: the engine loop "
                             "died (fault injected)", "type": "InternalServerError",
                             "code": 500}}
            writer.write(f"data: {json.dumps(err)}\n\n".encode())
        await writer.drain()


async def _scripted(text: str) -> AsyncIterator[Delta]:
    """A scripted reply as engine deltas: two characters a chunk, then a stop."""
    for i in range(0, len(text), 2):
        await asyncio.sleep(0.01)
        yield Delta(text=text[i:i + 2])
    yield Delta(finish_reason=FinishReason.STOP)


async def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--served-model-name", default="step-audio-chat")
    ap.add_argument("--no-done", action="store_true", help="end streams without data: [DONE]")
    ap.add_argument("--logits-processors", nargs="+", default=[],
                    help="only stepaudio.tts.vllm_repetition:RepetitionAwareV2 is understood")
    args = ap.parse_args(argv)
    known = {"stepaudio.tts.vllm_repetition:RepetitionAwareV2"}
    if set(args.logits_processors) - known:
        ap.error(f"unknown logits processors {sorted(set(args.logits_processors) - known)}")
    engine = TransformersEngine.from_pretrained(args.model_dir)
    server = Server(engine, args.served_model_name, send_done=not args.no_done,
                    repetition_processor=bool(args.logits_processors))
    srv = await asyncio.start_server(server.handle, args.host, args.port)
    port = srv.sockets[0].getsockname()[1]
    print(f"READY {port}", flush=True)
    async with srv:
        await srv.serve_forever()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(sys.argv[1:]))
