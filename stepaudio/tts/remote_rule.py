"""Whether a remote TTS-3B server applies the repetition rule: asked of its behaviour at start-up.

The reference samples TTS-3B with its repetition rule; without it the model stutters and loops.
A remote server applies it only if it was started with the logits processor
(``stepaudio vllm-command --tts``); a plain vLLM, or any other OpenAI-compatible server, accepts
our requests and silently samples without it. Nothing in the OpenAI API lists a server's logits
processors, so the check is two one-token greedy requests on a prompt that ends with ten copies of
one audio token, pushed to the top by ``logit_bias``:

- rule off: the server must answer that token (else it ignores ``logit_bias`` and the check
  cannot tell anything);
- rule on: the rule bans the token (it fills the last ten ids), so the server must answer another.

A server that fails either is refused with a message saying how to start one that passes, unless
the operator set ``tts.repetition_rule: off``: then requests do not ask for the rule and the server
logs a warning.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

from stepaudio.llm.engine import REPETITION_XARG, EngineError, RepetitionRule, SamplingParams
from stepaudio.llm.tokens import AUDIO_TOKEN_OFFSET, BOS_ID
from stepaudio.tts.sampling import REPETITION_WINDOW

log = logging.getLogger(__name__)

#: An audio token the probe makes the model want (any id the TTS vocabulary has).
PROBE_ID = AUDIO_TOKEN_OFFSET + 1024 + 7
PROBE_PROMPT = [BOS_ID] + [PROBE_ID] * REPETITION_WINDOW
HOW_TO_FIX = (
    "start TTS-3B with the command `stepaudio vllm-command --tts` prints (it loads "
    "--logits-processors stepaudio.tts.vllm_repetition:RepetitionAwareV2, and stepaudio must be "
    "importable in vLLM's environment: docs/vllm.md), or, knowing that TTS-3B then stutters and "
    "loops, set tts.repetition_rule: off"
)


class RepetitionRuleMissing(EngineError):
    """The remote TTS server does not apply the repetition rule (or the check could not tell)."""


async def _greedy_token(engine: Any, rule: bool) -> int | None:
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_new_tokens=1,
                            stop_token_ids=(), repetition=RepetitionRule() if rule else None)
    extra: dict[str, Any] = {"logit_bias": {str(PROBE_ID): 100}}
    if not rule:
        extra["vllm_xargs"] = {REPETITION_XARG: 0}
    gen = engine.generate(PROBE_PROMPT, params, extra_body=extra)
    ids: list[int] = []
    try:
        async for delta in gen:
            ids += delta.token_ids
    finally:
        await gen.aclose()
    return ids[0] if ids else None


async def probe(engine: Any) -> str | None:
    """None if the server applies the rule, else what is wrong (one sentence)."""
    where = getattr(engine, "base_url", "the TTS server")
    try:
        control = await _greedy_token(engine, rule=False)
        if control != PROBE_ID:
            return (f"{where} ignores logit_bias (it answered {control} where the bias forces "
                    f"{PROBE_ID}), so whether it applies the repetition rule cannot be checked")
        asked = await _greedy_token(engine, rule=True)
    except EngineError as err:
        return f"{where} refused the check's request ({err})"
    if asked == PROBE_ID:
        return (f"{where} does not apply the TTS-3B repetition rule (it was not started with the "
                f"stepaudio logits processor)")
    return None


def check_remote_rule(engine: Any, setting: Literal["on", "off"]) -> bool:
    """At start-up (no event loop running in this thread): whether TTS requests to ``engine``
    ask for the rule. Raises :class:`RepetitionRuleMissing` when it is wanted but not applied."""
    if setting == "off":
        log.warning("tts.repetition_rule is off: TTS-3B samples without the reference's "
                    "repetition rule and may stutter or loop")
        return False

    pool = getattr(engine, "pool", None)
    # Every replica of a pool is asked: each one serves its own share of the conversations.
    engines = [engine.single(ep.url) for ep in pool] if pool is not None and len(pool) > 1 \
        else [engine]

    async def run() -> str | None:
        try:
            for one in engines:
                problem = await probe(one)
                if problem is not None:
                    return problem
            return None
        finally:
            for one in {id(e): e for e in [*engines, engine]}.values():
                await one.aclose()  # their connection pools belong to this short-lived loop

    problem = asyncio.run(run())
    if problem is not None:
        raise RepetitionRuleMissing(f"{problem}: {HOW_TO_FIX}")
    log.info("the TTS server%s at %s appl%s the repetition rule", "s" if len(engines) > 1 else "",
             ", ".join(getattr(e, "base_url", "?") for e in engines),
             "y" if len(engines) > 1 else "ies")
    return True
