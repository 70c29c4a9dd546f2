"""The in-process transformers engine: streaming, cancellation, concurrency, sampling, errors."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from stepaudio.llm.detok import IncrementalDetokenizer
from stepaudio.llm.engine import (
    EngineError,
    FinishReason,
    Generation,
    RepetitionRule,
    SamplingParams,
    make_engine,
)
from stepaudio.llm.engine_transformers import (
    TransformersEngine,
    apply_repetition_rule,
    sample_token,
)
from stepaudio.llm.prompt import build_chat_prompt
from stepaudio.llm.tokens import EOT_ID

TEXTS = [
    "Hello world, how are you?",
    "  two  spaces  and a trailing space ",
    "你好，世界！今天天气真好。",
    "emoji 😀🎉 mixed 中文 and English",
    "a\nnew line\n\n  indented",
    "<|BOT|>assistant\nhi<|EOT|> <audio_5>x",
]


@pytest.fixture(scope="module")
def chat_dir(tiny_root: Path) -> Path:
    return tiny_root / "Step-Audio-Chat"


@pytest.fixture(scope="module")
def base(chat_dir: Path):
    eng = TransformersEngine.from_pretrained(chat_dir, fast_decode="off")
    yield eng
    eng.close()


@pytest.fixture(scope="module", params=["per-request", "fast"])
def engine(request, base: TransformersEngine):
    """Both decode paths: the batched fast path (GPU serving, auto on CPU for tiny models) and
    the per-request one (``fast_decode: off``); every generation test runs on each."""
    if request.param == "per-request":
        yield base
        return
    eng = TransformersEngine(base.model, base.tokenizer, fast_decode="on", max_len=1024)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompt_ids(base: TransformersEngine) -> list[int]:
    audio = [65536 + 7, 65536 + 1024 + 300] * 15
    text = build_chat_prompt(audio, [("user", "hi"), ("assistant", "hello there")], system="brief")
    return base.tokenizer.encode(text)


def _only(token: int):
    """A logits hook that forces ``token`` (the test's way to steer a random-weight model)."""

    def hook(ids, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced

    return hook


# --- detokenizer -------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_equals_full_decode_and_keeps_word_spaces(base, text):
    tok = base.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    parts = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(parts) == tok.decode(ids, skip_special_tokens=False)
    if text.startswith("Hello"):
        # One-token decodes lose the word-initial spaces; the deltas keep them.
        assert "".join(tok.decode([i]) for i in ids) == text.replace(" ", "")
        assert sum(p.startswith(" ") for p in parts) == text.count(" ")


@pytest.mark.parametrize("text", ["你好，世界", "😀🎉", "naïve café"])
def test_incremental_detokenizer_never_emits_half_a_character(base, text):
    tok = base.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # byte-fallback pieces: several ids per character
    detok = IncrementalDetokenizer(tok)
    parts = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) + detok.flush() == text


# --- sampling ----------------------------------------------------------------------------------


def test_sampling_draws_only_from_top_k_and_top_p():
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0, -1.0, -2.0])
    gen = torch.Generator().manual_seed(0)
    top_k = {sample_token(logits, SamplingParams(temperature=1.0, top_p=1.0, top_k=2), gen, [])
             for _ in range(200)}
    assert top_k == {0, 1}
    # softmax mass of token 0 is ~0.66 < 0.7, so top_p 0.7 keeps exactly tokens 0 and 1.
    top_p = {sample_token(logits, SamplingParams(temperature=1.0, top_p=0.7, top_k=0), gen, [])
             for _ in range(200)}
    assert top_p == {0, 1}
    greedy = SamplingParams(temperature=0.0)
    assert sample_token(logits, greedy, None, []) == 0


def test_repetition_rule_bans_a_token_that_floods_the_window_like_the_reference():
    rule = RepetitionRule(window=10, max_ratio=0.1)
    logits = torch.zeros(8)
    apply_repetition_rule(logits, [1, 2, 3, 4, 5, 6, 7, 0, 1, 5], rule)  # 5 twice in 10
    assert logits[5] == float("-inf") and torch.isfinite(logits[:5]).all()
    logits = torch.zeros(8)
    apply_repetition_rule(logits, [1, 2, 3, 4, 6, 7, 0, 1, 2, 5], rule)  # 5 once: allowed
    assert torch.isfinite(logits).all()
    logits = torch.zeros(8)
    apply_repetition_rule(logits, [5, 5, 5], rule)  # shorter than the window: untouched
    assert torch.isfinite(logits).all()


def test_bad_sampling_values_are_refused():
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_k": -1}, {"max_new_tokens": 0}):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


# --- generation --------------------------------------------------------------------------------


async def test_stream_carries_text_ids_usage_and_length_finish(engine, prompt_ids):
    gen = engine.generate(prompt_ids, SamplingParams(max_new_tokens=12, seed=1))
    assert isinstance(gen, Generation)
    deltas = [d async for d in gen]
    ids = [t for d in deltas for t in d.token_ids]
    text = "".join(d.text for d in deltas)
    assert len(ids) == 12 and deltas[-1].finish_reason is FinishReason.LENGTH
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert gen.usage.prompt_tokens == len(prompt_ids) and gen.usage.completion_tokens == 12


async def test_text_prompt_equals_its_token_ids(engine, prompt_ids):
    text = engine.tokenizer.decode(prompt_ids[1:])  # without BOS: encode() adds it back
    a = await engine.generate(text, SamplingParams(max_new_tokens=6, seed=5)).collect()
    b = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=6, seed=5)).collect()
    assert a == b


async def test_stop_id_ends_with_stop_and_is_neither_text_nor_ids(engine, prompt_ids):
    steps = {"n": 0}

    def hook(ids, logits):
        steps["n"] += 1
        token = EOT_ID if steps["n"] == 3 else 100 + steps["n"]
        return _only(token)(ids, logits)

    gen = engine.generate(prompt_ids, SamplingParams(max_new_tokens=50, logits_hook=hook))
    text, ids = await gen.collect()
    assert ids == [101, 102] and "<|EOT|>" not in text
    assert gen.finish_reason is FinishReason.STOP
    assert gen.usage.completion_tokens == 3  # the stop token was generated, as vLLM counts it


async def test_greedy_decode_with_cache_equals_full_recompute_and_any_prefill_chunk(
    chat_dir, engine, prompt_ids
):
    params = SamplingParams(temperature=0.0, max_new_tokens=8)
    _, cached = await engine.generate(prompt_ids, params).collect()
    mode = "on" if engine.fast_path else "off"
    chunked = TransformersEngine(engine.model, engine.tokenizer, prefill_chunk=7, fast_decode=mode)
    try:
        _, chunked_ids = await chunked.generate(prompt_ids, params).collect()
    finally:
        chunked.close()
    seq = torch.tensor([prompt_ids])
    with torch.no_grad():
        for _ in range(8):
            nxt = engine.model(seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    assert cached == chunked_ids == seq[0, len(prompt_ids):].tolist()


async def test_seeded_requests_reproduce_alone_or_side_by_side(engine, prompt_ids):
    params = [SamplingParams(max_new_tokens=15, seed=s) for s in (1, 2, 3)]
    alone = [await engine.generate(prompt_ids, p).collect() for p in params]
    together = await asyncio.gather(*(engine.generate(prompt_ids, p).collect() for p in params))
    assert list(together) == alone
    assert len({tuple(ids) for _, ids in alone}) == 3


async def test_generation_never_blocks_the_event_loop(engine, prompt_ids):
    gaps: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    stop = asyncio.Event()
    task = asyncio.create_task(ticker(stop))
    started = time.perf_counter()
    await engine.generate(prompt_ids, SamplingParams(max_new_tokens=400, seed=0)).collect()
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    assert elapsed > 0.1  # long enough for the ticker to matter
    assert len(gaps) > elapsed / 0.05  # it kept ticking during generation
    assert max(gaps) < 0.1


async def test_cancel_stops_before_the_next_forward(engine, prompt_ids, monkeypatch):
    reached, release = threading.Event(), threading.Event()

    def hook(ids, logits):
        if len(ids) == len(prompt_ids) + 3:  # third new token being sampled
            reached.set()
            release.wait(5)
        return logits

    gen = engine.generate(prompt_ids, SamplingParams(max_new_tokens=100, logits_hook=hook))
    await asyncio.to_thread(reached.wait, 5)
    calls_at_cancel = engine.forward_calls
    gen.cancel()
    release.set()
    deltas = [d async for d in gen]
    assert engine.forward_calls == calls_at_cancel  # the token after the cancel was never computed
    assert [d.finish_reason for d in deltas] == [FinishReason.CANCELLED]
    assert gen.finish_reason is FinishReason.CANCELLED
    assert gen.usage.completion_tokens == 4


async def test_aclose_mid_stream_stops_the_worker_for_good(engine, prompt_ids, monkeypatch):
    calls = {"n": 0}
    owner, method = (engine.decoder, "decode") if engine.fast_path else (engine.model, "forward")
    original = getattr(owner, method)

    def slow_forward(*args, **kwargs):
        calls["n"] += 1
        time.sleep(0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, method, slow_forward)
    gen = engine.generate(prompt_ids, SamplingParams(max_new_tokens=200, seed=0))
    got = 0
    async for delta in gen:
        got += len(delta.token_ids)
        if got == 3:
            break
    await gen.aclose()
    after_close = calls["n"]
    await asyncio.sleep(0.2)
    assert calls["n"] == after_close  # nothing ran once aclose() returned
    assert after_close <= got + 1  # at most the forward already in flight
    assert engine.active_requests == 0


async def test_cancelling_the_consuming_task_cancels_the_generation(engine, prompt_ids):
    gen = engine.generate(prompt_ids, SamplingParams(max_new_tokens=100_000, seed=0))

    async def consume() -> None:
        async for _ in gen:
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await gen.aclose()
    assert engine.active_requests == 0


async def test_a_failing_request_ends_alone_and_the_engine_keeps_serving(engine, prompt_ids):
    def broken(ids, logits):
        raise RuntimeError("boom")

    bad = engine.generate(prompt_ids, SamplingParams(max_new_tokens=5, logits_hook=broken))
    good = engine.generate(prompt_ids, SamplingParams(max_new_tokens=20, seed=4))
    with pytest.raises(EngineError, match="boom"):
        await bad.collect()
    assert bad.finish_reason is FinishReason.ERROR
    _, ids = await good.collect()
    assert len(ids) == 20 and good.finish_reason is FinishReason.LENGTH
    _, again = await engine.generate(prompt_ids, SamplingParams(max_new_tokens=3)).collect()
    assert len(again) == 3


async def test_prompt_over_the_window_or_empty_is_refused_at_once(engine):
    with pytest.raises(EngineError, match="empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(EngineError, match="empty"):
        engine.generate("", SamplingParams())
    with pytest.raises(EngineError, match="context window"):
        engine.generate([5] * engine.max_model_len, SamplingParams())


async def test_reply_stops_at_the_context_window(engine, prompt_ids):
    mode = "on" if engine.fast_path else "off"
    small = TransformersEngine(engine.model, engine.tokenizer, max_model_len=len(prompt_ids) + 4,
                               fast_decode=mode)
    try:
        gen = small.generate(prompt_ids, SamplingParams(max_new_tokens=50, seed=0))
        _, ids = await gen.collect()
    finally:
        small.close()
    assert len(ids) == 4 and gen.finish_reason is FinishReason.LENGTH


async def test_make_engine_builds_the_configured_transformers_engine(chat_dir, prompt_ids):
    from stepaudio.config import LLMConfig

    eng = make_engine(LLMConfig(max_new_tokens=4, seed=9, prefill_chunk_tokens=64), chat_dir)
    try:
        assert eng.name == "transformers" and eng.prefill_chunk == 64
        assert eng.fast_path  # auto: the tiny checkpoint's static cache is small
        gen = eng.generate(prompt_ids)  # the config's sampling defaults
        _, ids = await gen.collect()
        assert len(ids) == 4
    finally:
        await eng.aclose()
    with pytest.raises(EngineError, match="closed"):
        eng.generate(prompt_ids)
