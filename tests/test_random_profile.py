"""The ``random`` profile: the speech models built in memory at a shape, with random weights,
served end to end (here CPU-sized; on a GPU at the published shapes, configs/gpu-random.yaml)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
from realtime_helpers import RealtimeClient, server_config, turn

from server.instruments.standin_chat import StandInChat
from stepaudio.config import load_config
from stepaudio.errors import ConfigError
from stepaudio.llm.engine import SamplingParams
from stepaudio.random_models import (
    build_cosyvoice,
    build_tts_lm,
    random_synthesizer,
    speech_seconds,
    text_tokenizer,
)
from stepaudio.tts.sampling import AUDIO_ID_END
from stepaudio.tts.synthesizer import SynthOptions


def _random_config(**llm):
    cfg = server_config()
    cfg.models.profile = "random"
    cfg.models.sizes = "small"
    cfg.llm.engine = "stand-in"
    cfg.llm.standin_prefill_ms_per_1k = llm.get("prefill", 20.0)
    cfg.llm.standin_ms_per_token = llm.get("per_token", 2.0)
    cfg.tts.max_batch = 4
    cfg.tts.max_len = 2048
    return cfg


def test_gpu_random_config_is_valid():
    cfg = load_config("configs/gpu-random.yaml")
    assert cfg.models.profile == "random" and cfg.models.sizes == "published"
    assert cfg.llm.engine == "stand-in" and cfg.tts.device.startswith("cuda")
    assert cfg.tts.engine == "transformers" and cfg.tts.max_batch >= 64


def test_published_shapes_are_the_real_ones():
    lm = build_tts_lm("meta", sizes="published")  # shapes only, no memory
    assert sum(p.numel() for p in lm.parameters()) == pytest.approx(3.53e9, rel=0.01)
    cv = build_cosyvoice("cpu", sizes="published")
    flow = sum(p.numel() for p in cv.flow.parameters()) / 1e6
    hift = sum(p.numel() for p in cv.hift.parameters()) / 1e6
    assert flow == pytest.approx(105.4, abs=0.5) and hift == pytest.approx(20.5, abs=0.5)


async def test_random_tts_speaks_audio_ids_for_as_long_as_a_voice_would():
    synth = random_synthesizer("cpu", sizes="small", options=SynthOptions(batching=True),
                               engine_options={"max_batch": 2, "max_len": 2048})
    try:
        text = "今天天气不错，适合出去散散步。"
        wav, report = await synth.synthesize(text, synth.voice("Tingting"), seed=1)
    finally:
        await synth.aclose()
    assert report.skipped_ids == 0 and report.flow_tokens > 0  # steered: audio ids only
    assert len(wav) / 22050 == pytest.approx(speech_seconds("今天天气不错，") +
                                             speech_seconds("适合出去散散步。"), abs=0.1)
    assert not report.warnings and np.isfinite(wav).all()


def test_steered_head_prefers_every_audio_id_over_any_other():
    import torch

    lm = build_tts_lm("cpu", sizes="small")
    with torch.no_grad():
        logits = lm(torch.tensor([[1, 4, 70000, 65536 + 5]])).logits[0]
    top = logits.argmax(-1)
    assert ((top >= 65536) & (top < AUDIO_ID_END)).all()


async def test_stand_in_chat_keeps_the_chat_models_timing():
    eng = StandInChat(text_tokenizer(), prefill_ms_per_1k=200.0, ms_per_token=20.0)
    t0 = time.perf_counter()
    gen = eng.generate(list(range(1, 501)), SamplingParams(max_new_tokens=6))
    first = await gen.__anext__()
    ttft = time.perf_counter() - t0
    rest = [d async for d in gen]
    total = time.perf_counter() - t0
    assert ttft == pytest.approx(0.1, abs=0.05)  # 500 tokens at 200 ms per 1000
    assert total == pytest.approx(0.1 + 5 * 0.02, abs=0.08)
    text = first.text + "".join(d.text for d in rest)
    assert text and gen.finish_reason.value == "length" and len(rest) == 6  # 5 ids + the end


def test_random_profile_refuses_a_real_chat_engine():
    from server.instruments.random_profile import random_stages
    from server.metrics import Metrics

    cfg = _random_config()
    cfg.llm.engine = "transformers"
    with pytest.raises(ConfigError, match="stand-in"):
        random_stages(cfg, Metrics())


async def test_a_spoken_turn_on_the_random_profile(speech):
    from server.app import Server

    srv = Server(_random_config(), Path())  # no model folder: built in memory
    await srv.start()
    try:
        await asyncio.wait_for(srv.load(), 300)
        assert srv.stages.profile == "random" and "noise" in srv.stages.note
        client = await RealtimeClient.open(srv.port)
        done = await turn(client, speech)
        assert done["response"]["status"] == "completed"
        assert client.of("response.output_audio.delta") or client.of("response.audio.delta")
        await client.close()
    finally:
        await srv.stop(grace_s=0.5)
