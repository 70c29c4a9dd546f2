"""In-process vLLM: ``AsyncLLM`` with tensor parallelism, for a server that owns its GPUs.

vLLM is an optional extra and heavy to import, so it is imported only when this engine is built;
without it the error names the install command. The engine flags are the same as those of the
``vllm serve`` command (``stepaudio.llm.vllm_args``). Text comes from our own incremental
detokenizer over vLLM's delta token ids, so replies read the same on every engine.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stepaudio.llm.detok import IncrementalDetokenizer
from stepaudio.llm.engine import (
    Delta,
    EngineBase,
    EngineError,
    FinishReason,
    Generation,
    SamplingParams,
    StreamedGeneration,
    Usage,
)
from stepaudio.llm.vllm_args import INSTALL_HINT, engine_kwargs, sampling_kwargs

if TYPE_CHECKING:
    from stepaudio.config import LLMConfig

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.CANCELLED}


def import_vllm() -> Any:
    """The ``vllm`` module, or a clear error saying how to get it."""
    try:
        import vllm
    except ImportError as exc:
        raise EngineError(
            f"llm.engine is 'vllm' but vLLM is not installed ({exc}); {INSTALL_HINT}, or use "
            "engine 'openai' with a separate `vllm serve` (see `stepaudio vllm-command`)"
        ) from exc
    return vllm


class _VLLMGeneration(StreamedGeneration):
    def __init__(self, engine: VLLMEngine, prompt: str | list[int], params: SamplingParams,
                 request_id: str) -> None:
        self._engine = engine
        self._prompt = prompt
        self._params = params
        super().__init__(request_id)

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        try:
            asyncio.get_running_loop().create_task(self._engine.llm.abort(self.request_id))
        except RuntimeError:
            pass

    async def aclose(self) -> None:
        self._cancelled = True
        await self._engine.llm.abort(self.request_id)
        await self._close_iter()

    async def _run(self) -> AsyncIterator[Delta]:
        vllm = self._engine.vllm
        from vllm.sampling_params import RequestOutputKind

        params = self._params
        sampling = vllm.SamplingParams(
            **sampling_kwargs(params), output_kind=RequestOutputKind.DELTA
        )
        prompt: Any = (
            self._prompt if isinstance(self._prompt, str) else {"prompt_token_ids": self._prompt}
        )
        detok = IncrementalDetokenizer(
            self._engine.tokenizer, skip_special_tokens=params.skip_special_tokens
        )
        n_prompt = 0
        n_out = 0
        try:
            async for out in self._engine.llm.generate(prompt, sampling, self.request_id):
                if out.prompt_token_ids is not None:
                    n_prompt = len(out.prompt_token_ids)
                choice = out.outputs[0]
                ids = [int(t) for t in choice.token_ids]
                n_out += len(ids)
                reason = _FINISH.get(choice.finish_reason) if choice.finish_reason else None
                if reason is FinishReason.STOP and ids and ids[-1] in params.stop_token_ids:
                    ids = ids[:-1]
                if ids:
                    yield Delta(text=detok.add_many(ids), token_ids=tuple(ids))
                if choice.finish_reason is not None:
                    if reason is None:
                        raise EngineError(f"vLLM ended the reply with {choice.finish_reason!r}")
                    tail = detok.flush() if reason is not FinishReason.CANCELLED else ""
                    yield Delta(text=tail, finish_reason=reason, usage=Usage(n_prompt, n_out))
                    return
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(f"vLLM failed: {type(exc).__name__}: {exc}") from exc
        yield Delta(finish_reason=FinishReason.CANCELLED, usage=Usage(n_prompt, n_out))


class VLLMEngine(EngineBase):
    """vLLM's AsyncLLM in this process (its workers are vLLM's own processes)."""

    name = "vllm"

    def __init__(self, llm: Any, tokenizer: Any, max_model_len: int,
                 defaults: SamplingParams | None = None) -> None:
        self.vllm = import_vllm()
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.defaults = defaults or SamplingParams()

    @classmethod
    def from_config(cls, cfg: LLMConfig, model_dir: str | os.PathLike[str]) -> VLLMEngine:
        vllm = import_vllm()
        from stepaudio.llm.tokenizer import load_text_tokenizer

        folder = Path(model_dir)
        kwargs = engine_kwargs(
            folder,
            served_model_name=cfg.served_model_name,
            tensor_parallel_size=cfg.tensor_parallel_size,
            max_model_len=cfg.max_model_len,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
        )
        from vllm.v1.engine.async_llm import AsyncLLM

        llm = AsyncLLM.from_engine_args(vllm.AsyncEngineArgs(**kwargs))
        return cls(llm, load_text_tokenizer(folder), kwargs["max_model_len"],
                   SamplingParams.from_config(cfg))

    def _start(self, prompt: str | list[int], params: SamplingParams, request_id: str,
               **options: Any) -> Generation:
        return _VLLMGeneration(self, prompt, params, request_id)

    async def aclose(self) -> None:
        self.llm.shutdown()
