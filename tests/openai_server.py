"""A small, real OpenAI-compatible completions server for tests, shaped like ``vllm serve``.

Why it exists: ``transformers serve`` (the other real server the tests use) accepts text prompts
only and answers 422 to vLLM's extra fields (``stop_token_ids``, ``return_token_ids``...), so the
request shape our engine sends to vLLM could not be exercised against it. This server speaks that
shape over real HTTP on loopback, generating with our transformers engine on a tiny checkpoint,
and ends streams with ``data: [DONE]`` as vLLM does. ``/stats`` reports the model's forward calls
so tests can see that closing a stream stops generation on the server.

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
import sys
import time
import uuid

os.environ.setdefault("OMP_NUM_THREADS", "1")

from stepaudio.llm.engine import EngineError, RepetitionRule, SamplingParams  # noqa: E402
from stepaudio.llm.engine_transformers import TransformersEngine  # noqa: E402

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found"}


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
        self.repetition_processor = repetition_processor

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
                }))
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
        rid = f"cmpl-{uuid.uuid4().hex}"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n")
        # The peer closing its socket is the only cancel signal a completions client has.
        watcher = asyncio.ensure_future(reader.read(1))
        watcher.add_done_callback(lambda _: gen.cancel())
        with_ids = bool(req.get("return_token_ids"))
        try:
            async for delta in gen:
                choice: dict = {"index": 0, "text": delta.text, "finish_reason": None}
                if delta.finish_reason is not None:
                    choice["finish_reason"] = delta.finish_reason.value
                    stop_ids = [] if delta.finish_reason.value != "stop" else params.stop_token_ids[:1]
                    ids = list(delta.token_ids) + list(stop_ids)  # vLLM returns the stop id
                else:
                    ids = list(delta.token_ids)
                if with_ids:
                    choice["token_ids"] = ids
                chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": self.served_name, "choices": [choice]}
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
            usage = gen.usage
            if usage is not None and (req.get("stream_options") or {}).get("include_usage"):
                chunk = {"id": rid, "object": "text_completion", "created": int(time.time()),
                         "model": self.served_name, "choices": [],
                         "usage": {"prompt_tokens": usage.prompt_tokens,
                                   "completion_tokens": usage.completion_tokens,
                                   "total_tokens": usage.total_tokens}}
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if self.send_done:
                writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        except EngineError as exc:
            writer.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
        finally:
            watcher.cancel()
            await gen.aclose()


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
