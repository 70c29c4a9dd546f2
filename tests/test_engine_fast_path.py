"""The transformers engine's batched fast path (Step1FastDecoder slots) on CPU, eagerly.

The same code serves on a GPU (there with CUDA graphs and Triton kernels), so what is pinned here
is the scheduling: seeded output equal to the per-request path, one decode call per step for all
running requests, cancellation and errors that end one request only and free its slot, and
requests beyond the slots waiting instead of failing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stepaudio.llm.engine import (
    EngineError,
    FinishReason,
    RepetitionRule,
    SamplingParams,
    make_engine,
)
from stepaudio.llm.engine_transformers import TransformersEngine
from stepaudio.llm.prompt import build_chat_prompt
from stepaudio.llm.tokens import EOT_ID

MAX_LEN = 256


@pytest.fixture(scope="module")
def slow(tiny_root: Path) -> Iterator[TransformersEngine]:
    """The per-request path (the reference the fast path must reproduce)."""
    eng = TransformersEngine.from_pretrained(tiny_root / "Step-Audio-Chat", fast_decode="off")
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompt_ids(slow: TransformersEngine) -> list[int]:
    audio = [65536 + 7, 65536 + 1024 + 300] * 15
    text = build_chat_prompt(audio, [("user", "hi"), ("assistant", "hello there")], system="brief")
    return slow.tokenizer.encode(text)


def fast_engine(slow: TransformersEngine, overlap: bool = False, **kwargs) -> TransformersEngine:
    """A fast-path engine over the same model; ``overlap`` forces the GPU's step pipelining
    (step t+1 launched before step t's ids are read), which CPU engines do not use by default."""
    kwargs = {"max_batch": 4, "max_len": MAX_LEN, **kwargs}
    eng = TransformersEngine(slow.model, slow.tokenizer, fast_decode="on", **kwargs)
    assert eng.fast_path and not eng.decoder.use_cuda_graphs and not eng._steps.overlap
    eng._steps.overlap = overlap
    return eng


@pytest.fixture(params=[False, True], ids=["sync", "overlap"])
def overlap(request) -> bool:
    return request.param


class DecodeLog:
    """Records the slots of every batched ``decode`` call (wraps the decoder's method)."""

    def __init__(self, eng: TransformersEngine) -> None:
        self.calls: list[list[int]] = []
        original = eng.decoder.decode

        def decode(slots, token_ids):
            self.calls.append(list(slots))
            return original(slots, token_ids)

        eng.decoder.decode = decode


@pytest.fixture()
def fast(slow: TransformersEngine, overlap: bool) -> Iterator[TransformersEngine]:
    eng = fast_engine(slow, overlap)
    yield eng
    eng.close()


def _only(token: int):
    def hook(ids, logits):
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced

    return hook


PARAMS = [
    SamplingParams(max_new_tokens=40, seed=3),  # temperature 0.7, top_p 0.9, top_k 50
    SamplingParams(max_new_tokens=25, seed=4, temperature=1.0, top_p=1.0, top_k=0),
    SamplingParams(max_new_tokens=25, temperature=0.0),
    SamplingParams(max_new_tokens=60, seed=5, top_p=1.0, repetition=RepetitionRule(10, 0.1)),
]


@pytest.mark.parametrize("params", PARAMS, ids=["chat", "full-vocab", "greedy", "tts-rule"])
async def test_seeded_output_equals_the_per_request_path(slow, fast, prompt_ids, params):
    want = await slow.generate(prompt_ids, params).collect()
    got = await fast.generate(prompt_ids, params).collect()
    assert got == want
    # Alone or beside others (each row has its own generator): the same ids again.
    side = [SamplingParams(max_new_tokens=30, seed=s) for s in (11, 12)]
    together = await asyncio.gather(
        fast.generate(prompt_ids, params).collect(),
        *(fast.generate(prompt_ids[: 20 + 7 * i], p).collect() for i, p in enumerate(side)),
    )
    assert together[0][1] == want[1]


async def test_concurrent_requests_share_one_decode_call_per_step(fast, prompt_ids):
    log = DecodeLog(fast)
    params = [SamplingParams(max_new_tokens=10, seed=s, stop_token_ids=()) for s in range(3)]
    with fast._cond:  # all three wait together, so the worker admits them in one round
        gens = [fast.generate(prompt_ids, p) for p in params]
    results = await asyncio.gather(*(g.collect() for g in gens))
    assert all(len(ids) == 10 for _, ids in results)
    # Each prefill yields the first token; the 9 others come from 9 steps of all three rows
    # (pipelined: plus one step launched before the last ids were read, then dropped).
    extra = int(fast._steps.overlap)
    assert log.calls == [[0, 1, 2]] * (9 + extra)
    assert fast.forward_calls == 3 + 9 + extra  # three prefills, the batched decodes


async def test_rows_join_and_leave_a_running_batch(fast, prompt_ids):
    log = DecodeLog(fast)
    reached, release = threading.Event(), threading.Event()

    def hook(ids, logits):
        if len(ids) == len(prompt_ids) + 5:  # hold the worker until the second request is in
            reached.set()
            release.wait(5)
        return logits

    params = SamplingParams(max_new_tokens=30, seed=1, stop_token_ids=(), logits_hook=hook)
    long = fast.generate(prompt_ids, params)
    await asyncio.to_thread(reached.wait, 5)
    short = fast.generate(prompt_ids[:40], SamplingParams(max_new_tokens=4, seed=2))
    release.set()
    (_, long_ids), (_, short_ids) = await asyncio.gather(long.collect(), short.collect())
    assert len(long_ids) == 30 and len(short_ids) == 4
    sizes = [len(c) for c in log.calls]
    # Alone for 5 steps, together for the short one's 3 decodes (4 pipelined: one dropped),
    # alone again to the end (long: 29 decodes, 30 pipelined).
    extra = int(fast._steps.overlap)
    assert sizes == [1] * 5 + [2] * (3 + extra) + [1] * 21


async def test_cancel_mid_stream_stops_that_request_only(fast, prompt_ids):
    log = DecodeLog(fast)
    reached, release = threading.Event(), threading.Event()

    def hook(ids, logits):
        if len(ids) == len(prompt_ids) + 3:  # the 4th new token is being sampled
            reached.set()
            release.wait(5)
        return logits

    with fast._cond:
        doomed = fast.generate(prompt_ids, SamplingParams(max_new_tokens=100, logits_hook=hook))
        other = fast.generate(prompt_ids, SamplingParams(max_new_tokens=12, seed=7))
    await asyncio.to_thread(reached.wait, 5)
    calls_at_cancel = len(log.calls)
    doomed.cancel()
    release.set()
    deltas = [d async for d in doomed]
    _, other_ids = await other.collect()
    assert [d.finish_reason for d in deltas] == [FinishReason.CANCELLED]
    assert doomed.usage.completion_tokens == 4  # the token being sampled at the cancel counts
    assert all(0 not in c for c in log.calls[calls_at_cancel:])  # no forward for it afterwards
    assert len(other_ids) == 12 and other.finish_reason is FinishReason.LENGTH
    assert fast.decoder.free_slots == [0, 1, 2, 3]


async def test_an_error_ends_one_request_and_frees_its_slot(slow, prompt_ids, overlap):
    eng = fast_engine(slow, overlap, max_batch=2)
    try:
        steps = {"n": 0}

        def broken(ids, logits):
            steps["n"] += 1
            if steps["n"] == 3:
                raise RuntimeError("boom")
            return logits

        with eng._cond:
            bad = eng.generate(prompt_ids, SamplingParams(max_new_tokens=20, logits_hook=broken))
            good = eng.generate(prompt_ids, SamplingParams(max_new_tokens=15, seed=4))
        with pytest.raises(EngineError, match="boom"):
            await bad.collect()
        assert bad.finish_reason is FinishReason.ERROR
        _, ids = await good.collect()
        assert len(ids) == 15
        assert eng.decoder.free_slots == [0, 1]
        # Both slots serve again, the failed one included.
        again = await asyncio.gather(*(
            eng.generate(prompt_ids, SamplingParams(max_new_tokens=3)).collect() for _ in range(2)
        ))
        assert [len(ids) for _, ids in again] == [3, 3]
    finally:
        eng.close()


async def test_a_failing_batched_forward_ends_that_batch_and_the_engine_recovers(
    slow, prompt_ids, overlap
):
    eng = fast_engine(slow, overlap, max_batch=2)
    try:
        original = eng.decoder.decode
        failures = {"left": 1}

        def flaky(slots, token_ids):
            if failures["left"]:
                failures["left"] -= 1
                raise RuntimeError("device lost")
            return original(slots, token_ids)

        eng.decoder.decode = flaky
        with pytest.raises(EngineError, match="device lost"):
            await eng.generate(prompt_ids, SamplingParams(max_new_tokens=5)).collect()
        assert eng.decoder.free_slots == [0, 1]
        _, ids = await eng.generate(prompt_ids, SamplingParams(max_new_tokens=5)).collect()
        assert len(ids) == 5
    finally:
        eng.close()


async def test_more_requests_than_slots_wait_and_complete(slow, prompt_ids, overlap):
    eng = fast_engine(slow, overlap, max_batch=2)
    log = DecodeLog(eng)
    try:
        params = [SamplingParams(max_new_tokens=6, seed=s) for s in range(5)]
        alone = [await slow.generate(prompt_ids, p).collect() for p in params]
        with eng._cond:
            gens = [eng.generate(prompt_ids, p) for p in params]
            assert eng.waiting_requests == 5
        results = await asyncio.gather(*(g.collect() for g in gens))
        assert list(results) == alone
        assert max(len(c) for c in log.calls) == 2
        assert eng.active_requests == 0 and eng.decoder.free_slots == [0, 1]
    finally:
        eng.close()


async def test_the_waiting_line_is_bounded(slow, prompt_ids):
    eng = fast_engine(slow, max_batch=1, max_waiting=1)
    try:
        with eng._cond:  # one request takes the slot, one waits, the third is refused
            first = eng.generate(prompt_ids, SamplingParams(max_new_tokens=3))
            second = eng.generate(prompt_ids, SamplingParams(max_new_tokens=3))
            with pytest.raises(EngineError, match="busy"):
                eng.generate(prompt_ids, SamplingParams(max_new_tokens=3))
        for gen in (first, second):
            _, ids = await gen.collect()
            assert len(ids) == 3
    finally:
        eng.close()


async def test_stop_id_and_context_window_on_the_fast_path(slow, fast, prompt_ids):
    steps = {"n": 0}

    def hook(ids, logits):
        steps["n"] += 1
        return _only(EOT_ID if steps["n"] == 3 else 100 + steps["n"])(ids, logits)

    gen = fast.generate(prompt_ids, SamplingParams(max_new_tokens=50, logits_hook=hook))
    text, ids = await gen.collect()
    assert ids == [101, 102] and "<|EOT|>" not in text and gen.finish_reason is FinishReason.STOP
    assert gen.usage.completion_tokens == 3
    assert fast.max_model_len == MAX_LEN  # the slots' length caps the window
    with pytest.raises(EngineError, match="context window"):
        fast.generate([5] * MAX_LEN, SamplingParams())
    gen = fast.generate([5] * (MAX_LEN - 3), SamplingParams(max_new_tokens=50, seed=0))
    _, ids = await gen.collect()
    assert len(ids) == 3 and gen.finish_reason is FinishReason.LENGTH


async def test_long_prompt_is_prefilled_in_chunks(slow, prompt_ids, overlap):
    eng = fast_engine(slow, overlap, prefill_chunk=16)
    try:
        params = SamplingParams(max_new_tokens=5, temperature=0.0)
        _, ids = await eng.generate(prompt_ids, params).collect()
        assert eng.forward_calls == -(-len(prompt_ids) // 16) + 4 + int(overlap)
        assert ids == (await slow.generate(prompt_ids, params).collect())[1]
    finally:
        eng.close()


async def test_close_ends_running_and_waiting_requests(slow, prompt_ids, overlap):
    eng = fast_engine(slow, overlap, max_batch=1)
    running = eng.generate(prompt_ids, SamplingParams(max_new_tokens=100_000, seed=0))
    waiting = eng.generate(prompt_ids, SamplingParams(max_new_tokens=3))
    async for _ in running:
        break
    await eng.aclose()
    for gen in (running, waiting):
        with pytest.raises(EngineError, match="closed"):
            await gen.collect()


def test_mode_selection(slow):
    assert not slow.fast_path
    # auto: on CPU while the static cache is small (the tiny checkpoints), always on CUDA.
    auto = TransformersEngine(slow.model, slow.tokenizer, max_len=64)
    try:
        assert auto.fast_path
    finally:
        auto.close()
    limit = TransformersEngine.CPU_CACHE_LIMIT
    assert not TransformersEngine.auto_fast_path(torch.device("cpu"), limit + 1)
    assert TransformersEngine.auto_fast_path(torch.device("cuda", 0), 50 * limit)
    with pytest.raises(ValueError, match="fast_decode"):
        TransformersEngine(slow.model, slow.tokenizer, fast_decode="sometimes")
    with pytest.raises(ValueError, match="Step1ForCausalLM"):
        TransformersEngine(slow.model.model, slow.tokenizer, fast_decode="on")  # no lm_head


async def test_make_engine_passes_the_fast_path_settings(tiny_root, prompt_ids):
    from stepaudio.config import LLMConfig

    cfg = LLMConfig(fast_decode="on", max_batch=3, max_len=128, max_waiting=5, max_new_tokens=4)
    eng = make_engine(cfg, tiny_root / "Step-Audio-Chat")
    try:
        assert eng.fast_path and eng.decoder.max_batch == 3 and eng.max_model_len == 128
        assert eng.max_waiting == 5
        _, ids = await eng.generate(prompt_ids[:50]).collect()
        assert len(ids) == 4
    finally:
        await eng.aclose()


def test_batched_draws_follow_the_distribution_and_each_rows_generator():
    from stepaudio.llm.sampler import RowSampling, sample_rows

    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, float("-inf")])
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    counts = torch.zeros(5)
    for _ in range(3000):
        rows = [RowSampling(params, g, []) for g in gens]
        tokens, errors = sample_rows(logits.repeat(2, 1), rows)
        assert not errors
        counts += torch.bincount(tokens, minlength=5)
    torch.testing.assert_close(counts / counts.sum(), torch.softmax(logits, 0), atol=0.015, rtol=0)
    # A row's draws depend on its own generator only, not on what else is in the batch.
    alone = sample_rows(logits[None], [RowSampling(params, torch.Generator().manual_seed(9), [])])
    beside = sample_rows(logits.repeat(2, 1), [
        RowSampling(params, torch.Generator().manual_seed(9), []),
        RowSampling(SamplingParams(temperature=0.0), None, []),
    ])
    assert int(alone[0][0]) == int(beside[0][0]) and int(beside[0][1]) == 0


def test_importing_prompts_and_engine_interface_does_not_import_transformers():
    import subprocess
    import sys

    code = ("import sys, stepaudio.llm, stepaudio.llm.prompt, stepaudio.llm.engine; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


async def test_a_prompt_extending_a_recent_one_reuses_its_keys_and_samples_the_same(slow,
                                                                                   prompt_ids):
    params = SamplingParams(max_new_tokens=12, seed=5)
    next_turn = prompt_ids + slow.tokenizer.encode("and the next turn")  # history grows
    want = await slow.generate(next_turn, params).collect()
    eng = fast_engine(slow, prefix_slots=2)
    try:
        await eng.generate(prompt_ids, params).collect()
        assert eng.decoder.prefix_hits == 0
        got = await eng.generate(next_turn, params).collect()
        assert got == want
        assert eng.decoder.prefix_hits == len(prompt_ids)  # the whole previous prompt, copied
        assert eng.decoder.prefix_misses == len(prompt_ids) + len(next_turn) - len(prompt_ids)
    finally:
        eng.close()


async def test_stream_interval_groups_tokens_into_fewer_deltas_with_the_same_ids(
        slow, prompt_ids, overlap):
    """With ``stream_interval`` k, the first token goes out alone and at once, every later delta
    but the last carries k tokens, and the ids are those of k = 1."""
    params = SamplingParams(max_new_tokens=23, seed=7, stop_token_ids=())
    one = fast_engine(slow, overlap)
    four = fast_engine(slow, overlap, stream_interval=4)
    try:
        runs = []
        for eng in (one, four):
            sizes, ids = [], []
            async for delta in eng.generate(prompt_ids, params):
                if delta.token_ids:
                    sizes.append(len(delta.token_ids))
                    ids += delta.token_ids
            runs.append((sizes, ids))
    finally:
        one.close()
        four.close()
    assert runs[0][0] == [1] * 23
    assert runs[1][0] == [1, 4, 4, 4, 4, 4, 2]
    assert runs[1][1] == runs[0][1]
    with pytest.raises(ValueError, match="stream_interval"):
        TransformersEngine(slow.model, slow.tokenizer, fast_decode="on", stream_interval=0)
