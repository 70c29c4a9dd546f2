import numpy as np
import pytest

from stepaudio.errors import ModelError
from stepaudio.tokenizer.semantic import LogMel, SemanticTokenizer, offline_code_count


@pytest.fixture(scope="module")
def s3(golden_dir):
    return SemanticTokenizer(golden_dir / "tokenizer" / "Step-Audio-Tokenizer" / "speech_tokenizer_v1.onnx")


def _cases(golden_dir):
    return sorted(p for p in (golden_dir / "tokenizer" / "cases").iterdir() if p.is_dir())


def test_logmel_matches_whisper_within_1e_4(golden_dir):
    logmel = LogMel()
    for case in _cases(golden_dir):
        ref = np.load(case / "whisper_logmel128_notrim.npy")
        ours = logmel(np.load(case / "wav16k_notrim.npy"))
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() < 1e-4


@pytest.mark.parametrize("variant", ["notrim", "trim"])
def test_offline_codes_equal_the_reference(s3, golden_dir, variant):
    for case in _cases(golden_dir):
        wav = np.load(case / f"wav16k_{variant}.npy")
        np.testing.assert_array_equal(s3.encode(wav), np.load(case / f"vq06_{variant}.npy"))


def _stream(s3, wav, seed):
    st = s3.new_stream()
    rng = np.random.default_rng(seed)
    out, i = [], 0
    while i < len(wav):
        n = int(rng.integers(50, 4000))
        out.append(s3.feed(st, wav[i : i + n]))
        i += n
    out.append(s3.finish(st))
    return np.concatenate(out)


def test_streaming_gives_the_offline_count_and_nearly_the_offline_codes(s3, golden_dir):
    agree = []
    for case in _cases(golden_dir):
        wav = np.load(case / "wav16k_notrim.npy")
        ref = np.load(case / "vq06_notrim.npy")
        got = _stream(s3, wav, seed=len(wav))
        assert len(got) == len(ref)
        agree.append((got == ref).mean())
    # Window edges only differ in the log-mel floor of leading silence.
    assert min(agree) > 0.9 and np.mean(agree) > 0.95


def test_streaming_past_30_seconds_keeps_the_offline_count(s3, golden_dir):
    case = _cases(golden_dir)[0]
    wav = np.tile(np.load(case / "wav16k_notrim.npy"), 8)[: 16000 * 33 + 555]
    got = _stream(s3, wav, seed=3)
    assert len(got) == offline_code_count(len(wav)) == len(s3.encode(wav))


def test_streaming_yields_codes_before_the_end(s3, golden_dir):
    wav = np.load(_cases(golden_dir)[0] / "wav16k_notrim.npy")
    st = s3.new_stream()
    early = s3.feed(st, wav[:16000])  # 1 s in: 480 ms steps with 120 ms held back
    assert len(early) >= 12 and len(early) % 3 == 0


def test_feeding_a_finished_stream_is_an_error(s3):
    st = s3.new_stream()
    s3.finish(st)
    with pytest.raises(ModelError, match="finished"):
        s3.feed(st, np.zeros(1600, np.float32))


def test_offline_count_drops_pieces_under_480_samples():
    assert offline_code_count(479) == 0
    assert offline_code_count(480) == 1
    assert offline_code_count(30 * 16000 + 100) == 750
    assert offline_code_count(1920) == 3
