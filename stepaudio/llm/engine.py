"""One streaming, cancellable interface over every way of running Step-Audio-Chat (and TTS-3B).

The controller starts speculative responses and drops them when the user keeps talking, so the
interface is built around cancellation: ``generate()`` returns a :class:`Generation` that is an
async iterator of :class:`Delta` objects and can be stopped at any point with ``cancel()`` (sync,
from anywhere) or ``aclose()`` (async, returns once the backend has stopped). Deltas carry token
ids as well as text because the TTS stage reuses the same engines to sample audio tokens.

Errors are ours: a backend that is down, slow or talks nonsense raises an :class:`EngineError`
from the iterator, which ends that one response; the engine itself keeps serving the others.

Backends (imported lazily by :func:`make_engine`, so choosing one never imports another):
``transformers`` (in process), ``vllm`` (in-process AsyncLLM), ``openai`` (a remote ``vllm serve``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from stepaudio.errors import StepAudioError
from stepaudio.llm.prompt import SamplingDefaults

if TYPE_CHECKING:
    from stepaudio.config import LLMConfig

#: ``(ids so far, logits) -> logits``: ids are prompt + generated (as transformers' processors see
#: them), logits a 1-D float tensor over the vocabulary. Runs in the engine's worker thread.
LogitsHook = Callable[[Sequence[int], Any], Any]


class EngineError(StepAudioError):
    """A generation failed; the message says why in one line. Ends one response, not the engine."""


class EngineUnavailable(EngineError):
    """The backend cannot be reached (refused, reset, DNS) after the allowed retries."""


class EngineTimeout(EngineError):
    """The backend accepted the request but did not answer in time."""


class EngineProtocolError(EngineError):
    """The backend answered something that is not an OpenAI-style completion stream."""


class EngineUnsupported(EngineError):
    """The request needs a feature this backend does not have (e.g. an in-process logits hook)."""


class FinishReason(str, Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True)
class RepetitionRule:
    """The TTS-3B ``RepetitionAwareLogitsProcessor``: ban a token that floods the recent window.

    Over the last ``window`` ids (prompt included, as in the reference), if the newest id makes up
    more than ``max_ratio`` of them, its logit becomes -inf for the next step. Nothing happens
    while fewer than ``window`` ids exist.
    """

    window: int = 10
    max_ratio: float = 0.1


#: The request field (vLLM ``SamplingParams.extra_args``, sent as ``vllm_xargs``) that asks the
#: TTS-3B server's logits processor (``stepaudio.tts.vllm_repetition``) for the rule: 1 on, 0 off.
REPETITION_XARG = "stepaudio_repetition"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling; the defaults are the reference's ``generate`` call for Step-Audio-Chat.

    ``top_k`` 50 is not in the reference's call but is what transformers' ``generate`` applies
    by default, and the checkpoints ship no ``generation_config.json`` that would change it.
    ``temperature`` 0 means greedy. ``seed`` makes one request reproducible on one engine.
    ``logits_hook`` runs in process only (transformers engine). ``repetition`` runs in process
    too, or is asked of a vLLM server that loaded ``stepaudio.tts.vllm_repetition`` (the openai
    engine, vLLM dialect, with the rule's reference constants); other engines refuse both rather
    than silently sampling differently.
    """

    temperature: float = SamplingDefaults.temperature
    top_p: float = SamplingDefaults.top_p
    top_k: int = SamplingDefaults.top_k
    max_new_tokens: int = SamplingDefaults.max_new_tokens
    stop_token_ids: tuple[int, ...] = SamplingDefaults.stop_token_ids
    seed: int | None = None
    skip_special_tokens: bool = False
    logits_hook: LogitsHook | None = field(default=None, compare=False)
    repetition: RepetitionRule | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def replace(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)

    @classmethod
    def from_config(cls, cfg: LLMConfig, **overrides: Any) -> SamplingParams:
        values: dict[str, Any] = {
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k,
            "max_new_tokens": cfg.max_new_tokens,
            "seed": cfg.seed,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Usage:
    """Token counts of one request; ``completion_tokens`` includes the stop token if one ended it.
    ``cached_prompt_tokens``: the part of the prompt a prefix cache served (0 when the backend
    does not say: vLLM reports it with ``--enable-prompt-tokens-details``)."""

    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Delta:
    """New output since the previous delta.

    ``text`` never ends inside a UTF-8 character and keeps word-initial spaces; ``token_ids`` are
    the sampled ids (stop ids excluded). The last delta of a stream has ``finish_reason`` and
    ``usage`` set, and may carry text too (held-back characters flushed at the end).
    """

    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class Generation(AsyncIterator[Delta]):
    """One running request: iterate it for deltas, stop it with ``cancel()`` or ``aclose()``.

    Iteration raises :class:`EngineError` if the backend fails; ``finish_reason`` is then ERROR.
    Cancelling the task that iterates also cancels the request.
    """

    request_id: str
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: EngineError | None = None

    def cancel(self) -> None:  # pragma: no cover - interface
        """Stop producing tokens (idempotent, thread-safe, never blocks)."""
        raise NotImplementedError

    async def aclose(self) -> None:  # pragma: no cover - interface
        """Cancel and wait until the backend has stopped working on this request."""
        raise NotImplementedError

    def __aiter__(self) -> Generation:
        return self

    async def collect(self) -> tuple[str, list[int]]:
        """Whole reply text and token ids (convenience for offline use and tests)."""
        text: list[str] = []
        ids: list[int] = []
        async for delta in self:
            text.append(delta.text)
            ids.extend(delta.token_ids)
        return "".join(text), ids


class StreamedGeneration(Generation):
    """A generation whose deltas come from an async generator `_run()` (remote and vLLM engines).

    Keeps the bookkeeping both share in one place: finish reason, usage and error are recorded as
    deltas pass, cancelling the consuming task cancels the request, and the generator is closed
    only when no other task is inside it.
    """

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._iter: AsyncIterator[Delta] = self._run()
        self._cancelled = False
        self._finished = False

    def _run(self) -> AsyncIterator[Delta]:  # pragma: no cover - interface
        raise NotImplementedError

    async def _close_iter(self) -> None:
        # A consumer blocked in __anext__ in another task finishes the generator itself (it sees
        # the stopped backend and yields the cancelled delta); closing it here would be an error.
        if not getattr(self._iter, "ag_running", False):
            await self._iter.aclose()  # type: ignore[attr-defined]
        self._finished = True

    async def __anext__(self) -> Delta:
        if self._finished:
            raise StopAsyncIteration
        try:
            delta = await self._iter.__anext__()
        except asyncio.CancelledError:
            self.cancel()
            raise
        except EngineError as exc:
            self._finished = True
            self.finish_reason, self.error = FinishReason.ERROR, exc
            raise
        except StopAsyncIteration:
            self._finished = True
            raise
        if delta.finish_reason is not None:
            self._finished = True
            self.finish_reason, self.usage = delta.finish_reason, delta.usage
        return delta


@runtime_checkable
class Engine(Protocol):
    """What the server and the CLI use; every backend implements it."""

    name: str
    #: Longest prompt + reply the backend accepts.
    max_model_len: int
    #: The checkpoint's text tokenizer (prompt building, token budgets, detokenization).
    tokenizer: Any

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> Generation: ...

    async def aclose(self) -> None: ...


class EngineBase:
    """What every backend's ``generate`` does before its own work (:meth:`_start`): the
    defaults, the prompt check, and refusing what this backend cannot honour (:meth:`unsupported`,
    and request options it does not take) rather than silently sampling differently."""

    name: str
    defaults: SamplingParams
    #: ``generate``'s keyword options beyond the sampling parameters that this backend takes
    #: (handed on to :meth:`_start`); any other is refused.
    request_options: frozenset[str] = frozenset()

    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        **options: Any,
    ) -> Generation:
        """Start one request. Raises :class:`EngineError` at once for a prompt no backend can
        run, :class:`EngineUnsupported` for what this backend cannot do; later failures arrive
        through the iterator."""
        params = params or self.defaults
        problem = self.unsupported(params) or next(
            (f"the {self.name} engine takes no {k!r} option" for k in options
             if k not in self.request_options), None)
        if problem is not None:
            raise EngineUnsupported(problem)
        return self._start(check_prompt(prompt), params, request_id or new_request_id(), **options)

    def unsupported(self, params: SamplingParams) -> str | None:
        """Why this backend cannot honour ``params`` (None: it can). By default: per-request
        Python code (logits hooks, the repetition rule) runs only in process."""
        if params.logits_hook is not None or params.repetition is not None:
            return (f"the {self.name} engine cannot run per-request Python logits hooks or "
                    "repetition rules; use the transformers engine for that request")
        return None

    def _start(self, prompt: str | list[int], params: SamplingParams, request_id: str,
               **options: Any) -> Generation:  # pragma: no cover - interface
        raise NotImplementedError


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_prompt(prompt: str | Sequence[int]) -> str | list[int]:
    """Refuse prompts no backend can run, with the same message everywhere."""
    if isinstance(prompt, str):
        if not prompt:
            raise EngineError("empty prompt")
        return prompt
    ids = [int(i) for i in prompt]
    if not ids:
        raise EngineError("empty prompt")
    if min(ids) < 0:
        raise EngineError("prompt token ids must be >= 0")
    return ids


def make_engine(cfg: LLMConfig, model_dir: str | os.PathLike[str] | None) -> Engine:
    """Build the engine named by ``cfg.engine`` for the checkpoint folder ``model_dir``.

    The folder supplies the tokenizer for every engine (the remote one too: prompts are built and
    budgeted here), and the weights for the in-process ones.
    """
    folder = Path(model_dir) if model_dir is not None else None
    if cfg.engine == "transformers":
        from stepaudio.llm.engine_transformers import TransformersEngine

        if folder is None:
            raise EngineError("the transformers engine needs the checkpoint folder")
        return TransformersEngine.from_config(cfg, folder)
    if cfg.engine == "openai":
        from stepaudio.llm.engine_openai import OpenAIEngine

        return OpenAIEngine.from_config(cfg, folder)
    if cfg.engine == "vllm":
        from stepaudio.llm.engine_vllm import VLLMEngine

        if folder is None:
            raise EngineError("the vllm engine needs the checkpoint folder")
        return VLLMEngine.from_config(cfg, folder)
    if cfg.engine == "stand-in":
        raise EngineError("llm.engine stand-in is a benchmark instrument of `stepaudio serve` "
                          "(it has no model to chat with)")
    raise EngineError(f"unknown llm engine {cfg.engine!r}")

