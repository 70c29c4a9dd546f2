"""A stand-in for Step-Audio-Chat 130B whose timing is the real model's, measured or derived.

Why: the chat model needs four GPUs and vLLM, but the server's capacity is the speech GPU's. To
measure that on one GPU, the chat leg is replaced by this engine: no model and no GPU use (in the
real deployment the chat runs on GPUs of its own), text from a short list of spoken-style
replies, and the chat model's timing: the first token after ``prefill_ms_per_1k`` per thousand
prompt tokens, then one token every ``ms_per_token``. The defaults come from one tensor-parallel
rank of the 130B timed on an H200 (bench/RESULTS.md, "GPU anchors": prefill 74.5 / 142 / 290 ms
for 500 / 1000 / 2000 tokens, decode 23.4-26.6 ms a token at batch 1-32), plus about 1 ms a token
for the all-reduces tensor parallelism adds (an estimate). Every table that uses it says so.
Selected with ``llm.engine: stand-in``; never a default.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Sequence
from typing import Any

from stepaudio.llm.detok import IncrementalDetokenizer
from stepaudio.llm.engine import (
    Delta,
    FinishReason,
    SamplingParams,
    StreamedGeneration,
    Usage,
    check_prompt,
    new_request_id,
)

#: Spoken-style replies of two clauses, 17-22 characters (4-5 s of speech each).
REPLIES: tuple[str, ...] = (
    "好的，我明白你的意思了。我们明天上午十点见面吧。",
    "今天天气不错，适合出去散散步。你想去哪里呢？",
    "这个问题很有意思，让我想一想再回答你。",
    "没问题，我已经帮你记下来了，到时候提醒你。",
)


class _TimedGeneration(StreamedGeneration):
    def __init__(self, engine: StandInChat, ids: list[int], prompt_tokens: int,
                 params: SamplingParams, request_id: str) -> None:
        self.engine = engine
        self.ids = ids
        self.prompt_tokens = prompt_tokens
        self.params = params
        super().__init__(request_id)

    def cancel(self) -> None:
        self._cancelled = True

    async def aclose(self) -> None:
        self.cancel()
        await self._close_iter()

    async def _run(self) -> AsyncIterator[Delta]:
        eng, n = self.engine, 0
        detok = IncrementalDetokenizer(eng.tokenizer, skip_special_tokens=True)
        await asyncio.sleep(eng.first_token_s(self.prompt_tokens))
        limit = min(len(self.ids), self.params.max_new_tokens)
        for n, token in enumerate(self.ids[:limit], start=1):
            if self._cancelled:
                yield Delta(finish_reason=FinishReason.CANCELLED,
                            usage=Usage(self.prompt_tokens, n - 1))
                return
            yield Delta(text=detok.add(token), token_ids=(token,))
            if n < limit:
                await asyncio.sleep(eng.ms_per_token / 1000.0)
        reason = FinishReason.STOP if limit == len(self.ids) else FinishReason.LENGTH
        yield Delta(text=detok.flush(), finish_reason=reason,
                    usage=Usage(self.prompt_tokens, n))


class StandInChat:
    """The :class:`~stepaudio.llm.engine.Engine` interface with the chat model's timing."""

    name = "stand-in"

    def __init__(self, tokenizer: Any, *, prefill_ms_per_1k: float = 145.0,
                 ms_per_token: float = 26.0, replies: Sequence[str] = REPLIES,
                 max_model_len: int = 16384) -> None:
        if prefill_ms_per_1k < 0 or ms_per_token < 0 or not replies:
            raise ValueError("stand-in chat: timings must be >= 0 and replies not empty")
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.prefill_ms_per_1k = prefill_ms_per_1k
        self.ms_per_token = ms_per_token
        self._replies = [list(tokenizer.encode(r, add_special_tokens=False)) for r in replies]
        self._next = itertools.cycle(range(len(self._replies)))

    def first_token_s(self, prompt_tokens: int) -> float:
        return self.prefill_ms_per_1k * prompt_tokens / 1e6

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                 request_id: str | None = None) -> StreamedGeneration:
        prompt = check_prompt(prompt)
        n = len(self.tokenizer.encode(prompt)) if isinstance(prompt, str) else len(prompt)
        ids = self._replies[next(self._next)]
        return _TimedGeneration(self, ids, n, params or SamplingParams(),
                                request_id or new_request_id())

    async def aclose(self) -> None:
        return None
