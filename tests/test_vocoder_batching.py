"""Cross-stream batching of the vocoder: a stream's audio does not depend on what it was batched
with, the scheduler runs first chunks and early deadlines first, and a cancelled stream leaves."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from test_synthesizer import ScriptedEngine

from stepaudio.tts.cosyvoice import CosyVoice
from stepaudio.tts.estimator_fast import HAS_TRITON
from stepaudio.tts.speakers import SpeakerFeatures
from stepaudio.tts.streaming import StreamingToken2Wav, StreamOptions
from stepaudio.tts.synthesizer import Synthesizer, SynthOptions
from stepaudio.tts.vocoder_batch import BatchRunner, lengths_mask, masked_group_norm
from stepaudio.tts.vocoder_scheduler import ChunkCancelled, VocoderScheduler
from stepaudio.tts.vocoder_work import Decode, Encode, PredictF0, Regulate, Solve, run_one


@pytest.fixture(scope="module")
def golden_cv(golden_dir: Path) -> CosyVoice:
    return CosyVoice(golden_dir / "tts" / "CosyVoice-300M-25Hz")


@pytest.fixture(scope="module")
def speakers(golden_dir: Path) -> list[SpeakerFeatures]:
    def case(name):
        return torch.from_numpy(np.load(golden_dir / "tts" / "cases" / f"{name}.npy"))

    full = SpeakerFeatures("golden", "", "", (), case("prompt_token").reshape(1, -1).long(),
                           case("prompt_speech_feat"), case("prompt_embedding"), 4.4)
    # Another voice with a shorter prompt: its windows have other lengths (padding in a batch).
    short = SpeakerFeatures("short", "", "", (), full.prompt_token[:, :60],
                            full.prompt_feat[:, :124], -full.embedding, 2.0)
    return [full, short]


def _tokens(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, 5120, n).tolist()


def _rand(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_masked_group_norm_equals_group_norm_on_unpadded_rows_and_ignores_padding():
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(8, 64)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
    x = _rand(2, 64, 50, g=g)
    full = masked_group_norm(x, lengths_mask([50, 50], 50, 2, x.device, x.dtype), norm)
    assert torch.allclose(full, norm(x), atol=2e-6)
    padded = torch.cat([x[:1, :, :30], 1e3 * _rand(1, 64, 20, g=g)], dim=2)  # garbage after 30
    part = masked_group_norm(padded, lengths_mask([30], 50, 1, x.device, x.dtype), norm)
    assert torch.allclose(part[:, :, :30], norm(x[:1, :, :30]), atol=2e-6)


def test_each_request_kind_batched_with_other_lengths_equals_it_alone(golden_cv):
    g = torch.Generator().manual_seed(1)
    runner = BatchRunner(golden_cv.flow, golden_cv.hift)
    batches = {
        "encode": [Encode(torch.randint(0, 5120, (n,), generator=g)) for n in (30, 47, 47, 12)],
        "regulate": [Regulate(_rand(80, n, g=g)) for n in (100, 137, 64)],
        "solve equal": [Solve(*(_rand(80, 150, g=g) for _ in range(2)), _rand(80, g=g),
                              _rand(80, 150, g=g)) for _ in range(3)],
        "solve padded": [Solve(*(_rand(80, n, g=g) for _ in range(2)), _rand(80, g=g),
                               _rand(80, n, g=g)) for n in (150, 151, 97, 33)],
        "f0": [PredictF0(_rand(80, n, g=g)) for n in (40, 40, 17)],
        "decode": [Decode(_rand(80, n, g=g), 0.1 * _rand(n * 256, g=g)) for n in (40, 40, 17)],
    }
    for name, reqs in batches.items():
        alone = [run_one(golden_cv, r) for r in reqs]
        scale = max(float(a.abs().max()) for a in alone)
        # measured: 0 to 3e-6 relative (sums in another order); f0 is in Hz
        assert _max_diff(alone, runner.run(reqs)) <= 1e-5 * max(1.0, scale), name
    assert runner.calls["Solve"] == 2 and runner.rows["Solve"] == 7


def _drain_batched(streams, scheduler, runner) -> list[np.ndarray]:
    """Every stream chunk by chunk, all streams' chunks submitted together each time."""
    out: list[list[np.ndarray]] = [[] for _ in streams]
    while any(not st.done for st in streams):
        futs = [(i, scheduler.submit(runner, st.chunk_work(), deadline=0.0, first=False,
                                     cancelled=lambda: False))
                for i, st in enumerate(streams) if not st.done]
        for i, fut in futs:
            out[i].append(fut.result(timeout=120))
    return [np.concatenate(o) for o in out]


def _streams(cv, speakers, plan):
    out = []
    for i, (spk, n) in enumerate(plan):
        st = StreamingToken2Wav(cv, speakers[spk], seed=i)
        st.push(_tokens(n, seed=i))
        st.finish()
        out.append(st)
    return out


def test_streams_batched_together_sound_as_each_alone(golden_cv, speakers):
    plan = [(0, 250), (1, 130), (0, 40), (1, 300)]  # two voices, short and long utterances
    alone = [np.concatenate(st.drain()) for st in _streams(golden_cv, speakers, plan)]
    rounds = []
    scheduler = VocoderScheduler(max_rows=8, on_round=rounds.append)
    try:
        runner = BatchRunner(golden_cv.flow, golden_cv.hift)
        streams = _streams(golden_cv, speakers, plan)
        batched = _drain_batched(streams, scheduler, runner)
    finally:
        scheduler.close()
    for a, b in zip(alone, batched, strict=True):
        assert a.shape == b.shape
        assert np.abs(a - b).max() < 1e-4  # measured 2-4e-5 (peaks 0.2)
    assert max(r.rows.get("Solve", 0) for r in rounds) == 4  # really batched
    assert runner.calls["Solve"] < sum(len(st.stats) for st in streams)


class _Gate:
    """A runner wrapper that records batches and can hold the vocoder thread at a batch."""

    def __init__(self, runner: BatchRunner) -> None:
        self.runner = runner
        self.batches: list[tuple[str, list[int]]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.entered = threading.Event()
        self.flow, self.hift = runner.flow, runner.hift

    def run(self, requests):
        self.entered.set()
        self.hold.wait(30)
        self.batches.append((type(requests[0]).__name__, [id(r) for r in requests]))
        return self.runner.run(requests)


def test_first_chunks_and_early_deadlines_run_first(golden_cv, speakers):
    runner = _Gate(BatchRunner(golden_cv.flow, golden_cv.hift))
    scheduler = VocoderScheduler(max_rows=1)
    try:
        blocker = _streams(golden_cv, speakers, [(0, 60)])[0]
        runner.hold.clear()
        scheduler.submit(runner, blocker.chunk_work(), deadline=0.0, first=False,
                         cancelled=lambda: False)
        assert runner.entered.wait(30)  # the vocoder thread is now held inside a batch
        late, early, first = _streams(golden_cv, speakers, [(1, 60), (1, 61), (0, 62)])
        done: list[str] = []
        futs = {}
        for name, st, deadline, is_first in (("late", late, 50.0, False),
                                             ("early", early, 10.0, False),
                                             ("first", first, 99.0, True)):
            fut = scheduler.submit(runner, st.chunk_work(), deadline=deadline, first=is_first,
                                   cancelled=lambda: False)
            fut.add_done_callback(lambda _f, n=name: done.append(n))
            futs[name] = fut
        runner.hold.set()
        for fut in futs.values():
            fut.result(timeout=120)
    finally:
        scheduler.close()
    assert done == ["first", "early", "late"]


def test_a_cancelled_stream_leaves_at_its_next_stage_and_its_state_does_not_move(golden_cv,
                                                                                 speakers):
    runner = _Gate(BatchRunner(golden_cv.flow, golden_cv.hift))
    scheduler = VocoderScheduler(max_rows=4)
    try:
        kept, dropped = _streams(golden_cv, speakers, [(0, 200), (1, 200)])
        flag, release = threading.Event(), threading.Event()
        scheduler.call(lambda: release.wait(30))  # hold the thread: both join one round
        runner.hold.clear()
        f_kept = scheduler.submit(runner, kept.chunk_work(), deadline=0.0, first=False,
                                  cancelled=lambda: False)
        f_drop = scheduler.submit(runner, dropped.chunk_work(), deadline=0.0, first=False,
                                  cancelled=flag.is_set)
        release.set()
        assert runner.entered.wait(30)  # both are inside their first (encode) batch
        flag.set()
        runner.hold.set()
        assert len(f_kept.result(timeout=120)) > 0
        with pytest.raises(ChunkCancelled):
            f_drop.result(timeout=120)
    finally:
        scheduler.close()
    kinds = [k for k, _ in runner.batches]
    assert kinds[0] == "Encode" and len(runner.batches[0][1]) == 2
    assert all(len(ids) == 1 for _, ids in runner.batches[1:])  # it left after encoding
    assert dropped.committed_frames == 0 and kept.committed_frames > 0


def test_a_failing_batch_fails_its_chunks_and_the_scheduler_goes_on(golden_cv, speakers):
    class Broken(BatchRunner):
        def regulate(self, reqs):
            raise RuntimeError("device fell over")

    scheduler = VocoderScheduler()
    try:
        st = _streams(golden_cv, speakers, [(0, 60)])[0]
        fut = scheduler.submit(Broken(golden_cv.flow, golden_cv.hift), st.chunk_work(),
                               deadline=0.0, first=True, cancelled=lambda: False)
        with pytest.raises(RuntimeError, match="device fell over"):
            fut.result(timeout=60)
        ok = scheduler.submit(BatchRunner(golden_cv.flow, golden_cv.hift), st.chunk_work(),
                              deadline=0.0, first=True, cancelled=lambda: False)
        assert len(ok.result(timeout=120)) > 0
    finally:
        scheduler.close()


@pytest.fixture(scope="module")
def synths(tiny_root: Path):
    alone = Synthesizer.from_model_root(tiny_root, options=SynthOptions(batching=False))
    # the same chunking both ways (batched synthesizers chunk by `batched_stream` otherwise)
    batched = Synthesizer.from_model_root(tiny_root, options=SynthOptions(
        batching=True, batched_stream=StreamOptions()))
    yield alone, batched
    asyncio.run(batched.aclose())


async def test_synthesizer_batched_across_streams_speaks_as_unbatched(synths):
    alone, batched = synths
    ids = [65536 + 1024 + int(i) for i in np.random.default_rng(0).integers(0, 4096, 150)]
    texts = ["你好，很高兴认识你。", "我们去公园散步吧。", "Let's walk."]
    out = {}
    for synth in (alone, batched):
        synth.engine = ScriptedEngine(alone.engine, ids)  # one id per delta: no timing effects
        rounds = []
        synth.on_round = rounds.append
        res = await asyncio.gather(*(synth.synthesize(t, synth.voice("Tingting"), seed=i)
                                     for i, t in enumerate(texts)))
        out[synth.batching] = ([w for w, _ in res], rounds)
    (a, _), (b, rounds) = out[False], out[True]
    for x, y in zip(a, b, strict=True):
        # The solver's results differ in float rounding only (2e-6 of 6.8, the order of sums);
        # the tiny vocoder's gain makes that 2e-5 (median) to 1.4e-3 (max) in the waveform.
        # The golden folder's, whose gain is lower, holds 1e-4 (test above).
        d = np.abs(x - y)
        assert x.shape == y.shape and d.mean() < 2e-4 and d.max() < 5e-3
    assert max(max(r.rows.values()) for r in rounds) == 3  # the three streams ran together


async def test_cancelled_batched_stream_stops_and_others_go_on(synths):
    _, synth = synths
    text = "这是一个比较长的句子，我们会在第一段声音之后打断它。然后还有更多的话要说。"
    a = synth.open(synth.voice("Tingting"), seed=3)
    b = synth.open(synth.voice("Tingting"), seed=4)
    for s in (a, b):
        s.push_text(text)
        s.end_text()
    await a.__anext__()
    a.cancel()
    computed = len(a.report.chunks)
    assert [c async for c in a] == []
    rest = [c async for c in b]
    await a.aclose()
    assert len(a.report.chunks) <= computed + 1 and len(rest) > 2


_GN_CHILD = """
import torch, torch.nn.functional as F
from stepaudio.tts.estimator_fast import _gn_mish_kernel
from stepaudio.tts.vocoder_batch import lengths_mask, masked_group_norm
torch.manual_seed(0)
norm = torch.nn.GroupNorm(8, 64)
with torch.no_grad():
    norm.weight.normal_(); norm.bias.normal_()
x = 3 * torch.randn(3, 64, 70)
for mask in (None, lengths_mask([70, 41, 9], 70, 3, x.device, x.dtype)):
    out = torch.empty_like(x)
    m = mask.reshape(3, 70).contiguous() if mask is not None else x
    _gn_mish_kernel[(3 * 8,)](x, m, norm.weight, norm.bias, out, 64, 70, 8, norm.eps,
                              HAS_MASK=mask is not None, BLOCK_C=8, BLOCK_T=32)
    ref = F.mish(norm(x)) if mask is None else F.mish(masked_group_norm(x, mask, norm)) * mask
    assert torch.allclose(out, ref, atol=2e-5), (out - ref).abs().max()
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_group_norm_mish_kernel_matches_torch_in_interpreter():
    import os
    import subprocess
    import sys

    root = str(Path(__file__).parent.parent)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _GN_CHILD], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_fused_group_norm_mish_kernel_compiles_for_hopper():
    import triton

    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        pytest.skip("no Triton CUDA backend")
    from stepaudio.tts.estimator_fast import _gn_mish_kernel

    for has_mask in (True, False):
        sig = {"x_ptr": "*bf16", "m_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
               "out_ptr": "*bf16", "C": "i32", "T": "i32", "CG": "i32", "eps": "fp32",
               "HAS_MASK": "constexpr", "BLOCK_C": "constexpr", "BLOCK_T": "constexpr"}
        src = triton.compiler.ASTSource(fn=_gn_mish_kernel, signature=sig, constexprs={
            "HAS_MASK": has_mask, "BLOCK_C": 32, "BLOCK_T": 128})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4})
        assert "cubin" in compiled.asm


async def test_next_clause_is_written_while_the_current_one_is_vocoded(synths):
    _, synth = synths
    ids = [65536 + 1024 + int(i) for i in np.random.default_rng(1).integers(0, 4096, 200)]
    events: list[tuple[str, int]] = []

    class Recording(ScriptedEngine):
        def generate(self, prompt, params=None, *, request_id=None):
            events.append(("request", len(events)))
            return super().generate(prompt, params, request_id=request_id)

    synth.engine = Recording(synths[0].engine, ids)
    stream = synth.open(synth.voice("Tingting"), seed=2)
    stream.push_text("第一句话比较长，第二句也不短。")
    stream.end_text()
    async for chunk in stream:
        events.append((f"chunk {chunk.clause}", len(events)))
    kinds = [k for k, _ in events]
    assert kinds.count("request") == 2
    second = kinds.index("request", 1)
    last_of_first = max(i for i, k in enumerate(kinds) if k == "chunk 0")
    assert second < last_of_first  # clause 1's tokens were on their way before clause 0 ended


def test_a_batching_synthesizer_chunks_by_its_batched_options(tiny_root):
    synth = Synthesizer.from_model_root(tiny_root, options=SynthOptions(batching=True))
    alone = Synthesizer.from_model_root(tiny_root, options=SynthOptions(batching=False))
    assert synth.stream_options().first_frames == 32 and synth.stream_options().max_hop_frames == 192
    assert alone.stream_options() == StreamOptions()


def test_hift_graph_routing_replays_a_one_row_graph_per_odd_length_window(golden_cv):
    """Row buckets replay their graph; a batch of a length captured only for one row replays
    that graph once per window; anything else (or more rows than the cap) runs eagerly. Bookkeeping
    only: on the CPU ``warm`` runs HiFT eagerly and captures nothing."""
    from stepaudio.tts.cuda_graphs import GraphedBatchDecode

    dec = GraphedBatchDecode(golden_cv.hift, max_rows=8)
    assert dec.warm([1, 2, 4], [12]) == 3
    assert dec.warm_lengths(range(10, 14)) == 3  # 12 already has its one-row graph
    assert dec.route(3, 12) == (4, 12)
    assert dec.route(1, 11) == (1, 11)
    assert dec.route(3, 11) == "per_row"
    assert dec.route(2, 9) == "eager"
    assert dec.route(9, 12) == "eager"
    mel = torch.randn(2, golden_cv.hift.conv_pre.in_channels, 11)
    src = 0.1 * torch.randn(2, 1, 11 * golden_cv.hift.samples_per_frame())
    with torch.inference_mode():
        assert torch.equal(dec(mel, src), golden_cv.hift.decode(mel, src))


def test_a_later_clause_starts_with_a_full_hop_only_when_the_listener_has_audio_ahead():
    from stepaudio.tts.synthesizer import later_clause_options

    opts = SynthOptions().batched_stream
    assert later_clause_options(opts).first_frames == opts.max_hop_frames == 192
    assert later_clause_options(opts, 3.0, 2.0).first_frames == 192
    short = later_clause_options(opts, 0.6, 2.0)  # a one-second first clause, mostly played
    assert short.first_frames == opts.hop_frames == 48
    assert [short.hop(k) for k in range(4)] == [48, 48, 96, 192]
