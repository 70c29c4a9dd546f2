"""One spoken turn answered in text: audio ids in, prompt fitted to the window, reply streamed out.

Shared by ``stepaudio chat`` and usable by the server's pipeline; the audio tokenizer and the
engine are passed in, so this module loads nothing itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from stepaudio.llm.budget import FittedPrompt, fit_chat_prompt
from stepaudio.llm.engine import Delta, Engine, FinishReason, SamplingParams, Usage


@dataclass(frozen=True)
class TurnResult:
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    usage: Usage | None
    prompt: FittedPrompt
    seconds: float
    first_token_s: float | None

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids)
        return n / self.seconds if self.seconds > 0 else 0.0


async def reply_to_audio(
    engine: Engine,
    audio_ids: Sequence[int],
    *,
    history: Iterable[tuple[str, str]] = (),
    system: str | None = None,
    params: SamplingParams | None = None,
    budget: int | None = None,
    send_text: bool = False,
    on_delta: Callable[[Delta], None] | None = None,
) -> TurnResult:
    """Answer one audio turn; raises PromptError (bad input) or EngineError (backend failure).

    ``send_text`` sends the prompt as text instead of ids, for servers that only take strings.
    """
    limit = budget if budget is not None else engine.max_model_len - (
        params.max_new_tokens if params else SamplingParams().max_new_tokens
    )
    fitted = fit_chat_prompt(engine.tokenizer, audio_ids, history, system, budget=max(1, limit))
    start = time.perf_counter()
    first: float | None = None
    gen = engine.generate(fitted.text if send_text else fitted.ids, params)
    text: list[str] = []
    ids: list[int] = []
    try:
        async for delta in gen:
            if first is None and delta.token_ids:
                first = time.perf_counter() - start
            text.append(delta.text)
            ids.extend(delta.token_ids)
            if on_delta is not None:
                on_delta(delta)
    finally:
        await gen.aclose()
    return TurnResult(
        text="".join(text),
        token_ids=ids,
        finish_reason=gen.finish_reason,
        usage=gen.usage,
        prompt=fitted,
        seconds=time.perf_counter() - start,
        first_token_s=first,
    )
