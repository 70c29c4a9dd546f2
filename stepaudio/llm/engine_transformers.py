"""In-process engine: our own decode loop over Step1ForCausalLM, on CPU or one GPU.

Why our own loop and not ``model.generate``: generate cannot be stopped between two tokens from
outside, runs one request per call, and hides the per-step logits a TTS repetition rule needs.
One worker thread owns the model; the asyncio loop only ever waits on a queue and never runs
model code. The worker has two ways to step its requests:

* the **batched fast path** (:mod:`stepaudio.llm.engine_batched`, over
  :class:`~stepaudio.llm.fast_decode.Step1FastDecoder`): each request holds a KV-cache slot, and
  every step decodes all running requests in one batched call (a CUDA graph per batch bucket on
  a GPU). This is what serves on a GPU, where the per-request loop is 4.6x slower alone and
  ~40x with 8 requests, and it is also faster on CPU with the tiny checkpoints (bench/RESULTS.md);
* the **per-request path**: the model's own forward with a growing cache, one step (a prefill
  chunk or one token) per request in turn. It preallocates nothing and has no context limit
  below the model's: it stays for models that are not Step1 and for real checkpoints on CPU.

Either way a long prompt delays the others by one chunk at a time, a seeded request draws the
same ids, and a cancel is honoured before the request's next forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

from stepaudio.llm import compat
from stepaudio.llm.detok import IncrementalDetokenizer
from stepaudio.llm.engine import (
    Delta,
    EngineBase,
    EngineError,
    FinishReason,
    Generation,
    SamplingParams,
    Usage,
)
from stepaudio.llm.sampler import apply_repetition_rule, sample_token

if TYPE_CHECKING:
    from stepaudio.config import LLMConfig
    from stepaudio.llm.fast_decode import Step1FastDecoder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FastDecodeMode = Literal["auto", "on", "off"]

__all__ = ["TransformersEngine", "apply_repetition_rule", "sample_token"]


class _ThreadedGeneration(Generation):
    """Deltas produced by the worker thread, consumed on the asyncio loop that asked for them."""

    def __init__(self, request_id: str, prompt_tokens: int, wake: Any) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Delta | EngineError] = asyncio.Queue()
        self._stopped = self._loop.create_future()
        self._cancel = threading.Event()
        self._wake = wake
        self._finished = False

    # -- worker side (any thread) --------------------------------------------------------------
    def _post(self, item: Delta | EngineError, last: bool = False) -> None:
        def put() -> None:
            self._queue.put_nowait(item)
            if last and not self._stopped.done():
                self._stopped.set_result(None)

        try:
            self._loop.call_soon_threadsafe(put)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening any more
            self._cancel.set()

    # -- consumer side -------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self._cancel.set()
            self._wake()

    async def aclose(self) -> None:
        self.cancel()
        if not self._stopped.done():
            await asyncio.shield(self._stopped)
        self._finished = True

    async def __anext__(self) -> Delta:
        while True:
            if self._finished:
                raise StopAsyncIteration
            try:
                item = await self._queue.get()
            except asyncio.CancelledError:
                self.cancel()
                raise
            if isinstance(item, EngineError):
                self._finished = True
                self.finish_reason = FinishReason.ERROR
                self.error = item
                raise item
            if item.finish_reason is not None:
                self._finished = True
                self.finish_reason = item.finish_reason
                self.usage = item.usage
                return item
            if not self._cancel.is_set():  # after a cancel only the final delta matters
                return item

    def __del__(self) -> None:
        # An abandoned stream must not keep the model busy.
        with contextlib.suppress(Exception):
            self._cancel.set()


@dataclass
class _Request:
    stream: _ThreadedGeneration
    params: SamplingParams
    prompt_ids: list[int]
    detok: IncrementalDetokenizer
    generator: torch.Generator
    cache: Any = None  # per-request path: the growing KV cache
    ids: list[int] = field(default_factory=list)  # prompt + generated, what the hooks see
    prefilled: int = 0
    cached: int = 0  # prompt tokens copied from a kept prefix instead of computed
    completion: int = 0
    slot: int | None = None  # fast path: the decoder slot it holds
    unsent: list[int] = field(default_factory=list)  # fast path: ids not yet posted as deltas


class _Steps(Protocol):
    """How the worker advances its requests (per request, or batched over decoder slots)."""

    def admit(self, req: _Request) -> bool:
        """Reserve what the request needs to start; False: it waits (e.g. every slot is busy)."""

    def step(self, active: list[_Request]) -> None:
        """One round of work over the running requests; finishes/fails them through the engine."""

    def release(self, req: _Request) -> None:
        """Give back what ``admit`` reserved; called exactly once per admitted request."""


class TransformersEngine(EngineBase):
    """Step1 in this process. Thread-safe ``generate``; one worker thread does all model work.

    ``fast_decode``: ``auto`` batches through :class:`Step1FastDecoder` when the model is a
    ``Step1ForCausalLM`` (see :meth:`auto_fast_path`), ``on`` forces it, ``off`` keeps the
    per-request path. On the fast path at most ``max_batch`` requests run at once (the rest wait,
    up to ``max_waiting``), and the context window is at most ``max_len``, the length of each
    slot's static KV cache. ``cuda_graphs`` None: graphs exactly when the model is on CUDA.
    """

    name = "transformers"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_model_len: int | None = None,
        prefill_chunk: int = 512,
        defaults: SamplingParams | None = None,
        fast_decode: FastDecodeMode = "auto",
        max_batch: int = 16,
        max_len: int = 8192,
        max_waiting: int = 256,
        cuda_graphs: bool | None = None,
        prefix_slots: int = 4,
        stream_interval: int = 1,
        cuda_priority: int = 0,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        limit = getattr(model.config, "max_seq_len", None) or getattr(
            model.config, "max_position_embeddings", None
        )
        self.max_model_len = int(max_model_len or limit or 32768)
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.prefill_chunk = prefill_chunk
        if stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        #: Batched path: a delta carries at least this many tokens (the first and the last go
        #: out at once), so N streams cost the consumer's loop N wake-ups every few steps, not
        #: every step.
        self.stream_interval = stream_interval
        #: CUDA: the worker runs on a stream of this priority (negative: ahead of the default
        #: 0), so decode steps that share the GPU with another thread's kernels (the vocoder's)
        #: are dispatched first; 0 keeps the thread's default stream.
        self.cuda_priority = cuda_priority
        self.defaults = defaults or SamplingParams()
        self.max_waiting = max_waiting
        self.forward_calls = 0
        self.decoder: Step1FastDecoder | None = None
        if self._wants_fast_path(fast_decode, max_batch + prefix_slots, max_len):
            from stepaudio.llm.engine_batched import BatchedSteps

            self._steps: _Steps = BatchedSteps(
                self, max_batch=max_batch, max_len=max_len, cuda_graphs=cuda_graphs,
                prefix_slots=prefix_slots,
            )
            self.max_model_len = min(self.max_model_len, max_len)
        else:
            self._steps = _PerRequestSteps(self)
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._active: list[_Request] = []
        self._closing = False
        self._thread: threading.Thread | None = None

    def _wants_fast_path(self, mode: FastDecodeMode, slots: int, max_len: int) -> bool:
        if mode not in ("auto", "on", "off"):
            raise ValueError(f"fast_decode must be auto, on or off, not {mode!r}")
        if mode == "off":
            return False
        from stepaudio.llm.step1 import Step1ForCausalLM

        model = self.model
        if mode == "on":
            if not isinstance(model, Step1ForCausalLM):
                raise ValueError(f"fast_decode needs a Step1ForCausalLM, not "
                                 f"{type(model).__name__}")
            return True
        if not isinstance(model, Step1ForCausalLM):
            return False
        cfg = model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        per_token = 2 * cfg.num_hidden_layers * cfg.num_attention_groups * head_dim  # k and v
        element = next(model.parameters()).element_size()
        cache = per_token * (slots + 1) * max_len * element  # + 1: the scratch slot
        return self.auto_fast_path(self.device, cache)

    #: On CPU, ``auto`` takes the fast path only while its preallocated KV cache stays this small.
    CPU_CACHE_LIMIT = 1 << 30

    @classmethod
    def auto_fast_path(cls, device: torch.device, cache_bytes: int) -> bool:
        """Whether ``fast_decode: auto`` batches, for a device and the static cache it needs.

        CUDA: always (4.6x the per-request path alone, 39x with 8 requests, bench/RESULTS.md).
        CPU: it was faster too on the tiny checkpoints (1.07x alone, 2.1x with 8), but its static
        cache is allocated up front for every slot, so a real checkpoint on a CPU (gigabytes of
        cache for no speed that matters) keeps the per-request path.
        """
        if device.type == "cuda":
            return True
        return device.type == "cpu" and cache_bytes <= cls.CPU_CACHE_LIMIT

    @property
    def fast_path(self) -> bool:
        """Whether requests run batched through :attr:`decoder`."""
        return self.decoder is not None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | os.PathLike[str],
        *,
        device: str = "cpu",
        dtype: str = "float32",
        **kwargs: Any,
    ) -> TransformersEngine:
        """Load a Step1 checkpoint folder (real or tiny) and its tokenizer."""
        from transformers import AutoModelForCausalLM

        from stepaudio.errors import ModelError
        from stepaudio.llm import register_step1
        from stepaudio.llm.memory import check_fits
        from stepaudio.llm.tokenizer import load_text_tokenizer

        register_step1()  # the package is lazy: nothing else has registered model_type step1
        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder}: not a checkpoint folder (no config.json)")
        if dtype != "auto" and dtype not in DTYPES:
            raise ModelError(f"unknown dtype {dtype!r} (expected auto or {', '.join(DTYPES)})")
        # Before a single weight is read: the 130B Chat in float32 would be 528 GB.
        check_fits(folder, device, dtype)
        tokenizer = load_text_tokenizer(folder)
        load_kwargs: dict[str, Any] = {}
        if dtype != "auto":
            load_kwargs[compat.DTYPE_KWARG] = DTYPES[dtype]
        else:
            load_kwargs[compat.DTYPE_KWARG] = "auto"
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the Step1 model from {folder}: {exc}") from exc
        # transformers types the wrapped .to() of its models too narrowly for a device name
        return cls(model.to(device), tokenizer, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, cfg: LLMConfig, model_dir: str | os.PathLike[str]) -> TransformersEngine:
        return cls.from_pretrained(
            model_dir,
            device=cfg.device,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            prefill_chunk=cfg.prefill_chunk_tokens,
            defaults=SamplingParams.from_config(cfg),
            fast_decode=cfg.fast_decode,
            max_batch=cfg.max_batch,
            max_len=cfg.max_len,
            max_waiting=cfg.max_waiting,
            prefix_slots=cfg.prefix_slots,
        )

    # -- public API ----------------------------------------------------------------------------
    def unsupported(self, params: SamplingParams) -> str | None:
        return None  # logits hooks and the repetition rule run here, in the sampler

    def _start(self, prompt: str | list[int], params: SamplingParams, request_id: str,
               **options: Any) -> Generation:
        """Must be called from a running event loop (deltas arrive on it). Refuses at once a
        prompt that leaves no room for a single new token in the context window, and a request
        when ``max_waiting`` requests already wait for a slot."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if len(ids) >= self.max_model_len:
            raise EngineError(
                f"prompt of {len(ids)} tokens leaves no room in the {self.max_model_len}-token "
                "context window"
            )
        stream = _ThreadedGeneration(request_id, len(ids), self._wake)
        generator = torch.Generator(device=self.device)
        if params.seed is not None:
            generator.manual_seed(params.seed)
        else:
            generator.seed()
        request = _Request(
            stream=stream,
            params=params,
            prompt_ids=list(ids),
            detok=IncrementalDetokenizer(
                self.tokenizer, skip_special_tokens=params.skip_special_tokens
            ),
            generator=generator,
            ids=list(ids),
        )
        with self._cond:
            if self._closing:
                raise EngineError("the engine is closed")
            if len(self._pending) >= self.max_waiting + self._free_capacity():
                raise EngineError(
                    f"the engine is busy: {len(self._pending)} requests already wait to start"
                )
            self._pending.append(request)
            self._ensure_thread()
            self._cond.notify()
        return stream

    def close(self) -> None:
        """Stop the worker; requests still running end with an error. Blocks until it exits."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    @property
    def active_requests(self) -> int:
        """Requests running or waiting to start."""
        with self._cond:
            return len(self._pending) + len(self._active)

    @property
    def waiting_requests(self) -> int:
        """Requests not started yet (all slots busy, or the worker has not picked them up)."""
        with self._cond:
            return len(self._pending)

    def _free_capacity(self) -> int:
        """Requests that could start now without waiting (called with the lock held)."""
        if self.decoder is None:
            return 1 << 30
        return max(0, self.decoder.max_batch - len(self._active))

    # -- worker --------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="stepaudio-llm", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self.device.type == "cuda" and self.cuda_priority:
            stream = torch.cuda.Stream(self.device, priority=self.cuda_priority)
            stream.wait_stream(torch.cuda.current_stream(self.device))  # loading, captures
            torch.cuda.set_stream(stream)  # this thread's current stream from now on
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._pending or self._active or self._closing):
                        self._cond.wait()
                    if self._closing:
                        running, waiting = list(self._active), list(self._pending)
                        self._pending.clear()
                        break
                    while self._pending and self._steps.admit(self._pending[0]):
                        self._active.append(self._pending.pop(0))
                    stuck = [] if self._active else list(self._pending)
                    self._pending = [] if stuck else self._pending
                    active = list(self._active)
                for request in stuck:  # nothing runs and nothing can start: never spin on it
                    log.error("engine could not start request %s", request.stream.request_id)
                    self._fail(request, EngineError("no decoder slot is free"), release=False)
                try:
                    self._steps.step(active)
                except Exception as exc:  # a bug in the loop itself: fail this round's requests
                    log.exception("engine step failed")
                    for request in active:
                        if self._is_active(request):
                            self._fail(request, exc)
            closed = EngineError("the engine was closed during generation")
            for request in running:
                self._fail(request, closed)
            for request in waiting:
                self._fail(request, closed, release=False)  # never admitted: nothing to free

    def _is_active(self, req: _Request) -> bool:
        with self._cond:
            return req in self._active

    def _remove(self, req: _Request, release: bool = True) -> None:
        with self._cond:
            if req in self._active:
                self._active.remove(req)
        if release:
            self._steps.release(req)

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        self._remove(req)
        text = req.detok.flush() if reason is not FinishReason.CANCELLED else ""
        usage = Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=req.completion,
                      cached_prompt_tokens=req.cached)
        req.stream._post(Delta(text=text, finish_reason=reason, usage=usage), last=True)

    def _fail(self, req: _Request, exc: BaseException, release: bool = True) -> None:
        self._remove(req, release)
        error = exc if isinstance(exc, EngineError) else EngineError(
            f"generation failed: {type(exc).__name__}: {exc}"
        )
        req.stream._post(error, last=True)


class _PerRequestSteps:
    """The model's own forward with a growing cache, one unit of work per request in turn."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine

    def admit(self, req: _Request) -> bool:
        req.cache = compat.new_dynamic_cache(self.engine.model.config)
        return True

    def release(self, req: _Request) -> None:
        req.cache = None  # free the KV cache now, not when the stream object dies

    def step(self, active: list[_Request]) -> None:
        for request in active:
            if request.stream.cancelled:
                self.engine._finish(request, FinishReason.CANCELLED)
                continue
            try:
                self._step(request)
            except Exception as exc:  # one request's failure must not stop the others
                log.exception("generation %s failed", request.stream.request_id)
                self.engine._fail(request, exc)

    def _forward(self, ids: list[int], cache: Any) -> torch.Tensor:
        engine = self.engine
        engine.forward_calls += 1
        input_ids = torch.tensor([ids], dtype=torch.long, device=engine.device)
        out = engine.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{compat.CACHE_FIELD: cache}
        )
        return out.logits[0, -1]

    def _step(self, req: _Request) -> None:
        """One unit of work: a prefill chunk, or one forward that yields one new token."""
        engine, params = self.engine, req.params
        if req.prefilled < len(req.prompt_ids):
            chunk = req.prompt_ids[req.prefilled : req.prefilled + engine.prefill_chunk]
            logits = self._forward(chunk, req.cache)
            req.prefilled += len(chunk)
            if req.prefilled < len(req.prompt_ids):
                return
        else:
            logits = self._forward([req.ids[-1]], req.cache)
        token = sample_token(logits, params, req.generator, req.ids)
        req.completion += 1
        if token in params.stop_token_ids:
            engine._finish(req, FinishReason.STOP)
            return
        req.ids.append(token)
        text = req.detok.add(token)
        req.stream._post(Delta(text=text, token_ids=(token,)))
        if req.completion >= params.max_new_tokens or len(req.ids) >= engine.max_model_len:
            engine._finish(req, FinishReason.LENGTH)
