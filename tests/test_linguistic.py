"""vq02 (linguistic) codes against the reference's golden vectors, offline and streaming.

Run as a script (`python tests/test_linguistic.py`) for a per-chunk timing of the tiny model.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio.errors import AudioError, ModelError
from stepaudio.tokenizer.linguistic import (
    CHUNK_SAMPLES,
    LinguisticTokenizer,
    StreamFinishedError,
)

TOKENIZER = Path(__file__).parent / "fixtures" / "golden" / "tokenizer"
CASES = sorted(p.name for p in (TOKENIZER / "cases").iterdir() if p.is_dir())
FRAMES_PER_CHUNK = 4


@pytest.fixture(scope="module")
def tok() -> LinguisticTokenizer:
    return LinguisticTokenizer(TOKENIZER / "Step-Audio-Tokenizer")


@pytest.fixture(scope="module")
def meta() -> dict:
    return json.loads((TOKENIZER / "cases_meta.json").read_text())


def case_file(case: str, name: str) -> Path:
    return TOKENIZER / "cases" / case / name


def load(case: str, name: str) -> np.ndarray:
    return np.load(case_file(case, name))


def feed_in_pieces(tok: LinguisticTokenizer, wav: np.ndarray, sizes) -> list[np.ndarray]:
    """Feed consecutive pieces of the given sizes (the last call final); codes per call."""
    stream = tok.new_stream()
    bounds = np.cumsum([0, *sizes])
    assert bounds[-1] == len(wav)
    return [
        tok.feed(stream, wav[a:b], is_final=i == len(sizes) - 1)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]


def even_pieces(n: int, size: int) -> list[int]:
    return [size] * (n // size) + ([n % size] if n % size else [])


# -- offline ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_offline_encoder_input_output_and_codes_match_reference(tok, case):
    got = tok.encode_debug(load(case, "wav16k_notrim.npy"))
    # float32 kaldi fbank differs between torch builds by ~1e-4 on quiet mel bins (the golden and
    # this build are each ~1e-4 from a float64 fbank), hence the relative term on top of 1e-4.
    np.testing.assert_allclose(
        got["enc_in"], load(case, "vq02_enc_in_notrim.npy"), atol=1e-4, rtol=1e-4
    )
    np.testing.assert_allclose(got["enc_out"], load(case, "vq02_enc_out_notrim.npy"), atol=1e-4)
    np.testing.assert_array_equal(got["codes"], load(case, "vq02_notrim.npy"))
    assert got["codes"].dtype == np.int64


@pytest.mark.parametrize("case", CASES)
def test_offline_codes_of_trimmed_wav_match_reference(tok, case):
    np.testing.assert_array_equal(
        tok.encode(load(case, "wav16k_trim.npy")), load(case, "vq02_trim.npy")
    )


@pytest.mark.parametrize("case", CASES)
def test_encoder_input_frames_per_chunk_match_reference(tok, case, meta):
    wav = load(case, "wav16k_notrim.npy")
    per_call = feed_in_pieces(tok, wav, even_pieces(len(wav), CHUNK_SAMPLES))
    counts = [len(c) for c in per_call if len(c)]
    assert counts == meta[case]["notrim"]["enc_in_chunk_frames"]


# -- streaming -------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_streaming_240ms_calls_give_reference_codes_per_call(tok, case):
    golden = json.loads(case_file(case, "vq02_stream_notrim.json").read_text())
    wav = load(case, "wav16k_notrim.npy")
    sizes = [b - a for a, b in golden["chunk_bounds"]]
    got = feed_in_pieces(tok, wav, sizes)
    assert [c.tolist() for c in got] == golden["codes_per_call"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("piece", [1000, 3839, 3841, 7000])
def test_streaming_in_odd_piece_sizes_equals_offline(tok, case, piece, meta):
    if not meta[case]["notrim"]["stream_equals_offline"]:
        pytest.skip("the reference's streaming differs from its offline codes here")
    wav = load(case, "wav16k_notrim.npy")
    got = np.concatenate(feed_in_pieces(tok, wav, even_pieces(len(wav), piece)))
    np.testing.assert_array_equal(got, load(case, "vq02_notrim.npy"))


@pytest.mark.parametrize("piece", [1, 37])
def test_streaming_in_tiny_pieces_equals_offline_on_a_prefix(tok, piece):
    wav = load(CASES[0], "wav16k_notrim.npy")[: 2 * CHUNK_SAMPLES + 1500]
    got = np.concatenate(feed_in_pieces(tok, wav, even_pieces(len(wav), piece)))
    np.testing.assert_array_equal(got, tok.encode(wav))
    assert len(got) == 2 * FRAMES_PER_CHUNK + 2  # a 1500-sample tail gives 2 frames


def test_streaming_in_random_piece_sizes_equals_offline(tok):
    rng = np.random.default_rng(7)
    wav = load(CASES[-1], "wav16k_notrim.npy")
    sizes: list[int] = []
    while sum(sizes) < len(wav):
        sizes.append(min(int(rng.integers(0, 9000)), len(wav) - sum(sizes)))
    got = np.concatenate(feed_in_pieces(tok, wav, sizes))
    np.testing.assert_array_equal(got, tok.encode(wav))


def test_non_final_calls_shorter_than_a_chunk_return_nothing_until_240ms_accumulate(tok):
    wav = load(CASES[0], "wav16k_notrim.npy")
    stream = tok.new_stream()
    assert len(tok.feed(stream, wav[:3000])) == 0
    assert len(tok.feed(stream, wav[3000:3839])) == 0
    assert len(tok.feed(stream, wav[3839:3840])) == FRAMES_PER_CHUNK
    assert len(tok.feed(stream, wav[3840:3840], is_final=True)) == 0


# -- the final tail --------------------------------------------------------------------------------
# Remainders from the golden README §1.2, plus boundaries found by running the reference on every
# remainder 0..3839: 0-879 -> 0 frames, 880-1359 -> 1, 1360-2319 -> 2, 2320-3279 -> 3, then 4.
TAILS = [
    (0, 0),
    (1, 0),
    (399, 0),
    (640, 0),
    (879, 0),
    (880, 1),
    (1289, 1),
    (1359, 1),
    (1360, 2),
    (1849, 2),
    (2320, 3),
    (3280, 4),
    (3637, 4),
    (3692, 4),
]


@pytest.mark.parametrize(("remainder", "frames"), TAILS)
def test_final_tail_after_full_chunks_yields_reference_frame_count(tok, remainder, frames):
    wav = load("Tingting_prompt", "wav16k_notrim.npy")
    full = 2 * CHUNK_SAMPLES
    codes = tok.encode(wav[: full + remainder])
    assert len(codes) == 2 * FRAMES_PER_CHUNK + frames
    # Full chunks never see later audio, so their codes are those of the whole file.
    np.testing.assert_array_equal(codes[:8], load("Tingting_prompt", "vq02_notrim.npy")[:8])


@pytest.mark.parametrize(("n", "frames"), [(0, 0), (399, 0), (640, 0), (879, 0), (880, 1)])
def test_final_input_shorter_than_a_chunk_yields_reference_frame_count(tok, n, frames):
    wav = load("Tingting_prompt", "wav16k_notrim.npy")
    assert len(tok.encode(wav[:n])) == frames


def test_exact_multiple_of_a_chunk_is_not_flushed_whether_streamed_or_offline(tok):
    wav = load("multilingual1", "wav16k_notrim.npy")[: 3 * CHUNK_SAMPLES]
    offline = tok.encode(wav)
    assert len(offline) == 3 * FRAMES_PER_CHUNK
    stream = tok.new_stream()
    streamed = [
        tok.feed(stream, wav[i : i + CHUNK_SAMPLES]) for i in range(0, len(wav), CHUNK_SAMPLES)
    ]
    streamed.append(tok.feed(stream, wav[:0], is_final=True))
    assert len(streamed[-1]) == 0
    np.testing.assert_array_equal(np.concatenate(streamed), offline)


# -- concurrency and stream lifecycle --------------------------------------------------------------
def test_two_threads_feeding_two_streams_in_lockstep_give_sequential_codes(tok):
    wavs = [load(CASES[0], "wav16k_notrim.npy"), load(CASES[1], "wav16k_notrim.npy")]
    expected = [tok.encode(w) for w in wavs]
    piece = 1000
    steps = max(len(w) for w in wavs) // piece + 1
    barrier = threading.Barrier(2)
    results: list[list[np.ndarray]] = [[], []]
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            stream, wav = tok.new_stream(), wavs[k]
            for i in range(steps):
                barrier.wait()  # both threads call feed at the same moment, every step
                last = i == steps - 1
                results[k].append(tok.feed(stream, wav[i * piece : (i + 1) * piece], last))
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for k in (0, 1):
        np.testing.assert_array_equal(np.concatenate(results[k]), expected[k])


def test_feeding_a_stream_after_its_final_call_raises(tok):
    wav = load(CASES[0], "wav16k_notrim.npy")[:5000]
    stream = tok.new_stream()
    tok.feed(stream, wav, is_final=True)
    assert stream.finished
    with pytest.raises(StreamFinishedError):
        tok.feed(stream, wav)
    with pytest.raises(StreamFinishedError):
        tok.feed(stream, wav[:0], is_final=True)


def test_streams_are_independent_of_each_other(tok):
    wav = load(CASES[0], "wav16k_notrim.npy")
    a, b = tok.new_stream(), tok.new_stream()
    tok.feed(a, wav[:5000])
    np.testing.assert_array_equal(tok.feed(b, wav, is_final=True), tok.encode(wav))


# -- input handling and loading --------------------------------------------------------------------
def test_integer_samples_are_rejected_because_they_would_be_mis_scaled(tok):
    with pytest.raises(AudioError):
        tok.encode(np.zeros(8000, dtype=np.int16))


def test_row_vector_and_float64_input_give_the_same_codes(tok):
    wav = load(CASES[0], "wav16k_notrim.npy")[:9000]
    expected = tok.encode(wav)
    np.testing.assert_array_equal(tok.encode(wav[None, :]), expected)
    np.testing.assert_array_equal(tok.encode(wav.astype(np.float64)), expected)


def test_empty_input_gives_empty_arrays_of_the_right_shape(tok):
    out = tok.encode_debug(np.zeros(0, dtype=np.float32))
    assert out["codes"].shape == (0,) and out["codes"].dtype == np.int64
    assert out["enc_in"].shape == (0, 560) and out["enc_out"].shape == (0, 512)


def test_position_encoding_far_into_a_stream_is_bit_identical_to_funasr(tok):
    windowed = tok._encoder.embed
    x = torch.randn(1, 9, 560)
    start = 60_000  # an hour of 60 ms frames
    a = windowed(x.clone(), {"start_idx": start})
    b = windowed.inner(x.clone(), {"start_idx": start})
    assert torch.equal(a, b)


def test_missing_model_folder_is_a_model_error(tmp_path):
    with pytest.raises(ModelError):
        LinguisticTokenizer(tmp_path)


def test_loading_keeps_torch_thread_count(tok):
    assert torch.get_num_threads() == 1


# -- micro-benchmark (not a test) ------------------------------------------------------------------
def _benchmark() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    tok = LinguisticTokenizer(TOKENIZER / "Step-Audio-Tokenizer")
    print(f"load (incl. funasr import): {time.perf_counter() - t0:.2f} s")
    wav = load("Tingting_prompt", "wav16k_notrim.npy")
    feats = torch.from_numpy(tok.encode_debug(wav)["enc_in"])
    cache = tok.new_stream().encoder_cache
    enc_ms = []
    with torch.inference_mode():
        for i in range(0, len(feats) - 4, 4):
            x = feats[None, i : i + 4].clone()
            t = time.perf_counter()
            tok._encoder.forward_chunk(x, torch.tensor([4]), cache=cache)
            enc_ms.append(1000 * (time.perf_counter() - t))
    stream = tok.new_stream()
    feed_ms = []
    for i in range(0, len(wav) - CHUNK_SAMPLES, CHUNK_SAMPLES):
        t = time.perf_counter()
        tok.feed(stream, wav[i : i + CHUNK_SAMPLES])
        feed_ms.append(1000 * (time.perf_counter() - t))
    for name, ms in (("encoder", enc_ms[2:]), ("feed (frontend+encoder+k-means)", feed_ms[2:])):
        print(f"per 240 ms chunk, {name}: median {np.median(ms):.2f} ms, max {max(ms):.2f} ms")


if __name__ == "__main__":
    _benchmark()
