"""TTS-3B sampling, clause splitting, streaming token→wav against offline, and the synthesizer.

Numerics run on the golden CosyVoice folder (random weights at small sizes, the same files the
conformance suite uses); the synthesizer runs end to end on the tiny checkpoints.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio.llm.engine import Delta, FinishReason, Generation, RepetitionRule, Usage
from stepaudio.tts import vllm_repetition
from stepaudio.tts.cosyvoice import CosyVoice
from stepaudio.tts.metrics import logmel, seam_ratio, stream_distance
from stepaudio.tts.prompt import MUSIC_VOCODER_FOLDER, VOCODER_FOLDER, TTSPromptError
from stepaudio.tts.sampling import (
    AudioTokenFilter,
    RepetitionAwareLogitsProcessor,
    max_new_tokens_for,
    repetition_banned_token,
    repetition_hook,
    tts_sampling_params,
)
from stepaudio.tts.speakers import PromptAudioError, SpeakerFeatures, check_prompt_audio
from stepaudio.tts.streaming import (
    StreamingToken2Wav,
    StreamOptions,
    UtteranceNoise,
    offline_wav,
    stream_wav,
)
from stepaudio.tts.synthesizer import Synthesizer
from stepaudio.tts.text import ClauseSplitter, join_deltas, split_text

try:  # the engines' sampling helpers are moving into their own module
    from stepaudio.llm.sampler import apply_repetition_rule
except ImportError:  # pragma: no cover
    from stepaudio.llm.engine_transformers import apply_repetition_rule

# --- repetition rule and sampling ------------------------------------------------------------


def reference_rule(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """The reference's RepetitionAwareLogitsProcessor, verbatim."""
    window = input_ids[:, -10:]
    if window.shape[1] < 10:
        return scores
    last_tokens = window[:, -1].unsqueeze(-1)
    repeat_counts = (window == last_tokens).sum(dim=1)
    mask = repeat_counts.float() / 10 > 0.1
    scores[mask, last_tokens[mask].squeeze(-1)] = float("-inf")
    return scores


def test_repetition_rule_bans_the_last_token_when_it_is_twice_in_the_last_ten():
    assert repetition_banned_token([5, 1, 2, 3, 4, 6, 7, 8, 9, 5]) == 5
    assert repetition_banned_token([0, 1, 2, 3, 4, 6, 7, 8, 9, 5]) is None
    assert repetition_banned_token([5, 5]) is None  # fewer than ten ids: no rule
    assert repetition_banned_token([5] + list(range(10, 19)) + [5]) is None  # first 5 left the window


def test_every_form_of_the_rule_equals_the_reference_processor():
    gen = torch.Generator().manual_seed(0)
    ours = RepetitionAwareLogitsProcessor()
    for _ in range(200):
        n = int(torch.randint(3, 30, (1,), generator=gen))
        ids = torch.randint(0, 6, (3, n), generator=gen)
        scores = torch.randn(3, 8, generator=gen)
        expected = reference_rule(ids, scores.clone())
        assert torch.equal(ours(ids, scores.clone()), expected)
        for row in range(3):
            history = ids[row].tolist()
            hooked = repetition_hook(history, scores[row].clone())
            engine_row = scores[row].clone()
            apply_repetition_rule(engine_row, history, RepetitionRule(10, 0.1))
            assert torch.equal(hooked, expected[row]) and torch.equal(engine_row, expected[row])


def test_logits_processor_runs_inside_transformers_generate(tiny_root):
    from transformers import LogitsProcessorList

    from stepaudio.llm import Step1ForCausalLM

    model = Step1ForCausalLM.from_pretrained(tiny_root / "Step-Audio-TTS-3B").float()
    seen = []

    class Spy(RepetitionAwareLogitsProcessor):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            seen.append((input_ids[0].tolist(), out[0].clone()))
            return out

    prompt = torch.tensor([[1, 4, 65536, 65537, 65536, 65538, 65539, 65540, 65541, 65542, 65536]])
    model.generate(prompt, max_new_tokens=5, do_sample=False,
                   logits_processor=LogitsProcessorList([Spy()]))
    assert seen and torch.isneginf(seen[0][1][65536])  # 65536 is twice in the last ten
    for ids, row in seen:
        banned = repetition_banned_token(ids)
        assert banned is None or torch.isneginf(row[banned])


def test_vllm_batch_rule_reads_history_and_drafts_like_per_request_rule():
    gen = torch.Generator().manual_seed(1)
    slots, max_len = 4, 40
    all_ids = torch.randint(0, 5, (slots, max_len), generator=gen)
    total = torch.tensor([12, 3, 25, 9])
    enabled = torch.tensor([True, True, True, False])
    # rows: slot 2 with two draft rows (local pos 0, 1), slot 0, slot 1, slot 3
    row_slot = torch.tensor([2, 2, 0, 1, 3])
    local = torch.tensor([0, 1, 0, 0, 0])
    input_ids = torch.tensor([int(all_ids[2, 24]), 4, int(all_ids[0, 11]), 0, 0])
    logits = torch.randn(5, 5, generator=gen)
    got = vllm_repetition.ban_repeats_batch(logits.clone(), all_ids, total, row_slot, input_ids,
                                            local, enabled)
    for row in range(5):
        slot, pos = int(row_slot[row]), int(local[row])
        history = all_ids[slot, : int(total[slot])].tolist() + input_ids[row - pos + 1: row + 1].tolist()
        want = logits[row].clone()
        if bool(enabled[slot]):
            repetition_hook(history, want)
        assert torch.equal(got[row], want), row


def test_vllm_processors_follow_the_per_request_switch():
    class Params:
        def __init__(self, extra):
            self.extra_args = extra

    assert vllm_repetition.rule_enabled(Params(None))
    assert not vllm_repetition.rule_enabled(Params({"stepaudio_repetition": False}))
    for bad in ("yes", 2, [1]):
        for cls in (vllm_repetition.RepetitionAwareV2, vllm_repetition.RepetitionAwareV1):
            with pytest.raises(ValueError):
                cls.validate_params(Params({"stepaudio_repetition": bad}))
    # vLLM's vllm_xargs field turns JSON true/false into 1/0: both forms are the switch.
    for good, on in ((1, True), (0, False), (True, True), (False, False)):
        vllm_repetition.RepetitionAwareV2.validate_params(Params({"stepaudio_repetition": good}))
        assert vllm_repetition.rule_enabled(Params({"stepaudio_repetition": good})) is on
    row = vllm_repetition.RepetitionAwareV1.new_req_logits_processor(None, Params(None))
    logits = torch.zeros(6)
    row([1, 2, 3, 4, 5, 1], [2, 3, 4, 5], logits)  # last ten: 5 1 2 3 4 5 → 5 twice
    assert logits[5] == float("-inf") and torch.isfinite(logits[:5]).all()


def test_tts_sampling_is_the_references_generate_call():
    p = tts_sampling_params(300, seed=7)
    assert (p.temperature, p.top_p, p.top_k, p.stop_token_ids, p.seed) == (0.7, 1.0, 50, (3,), 7)
    assert p.repetition == RepetitionRule(10, 0.1) and p.max_new_tokens == 300
    assert tts_sampling_params(5, repetition_rule=False).repetition is None


def test_audio_filter_maps_audio_ids_and_skips_and_counts_the_rest():
    f = AudioTokenFilter()
    assert f([65536, 70655, 100, 3, 70656, 65600]) == [0, 5119, 64]
    assert (f.kept, f.skipped, f.skipped_ids) == (3, 2, [100, 70656])


def test_token_cap_grows_with_the_text_and_stays_inside_the_context():
    rate = 125 / 3
    short, long = (max_new_tokens_for(t, rate, 300, 32768) for t in ("你好。", "你好。" * 20))
    assert 2.0 * rate < short < long and long >= 0.5 * 40 * rate  # ≥ 0.5 s per character
    assert max_new_tokens_for("(RAP)你好。", rate, 300, 32768, music=True) > short  # songs are slower
    assert max_new_tokens_for("你好。" * 200, rate, 8000, 32768) == 192  # reference max_length 8192
    assert max_new_tokens_for("你好。", rate, 500, 510) == 10


_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _cardinal(n: int) -> str:
    """English number words (what a TTS front end says for "1234567")."""
    for size, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = f" {_cardinal(n % size)}" if n % size else ""
            return f"{_cardinal(n // size)} {name}{rest}"
    if n < 20:
        return _ONES[n]
    return _TENS[n // 10] + (f" {_ONES[n % 10]}" if n % 10 else "")


def _syllables(word: str) -> int:
    import re

    return max(1, len(re.findall(r"[aeiouy]+", word.lower())))


def _reference_reading_s(text: str) -> float:
    """How long a careful reading of an English clause takes: numbers said as words (the longer of
    the cardinal and digit-by-digit readings), all-capital words spelled letter by letter, symbols
    said as words, at 3 syllables a second (slow speech; TTS reads 4-5), plus 0.3 s per pause."""
    import re

    words: list[str] = []
    for tok in re.findall(r"\d+|[A-Za-z]+|[%$&@/+]", text):
        if tok.isdigit():
            by_digit = " ".join(_ONES[int(d)] for d in tok)
            words += max(_cardinal(int(tok)), by_digit, key=len).split()
        elif tok.isalpha() and tok.isupper():
            words += ["ex" if c == "X" else f"{c}ee" for c in tok]  # every letter a syllable or two
        else:
            words.append({"%": "percent", "$": "dollars", "&": "and", "@": "at", "/": "slash",
                          "+": "plus"}.get(tok, tok))
    pauses = len(re.findall(r"[,.;:!?]", text))
    return sum(_syllables(w) for w in words) / 3.0 + 0.3 * pauses


DIGIT_HEAVY = [
    "Call 555-0123 or 1-800-555-0199 before 10:30 PM on 12/25/2024.",
    "The total was $1,234,567.89, up 12.5% from 987,654 in 2023.",
    "Flight UA 2417 leaves gate B38 at 06:45 and lands at 11:20, seat 14C.",
    "NASA, the FBI and the U.S. DOT met at 9 AM on 3/14.",
]


@pytest.mark.parametrize("text", DIGIT_HEAVY)
def test_token_cap_never_cuts_a_careful_reading_of_numbers_and_abbreviations(text):
    from stepaudio.tts.sampling import max_audio_seconds

    need = _reference_reading_s(text)
    assert max_audio_seconds(text) >= 1.25 * need, (max_audio_seconds(text), need)


def test_token_cap_allows_for_slow_speed_tags(audio_dir):
    """The reference's own slow reading (examples/speed_control2.wav, the reply to "say it very,
    very slowly": 吃葡萄不吐葡萄皮，不吃葡萄倒吐葡萄皮) takes 5.99 s, 0.37 s a character; its normal
    pace (Tingting's prompt) is 0.18 s. A (慢速2) clause is allowed well over that, English too."""
    import soundfile as sf

    from stepaudio.tts.sampling import max_audio_seconds

    clause = "吃葡萄不吐葡萄皮，不吃葡萄倒吐葡萄皮"
    slow_s = sf.info(str(audio_dir / "speed_control2.wav")).duration
    assert 5.9 < slow_s < 6.1
    assert max_audio_seconds(f"(慢速2){clause}") >= 2 * slow_s
    assert max_audio_seconds(f"(慢速2){clause}") > max_audio_seconds(f"(慢速1){clause}") \
        > max_audio_seconds(clause)
    english = "(慢速2)Please read 1-800-555-0199 to me, slowly."
    slow_factor = 0.37 / 0.18
    assert max_audio_seconds(english) >= 1.25 * slow_factor * _reference_reading_s(english)
    # A bracketed aside that is not a tag is read, so it counts.
    assert max_audio_seconds("(see the note above) fine") > max_audio_seconds("fine") + 2


# --- clause splitting ------------------------------------------------------------------------


def test_clauses_cut_at_chinese_and_english_sentence_ends_and_early_first_comma():
    clauses, warnings = split_text("你好啊朋友，今天天气真好。我们一起去公园散步吧！Hello there. "
                                   "Pi is 3.14, right? Yes!")
    assert clauses == ["你好啊朋友，", "今天天气真好。", "我们一起去公园散步吧！", "Hello there.",
                       "Pi is 3.14, right?", "Yes!"]
    assert warnings == []


def test_deltas_of_any_size_give_the_same_clauses_as_the_whole_text():
    text = "(高兴1)(粤语)“你好，”他说。今天……我们去哪里？嗯，随便吧!! OK, let's go. 3.5 km."
    whole, _ = split_text(text)
    assert join_deltas(list(text)) == whole
    assert join_deltas([text[:7], text[7:9], text[9:30], text[30:]]) == whole


def test_leading_tags_are_repeated_on_every_clause_and_unknown_tags_reported_once():
    s = ClauseSplitter()
    clauses = s.feed("(RAP)(怪)第一句很长很长，第二句。(怪)第三句") + s.finish()
    assert clauses == ["(RAP)(怪)第一句很长很长，", "(RAP)第二句。", "(RAP)(怪)第三句"]
    assert s.warnings == ["unknown instruction tag (怪) kept as text"]


def test_long_text_without_punctuation_is_cut_to_fit_and_empty_text_gives_nothing():
    words = " ".join(["word"] * 100)
    clauses, _ = split_text(words, max_chars=60)
    assert all(len(c.replace(" ", "")) <= 60 for c in clauses) and len(clauses) > 4
    assert " ".join(clauses) == words
    assert split_text("  \n ")[0] == [] and split_text("。！？")[0] == []
    assert split_text("好的。。。")[0] == ["好的。。。"]


# --- streaming token → wav (golden CosyVoice folder) -------------------------------------------


@pytest.fixture(scope="module")
def golden_cv(golden_dir: Path) -> CosyVoice:
    return CosyVoice(golden_dir / "tts" / "CosyVoice-300M-25Hz")


@pytest.fixture(scope="module")
def golden_speaker(golden_dir: Path) -> SpeakerFeatures:
    def case(name):
        return torch.from_numpy(np.load(golden_dir / "tts" / "cases" / f"{name}.npy"))

    return SpeakerFeatures("golden", "", "", (), case("prompt_token").reshape(1, -1).long(),
                           case("prompt_speech_feat"), case("prompt_embedding"), 4.4)


def _tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 5120, n).tolist()


def test_utterance_short_enough_for_one_window_streams_exactly_as_offline(golden_cv, golden_speaker):
    tokens = _tokens(25)
    st = StreamingToken2Wav(golden_cv, golden_speaker, seed=3)
    st.push(tokens)
    st.finish()
    streamed = np.concatenate(st.drain())
    np.testing.assert_array_equal(streamed, offline_wav(golden_cv, golden_speaker, tokens, seed=3))


def test_first_chunk_comes_after_fourteen_tokens_then_chunks_grow_to_the_steady_size(
        golden_cv, golden_speaker):
    st = StreamingToken2Wav(golden_cv, golden_speaker, seed=0)
    tokens = _tokens(200)
    first_at = None
    for i, t in enumerate(tokens):
        st.push([t])
        if st.ready() and first_at is None:
            first_at = i + 1
        st.drain()
    st.finish()
    st.drain()
    assert first_at is not None and first_at <= 14  # 0.19 s committed + 0.09 s look-ahead
    sizes = [c.frames[1] - c.frames[0] for c in st.stats]
    assert sizes[:4] == [16, 48, 96, 96] and sum(sizes) == golden_cv.flow.mel_frames(200)
    windows = {c.window[1] - c.window[0] for c in st.stats[2:]}
    assert windows == {StreamOptions().window_frames}  # one shape for steady and last chunks


def test_streaming_output_does_not_depend_on_how_tokens_arrive(golden_cv, golden_speaker):
    tokens = _tokens(130, seed=5)
    one, _ = stream_wav(golden_cv, golden_speaker, tokens, seed=2, push_every=1)
    seven, _ = stream_wav(golden_cv, golden_speaker, tokens, seed=2, push_every=7)
    np.testing.assert_array_equal(one, seven)


def test_streaming_vocoder_reproduces_offline_given_the_same_mel(golden_cv, golden_speaker,
                                                                  monkeypatch):
    """Isolates HiFT: left context, continued source phase and wav cross-fades are exact."""
    tokens = _tokens(250, seed=1)
    noise_src = UtteranceNoise(1, 80, golden_cv.hift.harmonics, 256, golden_speaker.prompt_feat.shape[1])
    frames = golden_cv.flow.mel_frames(len(tokens))
    noise, draws = noise_src.offline(frames)
    mel = golden_cv.token_to_mel(torch.tensor([tokens]), golden_speaker.prompt_token,
                                 golden_speaker.prompt_feat, golden_speaker.embedding, noise=noise)
    offline, _ = golden_cv.hift.inference(mel, draws)

    def given_mel(self, j0, j1, whole):  # the flow's part of a chunk, without model calls
        return mel[0, :, j0:j1].clone(), (0, 0)
        yield

    monkeypatch.setattr(StreamingToken2Wav, "_flow_window", given_mel)
    streamed, st = stream_wav(golden_cv, golden_speaker, tokens, seed=1)
    assert len(st.stats) > 4
    # measured 3.7e-4 (peak 0.2): HiFT reaches a little past the 8 look-ahead frames it is given
    assert np.abs(streamed - offline[0].numpy()).max() < 1e-3


def test_streaming_stays_close_to_offline_and_joins_are_not_heard(golden_cv, golden_speaker):
    """Bounds from measurements on this folder (3 token sets, 120-400 tokens, default options):
    streamed vs offline 0.24-0.28 mean |Δ log-mel|, offline vs offline with other noise
    0.36-0.38; within 4 frames of a join 0.96-1.06 × elsewhere; spectral flux at joins
    0.95-1.03 × elsewhere (offline, same frames: 0.96-1.01). These random weights make every
    output frame depend on the whole utterance (measured: the estimator's global attention and
    GroupNorm account for it; HiFT streams exactly, see above), which trained, local weights do
    far less; the bounds leave 15-20% headroom for float differences between machines."""
    tokens = _tokens(250, seed=1)
    streamed, st = stream_wav(golden_cv, golden_speaker, tokens, seed=1, push_every=3)
    offline = offline_wav(golden_cv, golden_speaker, tokens, seed=1)
    other_noise = offline_wav(golden_cv, golden_speaker, tokens, seed=101)
    assert streamed.shape == offline.shape and streamed.dtype == np.float32
    joins = [c.frames[0] for c in st.stats[1:]]
    d = stream_distance(streamed, offline, joins)
    baseline = stream_distance(other_noise, offline, joins).overall
    assert d.overall <= 0.32, d.describe()
    assert d.overall <= 0.8 * baseline, (d.describe(), baseline)
    assert d.at_joins <= 1.15 * d.away, d.describe()
    assert seam_ratio(streamed, joins) <= 1.15
    assert logmel(streamed).shape[1] == len(streamed) // 256


def test_schedule_names_the_window_shapes_a_stream_uses(golden_cv, golden_speaker):
    """The shapes captured as CUDA graphs ahead of time are the ones streaming asks for."""
    opt = StreamOptions()
    _, st = stream_wav(golden_cv, golden_speaker, _tokens(400, seed=2), seed=0)
    flow_shapes = {c.window[1] - c.window[0] for c in st.stats}
    expected = {f for f, _ in opt.schedule()} | {opt.window_frames}
    assert flow_shapes == expected


def test_graph_wrappers_fall_back_to_the_eager_models_off_gpu(golden_cv, golden_speaker):
    from stepaudio.tts.cuda_graphs import GraphedDecode, GraphedSolver, overlap_add_istft

    tokens = _tokens(120, seed=4)
    plain, _ = stream_wav(golden_cv, golden_speaker, tokens, seed=1)
    st = StreamingToken2Wav(golden_cv, golden_speaker, seed=1, solver=GraphedSolver(golden_cv.flow),
                            decode=GraphedDecode(golden_cv.hift))
    st.push(tokens)
    st.finish()
    np.testing.assert_array_equal(np.concatenate(st.drain()), plain)
    spec = torch.randn(2, 9, 40, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    window = torch.hann_window(16, periodic=True)
    ours = overlap_add_istft(spec, 16, 4, window)
    assert torch.allclose(ours, torch.istft(spec, 16, 4, 16, window=window), atol=1e-6)


def test_noise_is_indexed_by_absolute_position():
    a = UtteranceNoise(9, 80, 9, 256, 10)
    b = UtteranceNoise(9, 80, 9, 256, 10)
    whole = a.mel(0, 200)
    assert torch.equal(b.mel(150, 200), whole[:, 150:]) and torch.equal(b.mel(3, 70), whole[:, 3:70])
    a.forget_before(190)
    assert torch.equal(a.mel(0, 200), whole)  # regenerated identically
    assert torch.equal(a.source(1000, 20000), b.source(0, 30000)[:, 1000:20000])
    assert not torch.equal(UtteranceNoise(8, 80, 9, 256, 10).mel(0, 5), whole[:, :5])


# --- speakers ----------------------------------------------------------------------------------


def test_prompt_audio_outside_one_to_thirty_seconds_or_silent_is_refused():
    tone = np.sin(np.arange(16000 * 2) / 5).astype(np.float32)
    assert check_prompt_audio(tone, 16000).shape == tone.shape
    with pytest.raises(PromptAudioError, match="at least 1 s"):
        check_prompt_audio(tone[:8000], 16000)
    with pytest.raises(PromptAudioError, match="at most 30 s"):
        check_prompt_audio(np.tile(tone, 16), 16000)
    with pytest.raises(PromptAudioError, match="silent"):
        check_prompt_audio(np.zeros(32000, np.float32), 16000)


# --- the synthesizer on tiny checkpoints -------------------------------------------------------


@pytest.fixture(scope="module")
def synth(tiny_root: Path) -> Synthesizer:
    return Synthesizer.from_model_root(tiny_root)


async def test_whole_text_becomes_float32_chunks_at_22050_hz(synth):
    stream = synth.open(synth.voice("Tingting"), seed=1)
    stream.push_text("你好。我们走吧！")
    stream.end_text()
    chunks = [c async for c in stream]
    assert len(chunks) >= 2 and {c.sample_rate for c in chunks} == {22050}
    assert all(c.pcm.dtype == np.float32 and c.pcm.ndim == 1 for c in chunks)
    assert [c.clause for c in chunks] == sorted(c.clause for c in chunks)
    rep = stream.report
    assert rep.clauses == ["你好。", "我们走吧！"] and rep.flow_tokens > 0
    assert sum(len(c.pcm) for c in chunks) == sum(
        synth.cosyvoice(VOCODER_FOLDER).flow.mel_frames(n) * 256 for n in _clause_tokens(rep))
    assert rep.first_chunk_s is not None and rep.audio_s > 0


def _clause_tokens(rep) -> list[int]:
    """Tokens per clause, from the chunk stats (each clause's chunks start at frame 0)."""
    out, tokens = [], 0
    for c in rep.chunks:
        if c.frames[0] == 0 and c is not rep.chunks[0]:
            out.append(tokens)
        tokens = c.tokens[1]
    return out + [tokens]


async def test_same_seed_gives_the_same_speech(synth):
    voice = synth.voice("Tingting")
    a, _ = await synth.synthesize("再说一遍。", voice, seed=4)
    b, _ = await synth.synthesize("再说一遍。", voice, seed=4)
    np.testing.assert_array_equal(a, b)


async def test_first_clause_is_spoken_before_the_reply_text_ends(synth):
    stream = synth.open(synth.voice("Tingting"), seed=2)
    stream.push_text("好的好的，")  # the first clause may end at a comma
    stream.push_text("我来")
    first = await asyncio.wait_for(stream.__anext__(), timeout=30)
    assert first.clause == 0 and first.text == "好的好的，"
    stream.push_text("看看。")
    stream.end_text()
    rest = [c async for c in stream]
    assert {c.clause for c in rest} <= {0, 1} and stream.report.clauses == ["好的好的，", "我来看看。"]


async def test_cancel_stops_before_the_next_chunk_is_computed(synth):
    stream = synth.open(synth.voice("Tingting"), seed=3)
    stream.push_text("这是一个比较长的句子，我们会在第一段声音之后打断它。然后还有更多的话要说。")
    stream.end_text()
    await stream.__anext__()
    stream.cancel()
    computed = len(stream.report.chunks)
    rest = [c async for c in stream]
    await stream.aclose()
    assert stream.report.cancelled and rest == []  # nothing more reaches the player
    assert len(stream.report.chunks) <= computed + 1  # at most the chunk already in flight


async def test_speaker_features_are_computed_once_per_voice(synth):
    voice = synth.voice("Tingting")
    await synth.synthesize("一。", voice, seed=5)
    misses = synth.cache.misses
    await synth.synthesize("二。", voice, seed=6)
    assert synth.cache.misses == misses and "speaker:Tingting" in synth.cache


async def test_rap_tag_uses_the_music_vocoder_and_the_rap_speaker_entry(synth, monkeypatch):
    used = []
    real = synth.cosyvoice
    monkeypatch.setattr(synth, "cosyvoice", lambda folder: used.append(folder) or real(folder))
    _, report = await synth.synthesize("(RAP)我们走。", synth.voice("Tingting"), seed=7)
    assert MUSIC_VOCODER_FOLDER in used and "speaker:TingtingRAP" in synth.cache
    assert report.clauses == ["(RAP)我们走。"]


async def test_text_ids_from_the_tts_model_are_skipped_and_counted(synth, monkeypatch):
    ids = [65536 + i for i in range(40)]
    script = ids[:10] + [500, 70700] + ids[10:]
    monkeypatch.setattr(synth, "engine", ScriptedEngine(synth.engine, script))
    wav, report = await synth.synthesize("你好。", synth.voice("Tingting"), seed=1)
    assert report.skipped_ids == 2 and report.flow_tokens == 40
    assert len(wav) == synth.cosyvoice(VOCODER_FOLDER).flow.mel_frames(40) * 256


async def test_bad_requests_fail_clearly(synth):
    from stepaudio.tts.prompt import UnknownSpeakerError

    with pytest.raises(UnknownSpeakerError, match="Tingting"):
        synth.voice("Nobody")
    with pytest.raises(TTSPromptError, match="transcript"):
        synth.voice(prompt_wav=np.ones(32000, np.float32) * 0.1, prompt_sr=16000, prompt_text=" ")
    with pytest.raises(PromptAudioError):
        synth.voice(prompt_wav=np.ones(8000, np.float32) * 0.1, prompt_sr=16000, prompt_text="短")
    with pytest.raises(TTSPromptError, match="nothing to synthesise"):
        await synth.synthesize(" 。", synth.voice("Tingting"))


async def test_tiny_tts_model_writes_audio_ids_and_ends_with_eot(synth):
    from stepaudio.tts.prompt import build_tts_prompt_ids

    feats = synth.features(synth.voice("Tingting"), "你好")
    eng = synth.engine
    stops = 0
    for seed in range(4):
        prompt = build_tts_prompt_ids(eng.tokenizer, "今天天气很好。", feats.prompt_text,
                                      "Tingting", feats.prompt_code)
        gen = eng.generate(prompt, tts_sampling_params(400, seed=seed))
        _, out = await gen.collect()
        f = AudioTokenFilter()
        f(out)
        assert f.kept >= 0.95 * len(out)
        stops += gen.finish_reason is FinishReason.STOP
    assert stops >= 3


class ScriptedEngine:
    """Engine stand-in that answers every request with the same ids (then stops)."""

    name = "scripted"

    def __init__(self, real, ids: Sequence[int]) -> None:
        self.tokenizer = real.tokenizer
        self.max_model_len = real.max_model_len
        self.ids = list(ids)

    def generate(self, prompt, params=None, *, request_id=None) -> Generation:
        return _Scripted(self.ids, len(prompt))

    async def aclose(self) -> None:
        pass


class _Scripted(Generation):
    def __init__(self, ids: list[int], n_prompt: int) -> None:
        self.request_id = "scripted"
        self._ids = list(ids)
        self._n = n_prompt
        self._done = False

    def cancel(self) -> None:
        self._done = True

    async def aclose(self) -> None:
        self._done = True

    async def __anext__(self) -> Delta:
        if self._done:
            raise StopAsyncIteration
        if self._ids:
            await asyncio.sleep(0)
            return Delta(token_ids=(self._ids.pop(0),))
        self._done = True
        self.finish_reason = FinishReason.STOP
        return Delta(finish_reason=FinishReason.STOP, usage=Usage(self._n, 0))
