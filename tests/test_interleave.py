import numpy as np
import pytest

from stepaudio.tokenizer.interleave import (
    Interleaver,
    ids_to_text,
    interleave_ids,
    text_to_ids,
    token_text,
)


def _cases(golden_dir):
    return sorted(p for p in (golden_dir / "tokenizer" / "cases").iterdir() if p.is_dir())


@pytest.mark.parametrize("variant", ["notrim", "trim"])
def test_golden_ids_and_text_are_exact_given_the_codes(golden_dir, variant):
    for case in _cases(golden_dir):
        vq02 = np.load(case / f"vq02_{variant}.npy").tolist()
        vq06 = np.load(case / f"vq06_{variant}.npy").tolist()
        assert interleave_ids(vq02, vq06) == np.load(case / f"wav2token_{variant}.npy").tolist()
        assert token_text(vq02, vq06) == (case / f"token_str_{variant}.txt").read_text().strip()


def test_text_round_trips_to_ids():
    ids = [65536, 65536 + 1023, 65536 + 1024, 65536 + 5119]
    text = ids_to_text(ids)
    assert text == "<audio_0><audio_1023><audio_1024><audio_5119>"
    assert text_to_ids(text) == ids


@pytest.mark.parametrize("bad", ["<audio_5120>", "<audio_1>x", "hello"])
def test_text_outside_the_audio_vocabulary_is_rejected(bad):
    with pytest.raises(ValueError):
        text_to_ids(bad)


def test_incremental_interleaver_equals_batch_for_any_arrival_order():
    rng = np.random.default_rng(0)
    vq02 = rng.integers(0, 1024, 41).tolist()
    vq06 = rng.integers(0, 4096, 62).tolist()
    inter = Interleaver()
    out, i, j = [], 0, 0
    while i < len(vq02) or j < len(vq06):
        a, b = int(rng.integers(0, 4)), int(rng.integers(0, 5))
        out += inter.push(vq02[i : i + a], vq06[j : j + b])
        i, j = i + a, j + b
    assert out == interleave_ids(vq02, vq06)
    assert len(out) == 5 * 20  # the partial 21st group is dropped
