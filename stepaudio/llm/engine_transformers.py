"""In-process engine: our own decode loop over Step1ForCausalLM, on CPU or one GPU.

Why our own loop and not ``model.generate``: generate cannot be stopped between two tokens from
outside, runs one request per call, and hides the per-step logits a TTS repetition rule needs.
Here one worker thread owns the model and round-robins one step (a prefill chunk or one decode
token) per active request, so several generations progress together, a long prompt does not
freeze the others for more than one chunk, and a cancel is honoured before the next forward.
The asyncio loop only ever waits on a queue; it never runs model code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from stepaudio.llm import compat
from stepaudio.llm.detok import IncrementalDetokenizer
from stepaudio.llm.engine import (
    Delta,
    EngineError,
    FinishReason,
    Generation,
    RepetitionRule,
    SamplingParams,
    Usage,
    check_prompt,
    new_request_id,
)

if TYPE_CHECKING:
    from stepaudio.config import LLMConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_repetition_rule(logits: torch.Tensor, ids: Sequence[int], rule: RepetitionRule) -> None:
    """Ban the newest id for one step if it fills more than ``max_ratio`` of the last window.

    In place, like the reference processor; ``ids`` include the prompt, as ``generate`` passes them.
    """
    if len(ids) < rule.window:
        return
    window = ids[-rule.window :]
    last = window[-1]
    if sum(1 for t in window if t == last) / rule.window > rule.max_ratio:
        logits[last] = float("-inf")


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    ids: Sequence[int],
) -> int:
    """Pick the next id from one row of logits, in transformers' processor order.

    Order: logits hook, repetition rule, temperature, top-k, top-p, multinomial draw; greedy when
    ``temperature`` is 0. The draw uses the request's own generator, so a seeded request is
    reproducible whatever else runs beside it.
    """
    logits = logits.float()
    if params.logits_hook is not None:
        logits = params.logits_hook(ids, logits)
    if params.repetition is not None:
        apply_repetition_rule(logits, ids, params.repetition)
    if params.temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    # Work on the few candidates only: top-k (sorted) first, then the nucleus inside it. With a
    # 74752-word vocabulary a full sort per token would cost more than a tiny model's forward.
    if 0 < params.top_k < vocab:
        values, index = torch.topk(logits, params.top_k)
    elif params.top_p < 1.0:
        values, index = torch.sort(logits, descending=True)
    else:
        values, index = logits, None
    if params.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the best one stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        values = values.masked_fill(drop, float("-inf"))
    choice = int(torch.multinomial(torch.softmax(values, dim=-1), 1, generator=generator))
    return choice if index is None else int(index[choice])


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
    cache: Any
    ids: list[int] = field(default_factory=list)  # prompt + generated, what the hooks see
    prefilled: int = 0
    completion: int = 0


class TransformersEngine:
    """Step1 in this process. Thread-safe ``generate``; one worker thread does all model work."""

    name = "transformers"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        max_model_len: int | None = None,
        prefill_chunk: int = 512,
        defaults: SamplingParams | None = None,
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
        self.prefill_chunk = prefill_chunk
        self.defaults = defaults or SamplingParams()
        self.forward_calls = 0
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._active: list[_Request] = []
        self._closing = False
        self._thread: threading.Thread | None = None

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

        import stepaudio.llm  # noqa: F401  (registers model_type step1)
        from stepaudio.errors import ModelError
        from stepaudio.llm.tokenizer import load_text_tokenizer

        folder = Path(model_dir)
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder}: not a checkpoint folder (no config.json)")
        tokenizer = load_text_tokenizer(folder)
        load_kwargs: dict[str, Any] = {}
        if dtype != "auto":
            if dtype not in DTYPES:
                raise ModelError(f"unknown dtype {dtype!r} (expected auto or {', '.join(DTYPES)})")
            load_kwargs[compat.DTYPE_KWARG] = DTYPES[dtype]
        else:
            load_kwargs[compat.DTYPE_KWARG] = "auto"
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the Step1 model from {folder}: {exc}") from exc
        return cls(model.to(device), tokenizer, **kwargs)

    @classmethod
    def from_config(cls, cfg: LLMConfig, model_dir: str | os.PathLike[str]) -> TransformersEngine:
        return cls.from_pretrained(
            model_dir,
            device=cfg.device,
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            prefill_chunk=cfg.prefill_chunk_tokens,
            defaults=SamplingParams.from_config(cfg),
        )

    # -- public API ----------------------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> Generation:
        """Start one request; must be called from a running event loop (deltas arrive on it).

        Raises :class:`EngineError` at once for an empty prompt or one that leaves no room for a
        single new token in the context window; later failures arrive through the iterator.
        """
        params = params or self.defaults
        prompt = check_prompt(prompt)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if len(ids) >= self.max_model_len:
            raise EngineError(
                f"prompt of {len(ids)} tokens leaves no room in the {self.max_model_len}-token "
                "context window"
            )
        stream = _ThreadedGeneration(request_id or new_request_id(), len(ids), self._wake)
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
            cache=compat.new_dynamic_cache(self.model.config),
            ids=list(ids),
        )
        with self._cond:
            if self._closing:
                raise EngineError("the engine is closed")
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
        with self._cond:
            return len(self._pending) + len(self._active)

    # -- worker --------------------------------------------------------------------------------
    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="stepaudio-llm", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not (self._pending or self._active or self._closing):
                        self._cond.wait()
                    if self._closing:
                        doomed = self._pending + self._active
                        self._pending.clear()
                        self._active.clear()
                        break
                    self._active.extend(self._pending)
                    self._pending.clear()
                    active = list(self._active)
                for request in active:
                    if request.stream.cancelled:
                        self._finish(request, FinishReason.CANCELLED)
                        continue
                    try:
                        self._step(request)
                    except Exception as exc:  # one request's failure must not stop the others
                        log.exception("generation %s failed", request.stream.request_id)
                        self._fail(request, exc)
        for request in doomed:
            self._fail(request, EngineError("the engine was closed during generation"))

    def _forward(self, ids: list[int], cache: Any) -> torch.Tensor:
        self.forward_calls += 1
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
        out = self.model(
            input_ids=input_ids, use_cache=True, logits_to_keep=1, **{compat.CACHE_FIELD: cache}
        )
        return out.logits[0, -1]

    def _step(self, req: _Request) -> None:
        """One unit of work: a prefill chunk, or one forward that yields one new token."""
        params = req.params
        if req.prefilled < len(req.prompt_ids):
            chunk = req.prompt_ids[req.prefilled : req.prefilled + self.prefill_chunk]
            logits = self._forward(chunk, req.cache)
            req.prefilled += len(chunk)
            if req.prefilled < len(req.prompt_ids):
                return
        else:
            logits = self._forward([req.ids[-1]], req.cache)
        token = sample_token(logits, params, req.generator, req.ids)
        req.completion += 1
        if token in params.stop_token_ids:
            self._finish(req, FinishReason.STOP)
            return
        req.ids.append(token)
        text = req.detok.add(token)
        req.stream._post(Delta(text=text, token_ids=(token,)))
        if req.completion >= params.max_new_tokens or len(req.ids) >= self.max_model_len:
            self._finish(req, FinishReason.LENGTH)

    def _remove(self, req: _Request) -> None:
        with self._cond:
            if req in self._active:
                self._active.remove(req)
        req.cache = None  # free the KV cache now, not when the stream object dies

    def _finish(self, req: _Request, reason: FinishReason) -> None:
        self._remove(req)
        text = req.detok.flush() if reason is not FinishReason.CANCELLED else ""
        usage = Usage(prompt_tokens=len(req.prompt_ids), completion_tokens=req.completion)
        req.stream._post(Delta(text=text, finish_reason=reason, usage=usage), last=True)

    def _fail(self, req: _Request, exc: BaseException) -> None:
        self._remove(req)
        error = exc if isinstance(exc, EngineError) else EngineError(
            f"generation failed: {type(exc).__name__}: {exc}"
        )
        req.stream._post(error, last=True)
