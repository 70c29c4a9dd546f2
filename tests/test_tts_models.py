"""Flow, estimator, HiFT, CAM++ and prompt mel against the golden reference run (golden README §3),
plus the yaml loader and the injection points the comparisons rely on."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio.errors import AudioError, ModelError
from stepaudio.tts.campplus import campplus_fbank
from stepaudio.tts.cosyvoice import CosyVoice, load_state
from stepaudio.tts.flow import cosine_t_span
from stepaudio.tts.golden_cases import CHECKS, tts_cases
from stepaudio.tts.hift import SourceDraws
from stepaudio.tts.yaml_config import CLASS_TABLE, load_cosyvoice_yaml

MODEL = "CosyVoice-300M-25Hz"


@pytest.fixture(scope="module")
def tts_dir(golden_dir: Path) -> Path:
    return golden_dir / "tts"


@pytest.fixture(scope="module")
def cases(tts_dir: Path):
    return lambda name: torch.from_numpy(np.load(tts_dir / "cases" / f"{name}.npy"))


@pytest.fixture(scope="module")
def cv(tts_dir: Path) -> CosyVoice:
    return CosyVoice(tts_dir / MODEL)


@pytest.fixture(scope="module")
def golden_results(golden_dir: Path) -> dict[str, dict]:
    return {line["case"]: line for line in tts_cases(golden_dir)}


@pytest.mark.parametrize("name", [c[0] for c in CHECKS])
def test_golden_case_within_suggested_tolerance(golden_results: dict[str, dict], name: str):
    line = golden_results.get(f"tts/{name}")
    assert line is not None, f"golden case {name} did not run (files missing?)"
    assert line["pass"], line["summary"]
    if name != "flow/mel_bf16":
        # The bar for float32: 1e-4 of the reference's peak, whatever the README allows.
        assert line["max_rel_err"] <= 1e-4, line["summary"]


def test_flow_mel_matches_reference_with_recorded_noise(cv: CosyVoice, cases):
    mel = cv.token_to_mel(cases("target_token"), cases("prompt_token"), cases("prompt_speech_feat"),
                          cases("prompt_embedding"), noise=cases("flow_noise_z"))
    ref = cases("flow_mel_fp32")
    assert mel.shape == ref.shape
    np.testing.assert_allclose(mel.numpy(), ref.numpy(), atol=1e-3)


def test_solver_times_are_the_reference_cosine_schedule(cases):
    t_span = cosine_t_span(10)
    expected = cases("estimator_all_t")
    np.testing.assert_allclose(t_span[:10].numpy(), expected.numpy(), atol=1e-7)
    assert cosine_t_span(10, torch.bfloat16).dtype == torch.bfloat16  # as the reference in bf16


def test_hift_decode_matches_reference_given_mel_and_source(cv: CosyVoice, cases):
    wav = cv.hift.decode(cases("hift_mel"), cases("hift_source"))
    np.testing.assert_allclose(wav.numpy(), cases("hift_wav").numpy(), atol=1e-5)


def test_checkpoints_load_strictly_with_reference_key_names(tts_dir: Path, cv: CosyVoice):
    ref_flow = torch.load(tts_dir / MODEL / "flow.pt", weights_only=True)
    ref_hift = torch.load(tts_dir / MODEL / "hift.pt", weights_only=True)
    assert list(cv.flow.state_dict()) == list(ref_flow)
    assert list(cv.hift.state_dict()) == list(ref_hift)
    assert any(k.endswith("weight_g") for k in cv.hift.state_dict())


def test_checkpoint_that_does_not_fit_the_yaml_is_a_model_error(tmp_path: Path, tts_dir: Path):
    state = torch.load(tts_dir / MODEL / "hift.pt", weights_only=True)
    state.pop("conv_pre.bias")
    torch.save(state, tmp_path / "hift.pt")
    cfg = load_cosyvoice_yaml(tts_dir / MODEL / "cosyvoice.yaml", keys=("hift",))
    with pytest.raises(ModelError, match="conv_pre.bias"):
        load_state(cfg.hift, tmp_path / "hift.pt", "hift")


def test_folded_weight_norm_is_recomputed_after_new_weights(cv: CosyVoice, tts_dir: Path, cases):
    cfg = load_cosyvoice_yaml(tts_dir / MODEL / "cosyvoice.yaml", keys=("hift",))
    hift = cfg.hift.eval()
    mel = cases("hift_mel")[:, :, :8]
    before = hift.f0(mel)  # folds the random-init weights
    load_state(hift, tts_dir / MODEL / "hift.pt", "hift")
    np.testing.assert_allclose(hift.f0(mel).numpy(), cv.hift.f0(mel).numpy(), rtol=1e-6)
    assert not torch.allclose(before, hift.f0(mel))


# -- yaml ---------------------------------------------------------------------------------------


def _yaml_copy(tmp_path: Path, tts_dir: Path, old: str = "", new: str = "", prefix: str = "") -> Path:
    src = (tts_dir / MODEL / "cosyvoice.yaml").read_text(encoding="utf-8")
    if old:
        assert old in src
    out = tmp_path / "cosyvoice.yaml"
    out.write_text(prefix + src.replace(old, new) if old else prefix + src, encoding="utf-8")
    return out


def test_frame_rate_and_mel_settings_come_from_the_yaml(tmp_path: Path, tts_dir: Path):
    cfg = load_cosyvoice_yaml(tts_dir / MODEL / "cosyvoice.yaml")
    assert cfg.input_frame_rate == pytest.approx(125 / 3)
    assert cfg.sample_rate == 22050 and cfg.mel["hop_size"] == 256
    assert cfg.flow.mel_frames(40) == 82  # int(40 / 41.67 * 22050 / 256), golden meta
    assert cfg.flow.decoder.inference_cfg_rate == pytest.approx(0.7)
    changed = _yaml_copy(tmp_path, tts_dir, "input_frame_rate: 41.666666666666664", "input_frame_rate: 25")
    assert load_cosyvoice_yaml(changed).flow.mel_frames(40) == int(40 / 25 * 22050 / 256)


def test_seed_setters_are_accepted_and_not_run(tmp_path: Path, tts_dir: Path):
    seeds = "__set_seed1: !apply:random.seed [1986]\n__set_seed3: !apply:torch.manual_seed [1986]\n"
    state = torch.random.get_rng_state()
    load_cosyvoice_yaml(_yaml_copy(tmp_path, tts_dir, prefix=seeds), keys=("feat_extractor",))
    assert torch.equal(state, torch.random.get_rng_state())


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("!new:cosyvoice.hifigan.generator.HiFTGenerator", "!new:cosyvoice.hifigan.generator.Other",
         "cosyvoice.hifigan.generator.Other"),
        ("!new:omegaconf.DictConfig", "!include:omegaconf.DictConfig", "!include"),
        ("num_blocks: 2", "num_blokcs: 2", "num_blokcs"),
        ("sampling_rate: !ref <sample_rate>\n    nsf", "sampling_rate: !ref <nope>\n    nsf", "<nope>"),
    ],
)
def test_bad_yaml_is_a_model_error_naming_the_problem(tmp_path, tts_dir, old, new, message):
    with pytest.raises(ModelError, match=re.escape(message)):
        load_cosyvoice_yaml(_yaml_copy(tmp_path, tts_dir, old, new))


def test_apply_of_anything_but_seeds_is_refused(tmp_path: Path, tts_dir: Path):
    path = _yaml_copy(tmp_path, tts_dir, prefix="boom: !apply:os.system ['true']\n")
    with pytest.raises(ModelError, match="os.system"):
        load_cosyvoice_yaml(path)


def test_ref_arithmetic_is_evaluated(tmp_path: Path, tts_dir: Path):
    path = _yaml_copy(tmp_path, tts_dir, "base_channels: 32", "base_channels: !ref <half> * 2",
                      prefix="half: 16\n")
    cfg = load_cosyvoice_yaml(path, keys=("hift",))
    assert cfg.hift.conv_pre.out_channels == 32


def test_class_table_covers_every_class_the_golden_yaml_names(tts_dir: Path):
    text = (tts_dir / MODEL / "cosyvoice.yaml").read_text(encoding="utf-8")
    for tag in ("!new:", "!name:"):
        for chunk in text.split(tag)[1:]:
            assert chunk.split()[0] in CLASS_TABLE


# -- injected draws, shapes, dtypes ----------------------------------------------------------------


def test_flow_noise_is_injectable_and_seedable(cv: CosyVoice, cases):
    args = (cases("target_token")[:, :10], cases("prompt_token")[:, :20],
            cases("prompt_speech_feat")[:, :40], cases("prompt_embedding"))
    a = cv.token_to_mel(*args, generator=torch.Generator().manual_seed(1))
    b = cv.token_to_mel(*args, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 80, cv.flow.mel_frames(10))
    assert torch.equal(a, b)
    with pytest.raises(ModelError, match="noise shape"):
        cv.token_to_mel(*args, noise=torch.zeros(1, 80, 3))


def test_out_of_vocabulary_tokens_are_a_model_error(cv: CosyVoice, cases):
    with pytest.raises(ModelError, match="vocabulary"):
        cv.token_to_mel(torch.tensor([[5120]]), cases("prompt_token"), cases("prompt_speech_feat"),
                        cases("prompt_embedding"))


def test_hift_source_draws_and_cache_source(cv: CosyVoice, cases):
    mel = cases("hift_mel")[:, :, :16]
    hop = cv.hift.samples_per_frame()
    assert hop == 256
    wav1, s1 = cv.hift.inference(mel, generator=torch.Generator().manual_seed(3))
    wav2, s2 = cv.hift.inference(mel, generator=torch.Generator().manual_seed(3))
    assert wav1.shape == (1, 16 * hop) and s1.shape == (1, 1, 16 * hop)
    assert torch.equal(wav1, wav2)
    _, s3 = cv.hift.inference(mel, generator=torch.Generator().manual_seed(4), cache_source=s1[:, :, :100])
    assert torch.equal(s3[:, :, :100], s1[:, :, :100]) and not torch.equal(s3, s1)
    draws = SourceDraws.sample(1, cv.hift.harmonics, 16 * hop, torch.Generator().manual_seed(0))
    assert draws.phase.shape == (1, 9, 1) and float(draws.phase.abs().max()) <= np.pi


def test_token_to_wav_end_to_end_length_and_range(cv: CosyVoice, cases):
    wav = cv.token_to_wav(cases("target_token"), cases("prompt_token"), cases("prompt_speech_feat"),
                          cases("prompt_embedding"), noise=cases("flow_noise_z"),
                          generator=torch.Generator().manual_seed(0))
    assert wav.shape == cases("e2e_wav").shape
    assert float(wav.abs().max()) <= 0.99


def test_bf16_flow_returns_float32_mel_close_to_reference(tts_dir: Path, cases):
    bf = CosyVoice(tts_dir / MODEL, flow_dtype=torch.bfloat16)
    mel = bf.token_to_mel(cases("target_token"), cases("prompt_token"), cases("prompt_speech_feat"),
                          cases("prompt_embedding"), noise=cases("flow_noise_z").bfloat16())
    ref = cases("flow_mel_bf16_from_fp32_noise")
    assert mel.dtype == torch.float32
    err = (mel - ref).abs()
    assert float(err.max()) < 0.5 and float(err.mean()) < 0.1


def test_campplus_rejects_a_prompt_shorter_than_one_window():
    with pytest.raises(AudioError, match="too short"):
        campplus_fbank(np.zeros(100, dtype=np.float32))


def test_missing_model_files_are_model_errors(tmp_path: Path, tts_dir: Path):
    shutil.copy(tts_dir / MODEL / "cosyvoice.yaml", tmp_path / "cosyvoice.yaml")
    with pytest.raises(ModelError, match="flow.pt"):
        CosyVoice(tmp_path)
