"""The ``cosyvoice`` streaming mode: CosyVoice's own streaming recipe, checked against the output
of CosyVoice's own streaming code on the tiny checkpoints (tests/fixtures/cosyvoice_stream, made
by tools/make_cosyvoice_stream_fixture.py; its README says how), and its window plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cosyvoice_reference import HashDraws, checkpoint_fingerprint
from test_vocoder_batching import _drain_batched

from stepaudio.errors import ModelError
from stepaudio.tts.cosyvoice import CosyVoice
from stepaudio.tts.prompt import VOCODER_FOLDER
from stepaudio.tts.speakers import SpeakerFeatures
from stepaudio.tts.streaming_cosyvoice import (
    ChunkPlan,
    CosyVoiceStreamOptions,
    CosyVoiceToken2Wav,
    CosyVoiceWindows,
    SeededDraws,
    hamming_join,
)
from stepaudio.tts.vocoder_work import PredictF0, run_now, run_one

FIXTURE = Path(__file__).parent / "fixtures" / "cosyvoice_stream"
META = json.loads((FIXTURE / "meta.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tiny_cv(tiny_root: Path) -> CosyVoice:
    folder = tiny_root / "Step-Audio-TTS-3B" / VOCODER_FOLDER
    assert checkpoint_fingerprint(folder) == META["checkpoint_fingerprint"], (
        "the tiny checkpoints changed since tests/fixtures/cosyvoice_stream was made: "
        "regenerate it as its README.md says")
    return CosyVoice(folder)


def _case(name: str) -> tuple[dict, SpeakerFeatures]:
    d = dict(np.load(FIXTURE / f"{name}.npz"))
    speaker = SpeakerFeatures(name, "", "", (), torch.from_numpy(d["prompt_token"]),
                              torch.from_numpy(d["prompt_feat"]), torch.from_numpy(d["embedding"]),
                              1.0)
    return d, speaker


def _stream(st: CosyVoiceToken2Wav, tokens: list[int], every: int = 1
            ) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    """Tokens fed ``every`` at a time as an LM would; each ready chunk driven request by request
    (as a scheduler drives it), recording HiFT's input mel."""
    mels: list[torch.Tensor] = []

    def run(request):
        if isinstance(request, PredictF0):
            mels.append(request.mel.clone())
        return run_one(st.model, request)

    chunks = []
    for i in range(0, len(tokens), every):
        st.push(tokens[i: i + every])
        while st.ready():
            chunks.append(run_now(st.chunk_work(), run))
    st.finish()
    while st.ready():
        chunks.append(run_now(st.chunk_work(), run))
    return chunks, mels


@pytest.mark.parametrize("name", ["short", "two_hops", "long"])
def test_chunks_reproduce_cosyvoices_own_streaming_output(tiny_cv, name):
    """Same chunks (tokens, lengths), same HiFT input per chunk, same audio. Tolerances: the
    mel is the flow's output to float32 rounding (measured <= 4e-6 at |mel| <= 6); these random
    weights make HiFT amplify it (an F0 3e-5 Hz off moves the excitation 4e-5 and the audio
    up to 1.3e-3 of a 1.07 peak), so the audio bound is 5e-3 and its rms error 2e-4. Any slip
    of the recipe (a window, a fade, a cache, an off-by-one frame) costs 0.1 or more."""
    d, speaker = _case(name)
    case = META["cases"][name]
    st = CosyVoiceToken2Wav(tiny_cv, speaker, draws=HashDraws(case["seed"]))
    chunks, mels = _stream(st, d["tokens"].tolist())
    assert [[c.tokens[0], c.tokens[1], c.final] for c in st.stats] == case["chunk_tokens"]
    assert [len(c) for c in chunks] == d["chunk_samples"].tolist()
    for i, mel in enumerate(mels):
        np.testing.assert_allclose(mel.numpy(), d[f"hift_mel_{i}"], rtol=0, atol=2e-5)
    edges = np.cumsum([0, *d["chunk_samples"].tolist()])
    for i, chunk in enumerate(chunks):
        expected = d["wav"][edges[i]: edges[i + 1]]
        assert np.abs(chunk - expected).max() < 5e-3, f"chunk {i}"
    wav = np.concatenate(chunks)
    assert np.abs(wav - d["wav"]).max() < 5e-3
    assert np.sqrt(np.mean((wav - d["wav"]) ** 2)) < 2e-4
    assert st.done and st.committed_frames == st.total_frames == len(wav) // 256


def test_streams_batched_by_the_vocoder_scheduler_still_reproduce_cosyvoice(tiny_cv):
    """The three cases' chunks run together through the cross-stream scheduler (masked, padded
    flow batches; HiFT batched by equal length) and still match CosyVoice's output."""
    from stepaudio.tts.vocoder_batch import BatchRunner
    from stepaudio.tts.vocoder_scheduler import VocoderScheduler

    names = ["short", "two_hops", "long"]
    streams, expected = [], []
    for name in names:
        d, speaker = _case(name)
        st = CosyVoiceToken2Wav(tiny_cv, speaker, draws=HashDraws(META["cases"][name]["seed"]))
        st.push(d["tokens"].tolist())
        st.finish()
        streams.append(st)
        expected.append(d["wav"])
    rounds = []
    scheduler = VocoderScheduler(max_rows=4, on_round=rounds.append)
    try:
        out = _drain_batched(streams, scheduler, BatchRunner(tiny_cv.flow, tiny_cv.hift))
    finally:
        scheduler.close()
    for name, got, wav in zip(names, out, expected, strict=True):
        assert got.shape == wav.shape, name
        assert np.abs(got - wav).max() < 5e-3 and np.sqrt(np.mean((got - wav) ** 2)) < 2e-4, name
    assert max(r.rows.get("Solve", 0) for r in rounds) == 3  # really batched


def test_output_does_not_depend_on_how_tokens_arrive(tiny_cv):
    d, speaker = _case("two_hops")
    one, _ = _stream(CosyVoiceToken2Wav(tiny_cv, speaker, seed=3), d["tokens"].tolist(), 1)
    many, _ = _stream(CosyVoiceToken2Wav(tiny_cv, speaker, seed=3), d["tokens"].tolist(), 37)
    np.testing.assert_array_equal(np.concatenate(one), np.concatenate(many))


def test_first_chunk_waits_for_hop_plus_overlap_tokens_then_every_hop(tiny_cv):
    d, speaker = _case("long")
    st = CosyVoiceToken2Wav(tiny_cv, speaker, seed=0)
    ready_at = []
    for i, t in enumerate(d["tokens"].tolist()):
        st.push([t])
        if st.ready():
            ready_at.append(i + 1)
            st.next_chunk()
    assert ready_at == [103, 186, 269]  # 83 + 20, then 83 more each
    assert not st.done and not st.ready()
    st.finish()
    assert st.ready() and st.next_chunk().size > 0 and st.done and not st.ready()
    with pytest.raises(ModelError, match="no chunk is ready"):
        st.next_chunk()


def test_bad_tokens_and_late_pushes_are_refused_and_an_empty_utterance_has_no_chunk(tiny_cv):
    _, speaker = _case("short")
    st = CosyVoiceToken2Wav(tiny_cv, speaker)
    with pytest.raises(ModelError, match="outside 0..5119"):
        st.push([5120])
    st.finish()
    with pytest.raises(ModelError, match="after finish"):
        st.push([1])
    assert st.done and not st.ready() and st.total_frames == 0  # as the low-latency mode
    assert st.drain() == [] and st.committed_frames == 0 and st.stats == []


def test_seeded_draws_are_per_chunk_and_repeatable():
    a, b = SeededDraws(5), SeededDraws(5)
    torch.testing.assert_close(a.flow_noise(1, (80, 7)), b.flow_noise(1, (80, 7)))
    assert not torch.equal(a.flow_noise(1, (80, 7)), a.flow_noise(2, (80, 7)))
    assert not torch.equal(a.flow_noise(1, (80, 7)), SeededDraws(6).flow_noise(1, (80, 7)))
    s = a.source(0, 9, 512)
    assert s.phase.shape == (1, 9, 1) and s.noise.shape == (1, 9, 512)
    assert float(s.phase.abs().max()) <= np.pi


def test_hamming_join_weights_the_two_sides_by_the_halves_of_the_window():
    window = torch.from_numpy(np.hamming(8))
    ones, twos = torch.ones(1, 10), torch.full((1, 6), 2.0)
    out = hamming_join(ones, twos, window)
    expected = window[:4] + 2 * window[4:]
    torch.testing.assert_close(out[0, :4], expected.float())
    assert torch.equal(out[0, 4:], ones[0, 4:]) and torch.equal(ones, torch.ones(1, 10))


# --- the window plan ----------------------------------------------------------------------------


class _Flow:
    mel_feat_conf = {"sampling_rate": 22050, "hop_size": 256}

    def __init__(self, rate: float) -> None:
        self.input_frame_rate = rate


class _HiFT:
    def samples_per_frame(self) -> int:
        return 256


def _windows(rate: float = 125 / 3, **kw) -> CosyVoiceWindows:
    return CosyVoiceWindows.for_models(_Flow(rate), _HiFT(), CosyVoiceStreamOptions(**kw))


def test_step_audio_rate_gives_83_token_hops_20_token_overlap_and_41_mel_frames():
    w = _windows()
    assert (w.min_hop, w.max_hop, w.overlap, w.mel_overlap, w.mel_cache) == (83, 166, 20, 41, 20)
    assert w.source_cache == 5120 and [w.hop(k) for k in range(4)] == [83, 83, 83, 83]
    assert w.mel_frames(103) == 212 and w.regulator_segments(103) == [(20, 41), (63, 130), (20, 41)]
    assert w.regulator_segments(40) == [(40, 82)]  # no split at 2 × overlap or fewer
    assert w.graph_shapes() == ([212], [171, 191])


def test_cosyvoices_own_25_hz_rate_gives_its_50_token_hop_and_68_frame_overlap():
    w = _windows(25.0)
    assert (w.min_hop, w.max_hop, w.mel_overlap) == (50, 100, 68)


@pytest.mark.parametrize("n, expected", [
    (0, [(0, 0, True)]),
    (102, [(0, 102, True)]),
    (103, [(0, 103, False), (83, 103, True)]),
    (300, [(0, 103, False), (83, 186, False), (166, 269, False), (249, 300, True)]),
])
def test_plan_of_a_complete_utterance(n, expected):
    w = _windows()
    assert [(c.start, c.end, c.final) for c in w.plan(n)] == expected


def test_emitted_frames_add_up_to_the_flow_frames_less_the_shared_overlaps():
    w = _windows()
    for n in (0, 30, 103, 186, 300, 1000):
        chunks = w.plan(n)
        flow = sum(w.mel_frames(c.end - c.start) for c in chunks)
        assert sum(w.emitted_frames(c) for c in chunks) == flow - w.mel_overlap * (len(chunks) - 1)
    assert [w.emitted_frames(c) for c in w.plan(300)] == [151, 171, 171, 125]  # fixture "long"


def test_hop_grows_by_the_scale_factor_up_to_the_maximum():
    w = _windows(stream_scale_factor=1.5)
    assert [w.hop(k) for k in range(5)] == [83, 124, 166, 166, 166]
    assert w.next_chunk(1, 83, 83 + 124 + 20, False) == ChunkPlan(1, 83, 227, False)
    assert w.next_chunk(1, 83, 83 + 124 + 19, False) is None
    assert w.graph_shapes()[0] == [212, 297, 384] and w.max_chunk_tokens() == 186
    assert _windows().max_chunk_tokens() == 103


@pytest.mark.parametrize("kw, match", [
    ({"min_hop_seconds": 0}, "min_hop_seconds"),
    ({"min_hop_seconds": 3, "max_hop_seconds": 2}, "min_hop_seconds"),
    ({"stream_scale_factor": 0.5}, "stream_scale_factor"),
    ({"overlap_tokens": 0}, "overlap_tokens"),
    ({"min_hop_seconds": 0.01}, "tokens at"),
    ({"min_hop_seconds": 0.05, "mel_cache_frames": 60}, "too small"),
])
def test_options_that_break_the_recipe_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        _windows(**kw)


# --- through the synthesizer --------------------------------------------------------------------


class _Forced:
    """TTS engine wrapper: every clause writes exactly ``n`` tokens (the tiny model's <|EOT|> is
    random), so a clause spans several CosyVoice hops."""

    def __init__(self, engine, n: int) -> None:
        self.engine, self.n = engine, n
        self.name, self.tokenizer = engine.name, engine.tokenizer
        self.max_model_len = engine.max_model_len

    def generate(self, prompt, params=None, *, request_id=None):
        params = params.replace(max_new_tokens=self.n, stop_token_ids=())
        return self.engine.generate(prompt, params, request_id=request_id)

    async def aclose(self) -> None:
        await self.engine.aclose()


def test_auto_mode_is_low_latency_on_tiny_checkpoints_and_the_recipe_elsewhere(tiny_root, tmp_path):
    from stepaudio.tts.stream_modes import resolve_mode

    assert resolve_mode("auto", tiny_root) == "low-latency"
    assert resolve_mode("auto", tmp_path) == resolve_mode("auto") == "cosyvoice"
    assert resolve_mode("low-latency", tmp_path) == "low-latency"
    with pytest.raises(ValueError, match="streaming mode"):
        resolve_mode("fastest")


def test_each_mode_opens_its_stream_and_names_its_window_shapes_for_graphs(tiny_cv):
    from stepaudio.tts.stream_modes import open_token2wav, window_shapes
    from stepaudio.tts.streaming import StreamingToken2Wav, StreamOptions

    _, speaker = _case("short")
    kw = {"low_latency": StreamOptions(), "cosyvoice": CosyVoiceStreamOptions()}
    assert isinstance(open_token2wav("cosyvoice", tiny_cv, speaker, seed=1, **kw),
                      CosyVoiceToken2Wav)
    assert isinstance(open_token2wav("low-latency", tiny_cv, speaker, seed=1, **kw),
                      StreamingToken2Wav)
    both = (StreamOptions(), StreamOptions(first_frames=96))  # a reply's first and later clauses
    kw = {"low_latency": both, "cosyvoice": CosyVoiceStreamOptions()}
    assert window_shapes("cosyvoice", tiny_cv, **kw) == ([212], [171, 191], 103)
    flow, hift, tokens = window_shapes("low-latency", tiny_cv, **kw)
    assert StreamOptions().window_frames in flow and hift[0] == StreamOptions().first_frames + 8
    assert 96 + 8 in flow and 96 + 8 in hift  # the later clauses' first window too
    assert tokens == int(StreamOptions().window_frames * 125 / 3 / (22050 / 256)) + 4 + 4


async def test_synthesizer_in_cosyvoice_mode_streams_each_clause_by_the_recipes_plan(tiny_root):
    from stepaudio.tts.synthesizer import Synthesizer, SynthOptions

    synth = Synthesizer.from_model_root(tiny_root, options=SynthOptions(streaming="cosyvoice"))
    try:
        assert synth.streaming == "cosyvoice"
        synth.engine = _Forced(synth.engine, 200)
        wav, report = await synth.synthesize("你好。我们走吧！", synth.voice("Tingting"), seed=1)
    finally:
        await synth.aclose()
    model = synth.cosyvoice(VOCODER_FOLDER)
    windows = CosyVoiceWindows.for_models(model.flow, model.hift)
    clauses: list[list] = []
    for c in report.chunks:  # each clause's chunks start again at token 0
        if c.tokens[0] == 0:
            clauses.append([])
        clauses[-1].append((c.tokens[0], c.tokens[1], c.final))
    assert len(clauses) == 2
    for ranges in clauses:  # 200 ids each, less any non-audio id the filter dropped
        n = ranges[-1][1]
        assert 186 < n <= 200 and ranges == [(c.start, c.end, c.final) for c in windows.plan(n)]
    frames = sum(windows.emitted_frames(c) for r in clauses for c in windows.plan(r[-1][1]))
    assert len(wav) == frames * 256
