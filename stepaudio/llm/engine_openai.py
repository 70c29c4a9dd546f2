"""Remote engine: a ``vllm serve`` deployment (or any OpenAI-compatible server) over HTTP.

Uses the streaming legacy ``POST /v1/completions`` because the Step-Audio prompt is a raw string
(or token ids) built here, not a chat the server would template. Several dialogue-server replicas
can share one vLLM deployment this way, and one engine can spread over several vLLM replicas (a
pool, :mod:`stepaudio.llm.pool`): each conversation sticks to one, failed ones are taken out.

Failure handling is the point of this module: a connection refused is retried a bounded number of
times with backoff (the request has not reached the server, so a retry cannot duplicate work); a
timeout, a reset mid-stream, an HTTP error or a body that is not an OpenAI stream raises one of our
:class:`EngineError` types with a one-line message, which ends that response only. With a pool, a
refused connection moves the request to the next endpoint at once (nothing reached the first), and
an endpoint that refused, cut a stream short or timed out is taken out for the requests that
follow. Streams are accepted with or without the final ``data: [DONE]`` (vLLM sends it,
``transformers serve`` does not). Closing a generation closes its connection, which is how vLLM learns to abort the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from stepaudio.config import endpoint_urls
from stepaudio.llm.detok import IncrementalDetokenizer
from stepaudio.llm.engine import (
    REPETITION_XARG,
    Delta,
    EngineBase,
    EngineError,
    EngineProtocolError,
    EngineTimeout,
    EngineUnavailable,
    FinishReason,
    Generation,
    RepetitionRule,
    SamplingParams,
    StreamedGeneration,
    Usage,
)
from stepaudio.llm.pool import CONVERSATION, Endpoint, EndpointPool

if TYPE_CHECKING:
    from stepaudio.config import LLMConfig

log = logging.getLogger(__name__)

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.CANCELLED,
    "cancelled": FinishReason.CANCELLED,
}
_SSE_FIELDS = ("event:", "id:", "retry:")


def completion_body(
    prompt: str | list[int],
    params: SamplingParams,
    model: str,
    dialect: str,
) -> dict[str, Any]:
    """The JSON body of one streaming completion request.

    ``vllm`` adds vLLM's sampling extensions: ``stop_token_ids`` (the tokenizer's eos is ``</s>``,
    the model ends turns with id 3), ``top_k``, ``skip_special_tokens`` false and no spaces between
    special tokens (the reference decodes with transformers' defaults), and ``return_token_ids`` so
    deltas carry the exact sampled ids (TTS audio tokens), and with a repetition rule
    ``vllm_xargs`` asking the server's logits processor for it. ``openai`` sends only standard
    fields, for servers that reject unknown ones (``transformers serve`` answers 422).
    """
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.seed is not None:
        body["seed"] = params.seed
    if dialect == "vllm":
        body.update(
            stop_token_ids=list(params.stop_token_ids),
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=False,
            return_token_ids=True,
        )
        if params.top_k > 0:
            body["top_k"] = params.top_k
        if params.repetition is not None:
            # JSON true would arrive as 1 anyway (vLLM's field takes str, int or float).
            body["vllm_xargs"] = {REPETITION_XARG: 1}
    elif dialect != "openai":
        raise ValueError(f"unknown dialect {dialect!r}")
    elif params.repetition is not None:
        raise ValueError("the openai dialect cannot ask the server for a repetition rule")
    return body


def parse_sse_line(line: str) -> dict[str, Any] | None:
    """One line of an event stream: a JSON object, None to skip, ``{"done": True}`` for [DONE].

    Raises :class:`EngineProtocolError` for anything that is not part of an SSE stream, so a
    proxy's HTML error page or a misrouted port fails loudly instead of yielding empty replies.
    """
    line = line.strip()
    if not line or line.startswith(":") or line.startswith(_SSE_FIELDS):
        return None
    if not line.startswith("data:"):
        raise EngineProtocolError(f"backend sent a non-SSE line: {line[:120]!r}")
    data = line[5:].strip()
    if data == "[DONE]":
        return {"done": True}
    try:
        obj = json.loads(data)
    except ValueError:
        raise EngineProtocolError(f"backend sent invalid JSON: {data[:120]!r}") from None
    if not isinstance(obj, dict):
        raise EngineProtocolError(f"backend sent a JSON {type(obj).__name__}, not an object")
    return obj


def _error_message(obj: dict[str, Any]) -> str | None:
    """The error text of an error object in any of the shapes servers use, else None."""
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err is not None:
        return str(err)
    if obj.get("object") == "error":
        return str(obj.get("message") or obj)
    return None


class _HTTPGeneration(StreamedGeneration):
    def __init__(self, engine: OpenAIEngine, prompt: str | list[int], params: SamplingParams,
                 request_id: str, extra_body: dict[str, Any] | None = None) -> None:
        self._engine = engine
        self._prompt = prompt
        self._params = params
        self._extra_body = extra_body
        self._response: httpx.Response | None = None
        self._closing: asyncio.Task[None] | None = None
        #: The conversation of the task that asked (its requests go to its endpoint).
        self._conversation = CONVERSATION.get()
        self.endpoint: Endpoint | None = None
        super().__init__(request_id)

    def cancel(self) -> None:
        self._cancelled = True
        response = self._response
        if response is not None and not response.is_closed and self._closing is None:
            # Closing the connection is how a speculative reply is dropped: the server sees the
            # disconnect and aborts the request. Scheduled, because cancel() must not block.
            try:
                self._closing = asyncio.get_running_loop().create_task(response.aclose())
            except RuntimeError:
                pass

    async def aclose(self) -> None:
        self._cancelled = True
        if self._response is not None:
            await self._response.aclose()
        await self._close_iter()

    def _final(self, reason: FinishReason, usage: Usage) -> Delta:
        return Delta(finish_reason=reason, usage=usage)

    async def _run(self) -> AsyncIterator[Delta]:
        engine, params = self._engine, self._params
        body = completion_body(self._prompt, params, engine.model, engine.dialect)
        body.update(self._extra_body or {})
        detok = (
            IncrementalDetokenizer(engine.tokenizer, skip_special_tokens=params.skip_special_tokens)
            if engine.tokenizer is not None
            else None
        )
        completion_ids = 0
        text_chunks = 0
        usage: dict[str, Any] | None = None
        finish: FinishReason | None = None
        response, endpoint = await engine._open(body, self.request_id, self._conversation)
        self._response, self.endpoint = response, endpoint
        pool = engine.pool
        try:
            if self._cancelled:
                yield self._final(FinishReason.CANCELLED, self._usage(usage, completion_ids))
                return
            async for line in response.aiter_lines():
                obj = parse_sse_line(line)
                if obj is None:
                    continue
                if obj.get("done"):
                    break
                message = _error_message(obj)
                if message is not None:
                    raise EngineError(f"backend error: {message}")
                if obj.get("usage"):
                    usage = obj["usage"]
                choices = obj.get("choices")
                if not isinstance(choices, list):
                    raise EngineProtocolError("backend chunk has no 'choices' list")
                for choice in choices:
                    text = choice.get("text") or ""
                    ids = [int(t) for t in (choice.get("token_ids") or [])]
                    reason = choice.get("finish_reason")
                    if reason is not None:
                        finish = _FINISH.get(reason)
                        if finish is None:
                            raise EngineError(f"backend ended the reply with {reason!r}")
                        if finish is FinishReason.STOP and ids and ids[-1] in params.stop_token_ids:
                            ids = ids[:-1]  # vLLM returns the stop id; the text never has it
                    completion_ids += len(ids)
                    if detok is not None and ids:
                        # Our own detokenizer, so text is identical across engines; the server's
                        # text is used when it sent no ids.
                        text = detok.add_many(ids)
                    if text or ids:
                        text_chunks += 1
                        yield Delta(text=text, token_ids=tuple(ids))
            if finish is None:
                if self._cancelled:
                    finish = FinishReason.CANCELLED
                else:
                    raise EngineProtocolError("backend stream ended without a finish reason")
            tail = detok.flush() if detok is not None and finish is not FinishReason.CANCELLED else ""
            final_usage = self._usage(usage, completion_ids or text_chunks, finish)
            endpoint.prompt_tokens += final_usage.prompt_tokens
            endpoint.cached_tokens += final_usage.cached_prompt_tokens
            yield Delta(text=tail, finish_reason=finish, usage=final_usage)
        except EngineProtocolError as exc:  # cut short, or not an event stream: not serving
            pool.mark_down(endpoint, str(exc))
            raise
        except httpx.TimeoutException as exc:
            message = f"LLM backend at {endpoint.url} sent nothing for {engine.read_timeout_s:g} s"
            pool.mark_down(endpoint, message)
            raise EngineTimeout(message) from exc
        except (httpx.HTTPError, httpx.StreamError) as exc:
            if self._cancelled:
                yield self._final(FinishReason.CANCELLED, self._usage(usage, completion_ids))
                return
            message = (f"LLM backend at {endpoint.url} dropped the stream: "
                       f"{type(exc).__name__}: {exc}")
            pool.mark_down(endpoint, message)
            raise EngineUnavailable(message) from exc
        finally:
            endpoint.in_flight -= 1
            await response.aclose()

    def _usage(self, usage: dict[str, Any] | None, counted: int,
               finish: FinishReason | None = None) -> Usage:
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
            return Usage(int(usage.get("prompt_tokens") or 0),
                         int(usage.get("completion_tokens") or 0), cached)
        prompt = self._prompt
        if isinstance(prompt, list):
            n_prompt = len(prompt)
        elif self._engine.tokenizer is not None:
            n_prompt = len(self._engine.tokenizer.encode(prompt))
        else:
            n_prompt = 0
        # Without server usage the stop token was never seen; count it as the server would.
        extra = 1 if finish is FinishReason.STOP else 0
        return Usage(n_prompt, counted + extra)


class OpenAIEngine(EngineBase):
    """Client of an OpenAI-compatible completions server; one shared connection pool per loop."""

    name = "openai"
    request_options = frozenset({"extra_body"})

    def __init__(
        self,
        base_url: str | Sequence[str],
        model: str,
        *,
        tokenizer: Any = None,
        api_key: str | None = None,
        dialect: str = "vllm",
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        connect_retries: int = 2,
        retry_backoff_s: float = 0.25,
        max_model_len: int = 32768,
        defaults: SamplingParams | None = None,
        health_path: str = "/health",
        health_check_interval_s: float = 2.0,
    ) -> None:
        if dialect not in ("vllm", "openai"):
            raise ValueError(f"unknown dialect {dialect!r}")
        self.pool = EndpointPool(endpoint_urls(base_url), health_path=health_path,
                                 check_interval_s=health_check_interval_s,
                                 check_timeout_s=min(connect_timeout_s, 2.0))
        self.base_url = self.pool.endpoints[0].url  # the only one, unless it is a pool
        self.model = model
        self.tokenizer = tokenizer
        self.dialect = dialect
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.connect_retries = connect_retries
        self.retry_backoff_s = retry_backoff_s
        self.max_model_len = max_model_len
        self.defaults = defaults or SamplingParams()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients: dict[int, httpx.AsyncClient] = {}
        self._checkers: dict[int, asyncio.Task[None]] = {}
        #: As a TTS-3B engine: whether its requests ask the server for the repetition rule
        #: (``stepaudio.tts.remote_rule`` checks at start-up that the server applies it).
        self.repetition_rule = True

    @classmethod
    def from_config(cls, cfg: LLMConfig, model_dir: str | os.PathLike[str] | None) -> OpenAIEngine:
        tokenizer = None
        max_len = cfg.max_model_len
        if model_dir is not None and Path(model_dir).is_dir():
            from stepaudio.llm.tokenizer import load_text_tokenizer

            tokenizer = load_text_tokenizer(model_dir)
            if max_len is None:
                config = Path(model_dir) / "config.json"
                if config.is_file():
                    max_len = json.loads(config.read_text(encoding="utf-8")).get("max_seq_len")
        api_key = None
        if cfg.api_key_env:
            api_key = os.environ.get(cfg.api_key_env)
            if not api_key:
                raise EngineError(f"llm.api_key_env: environment variable {cfg.api_key_env} is unset")
        return cls(
            cfg.base_url,
            cfg.served_model_name,
            tokenizer=tokenizer,
            api_key=api_key,
            dialect=cfg.dialect,
            connect_timeout_s=cfg.connect_timeout_s,
            read_timeout_s=cfg.read_timeout_s,
            connect_retries=cfg.connect_retries,
            max_model_len=int(max_len or 32768),
            defaults=SamplingParams.from_config(cfg),
            health_path=cfg.health_path,
            health_check_interval_s=cfg.health_check_interval_s,
        )

    def single(self, url: str) -> OpenAIEngine:
        """An engine like this one on the pool's endpoint ``url`` alone (to check each replica
        of a pool at start-up); it shares nothing that needs closing with this one."""
        twin = copy.copy(self)
        twin.pool = EndpointPool([url], check_interval_s=self.pool.check_interval_s)
        twin.base_url = url
        twin._clients, twin._checkers = {}, {}
        return twin

    def unsupported(self, params: SamplingParams) -> str | None:
        if params.logits_hook is not None:
            return ("the openai engine cannot run in-process logits hooks; use the transformers "
                    "engine for that request")
        if params.repetition is not None and (
            self.dialect != "vllm" or params.repetition != RepetitionRule()
        ):
            return ("the openai engine asks for the repetition rule only in the vllm dialect and "
                    "with the reference's window 10 / ratio 0.1 (what "
                    "stepaudio.tts.vllm_repetition applies)")
        return None

    def _start(self, prompt: str | list[int], params: SamplingParams, request_id: str,
               **options: Any) -> Generation:
        """Connecting happens on the first ``__anext__``. ``extra_body``: more fields for this
        request's JSON body (they win over ours)."""
        return _HTTPGeneration(self, prompt, params, request_id, options.get("extra_body"))

    def _client(self) -> httpx.AsyncClient:
        # An httpx client's pool belongs to one event loop; tests (and CLI runs) may use several.
        loop = asyncio.get_running_loop()
        client = self._clients.get(id(loop))
        if client is None or client.is_closed:
            timeout = httpx.Timeout(
                connect=self.connect_timeout_s,
                read=self.read_timeout_s,
                write=self.read_timeout_s,
                pool=self.connect_timeout_s,
            )
            client = httpx.AsyncClient(timeout=timeout, headers=self._headers, trust_env=False)
            self._clients[id(loop)] = client
            if len(self.pool) > 1:  # one endpoint gets every request whatever its health
                self._checkers[id(loop)] = loop.create_task(self.pool.run_checks(client),
                                                            name="endpoint-health")
        return client

    async def _open(self, body: dict[str, Any], request_id: str, conversation: str | None
                    ) -> tuple[httpx.Response, Endpoint]:
        """POST to the conversation's endpoint and return the open stream (the endpoint counts
        it in flight until the generation closes it).

        A refused connection never reached the server, so it is safe to repeat: the request
        moves to the next endpoint at once, and when every endpoint has refused it, the round
        starts again after a backoff, ``connect_retries`` times. Nothing else is retried.
        """
        client = self._client()
        headers = {"X-Request-Id": request_id}
        tried: set[str] = set()
        rounds = 0
        while True:
            ep = self.pool.choose(conversation, exclude=tried)
            request = client.build_request("POST", f"{ep.url}/completions", json=body,
                                           headers=headers)
            ep.in_flight += 1  # from the choice on, so requests chosen together spread out
            try:
                response = await client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                ep.in_flight -= 1
                self.pool.mark_down(ep, f"connection failed: {exc or type(exc).__name__}")
                tried.add(ep.url)
                if len(tried) < len(self.pool):
                    continue
                if rounds >= self.connect_retries:
                    where = (ep.url if len(self.pool) == 1
                             else f"any of {len(self.pool)} endpoints ({ep.url} last)")
                    raise EngineUnavailable(
                        f"cannot reach the LLM backend at {where} after {rounds + 1} "
                        f"attempt(s): {exc or type(exc).__name__}"
                    ) from exc
                await asyncio.sleep(self.retry_backoff_s * 2**rounds)
                rounds += 1
                tried.clear()
                continue
            except httpx.TimeoutException as exc:
                ep.in_flight -= 1
                message = f"LLM backend at {ep.url} did not answer within {self.read_timeout_s:g} s"
                self.pool.mark_down(ep, message)
                raise EngineTimeout(message) from exc
            except httpx.HTTPError as exc:
                ep.in_flight -= 1
                raise EngineUnavailable(
                    f"LLM backend at {ep.url} failed: {type(exc).__name__}: {exc}"
                ) from exc
            except BaseException:  # cancelled while connecting
                ep.in_flight -= 1
                raise
            break
        if response.status_code != 200:
            ep.in_flight -= 1
            try:
                raw = (await response.aread()).decode("utf-8", "replace")
            except httpx.HTTPError:
                raw = ""
            finally:
                await response.aclose()
            detail = raw.strip().replace("\n", " ")[:200]
            try:
                obj = json.loads(raw)
                detail = (_error_message(obj) if isinstance(obj, dict) else None) or detail
            except ValueError:
                pass
            if response.status_code in (502, 503, 504):  # a gateway without its server
                self.pool.mark_down(ep, f"answered HTTP {response.status_code}")
            raise EngineError(f"LLM backend answered HTTP {response.status_code}: {detail}")
        self.pool.mark_up(ep)
        ep.requests += 1
        return response, ep

    async def aclose(self) -> None:
        checkers, self._checkers = list(self._checkers.values()), {}
        for task in checkers:
            with contextlib.suppress(RuntimeError):  # its loop is already closed
                task.cancel()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.aclose()
            except RuntimeError:  # its loop is already closed; nothing left to release
                pass
