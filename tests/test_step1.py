"""Step1ForCausalLM against the golden reference run (tiny checkpoint, 6 heads, 2 KV groups)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from stepaudio.llm import Step1Config, Step1ForCausalLM, register_step1
from stepaudio.llm import step1 as step1_module
from stepaudio.llm.alibi import alibi_slopes, sqrt_alibi_bias
from stepaudio.llm.compat import CACHE_FIELD, DTYPE_KWARG, TRANSFORMERS_MAJOR


@pytest.fixture(scope="module")
def step1_dir(golden_dir: Path) -> Path:
    return golden_dir / "step1"


@pytest.fixture(scope="module")
def model(step1_dir: Path) -> Step1ForCausalLM:
    m = AutoModelForCausalLM.from_pretrained(step1_dir / "model", **{DTYPE_KWARG: torch.float32})
    return m.eval()


def _ids(step1_dir: Path, seq: str) -> torch.Tensor:
    return torch.from_numpy(np.load(step1_dir / f"seq{seq}_input_ids.npy"))


def _tied(m: Step1ForCausalLM) -> bool:
    return m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()


def test_auto_classes_load_real_layout_without_remote_code(model: Step1ForCausalLM, step1_dir):
    config = AutoConfig.from_pretrained(step1_dir / "model")
    assert isinstance(config, Step1Config)
    assert isinstance(model, Step1ForCausalLM)
    assert config.auto_map["AutoConfig"] == "configuration_step1.Step1Config"
    assert config.num_key_value_heads == config.num_attention_groups == 2
    register_step1()  # idempotent: a second registration is not an error


def test_alibi_slopes_match_golden_for_non_power_of_two_heads(step1_dir: Path):
    expected = np.load(step1_dir / "alibi_slopes.npy")
    np.testing.assert_allclose(np.float32(alibi_slopes(6)), expected, rtol=1e-7)


@pytest.mark.parametrize("heads", [48, 96])
def test_alibi_slopes_of_real_head_counts_follow_the_interleaved_rule(heads: int):
    n = 2 ** int(np.floor(np.log2(heads)))
    slopes = alibi_slopes(heads)
    assert len(slopes) == heads
    np.testing.assert_allclose(slopes[:n], [2 ** (-8 * k / n) for k in range(1, n + 1)])
    np.testing.assert_allclose(
        slopes[n:], [2 ** (-4 * k / n) for k in range(1, 2 * (heads - n), 2)]
    )


def test_alibi_bias_is_negative_sqrt_distance_and_causal():
    bias = sqrt_alibi_bias(torch.tensor([0.5]), torch.arange(3), 3)[0, 0]
    assert bias[2, 0].item() == pytest.approx(-0.5 * 2**0.5)
    assert bias[1, 1].item() == 0.0
    assert bias[0, 1].item() == float("-inf")


@pytest.mark.parametrize("seq", ["A", "B"])
def test_logits_and_final_hidden_match_golden(model, step1_dir: Path, seq: str):
    ids = _ids(step1_dir, seq)
    with torch.no_grad():
        logits = model(ids, use_cache=True).logits.numpy()
        hidden = model.model(ids).last_hidden_state.numpy()
    ref = np.load(step1_dir / f"seq{seq}_logits.npy")
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    assert np.abs(logits - ref).max() / np.abs(ref).max() <= 1e-4  # the conformance rule
    np.testing.assert_allclose(
        hidden, np.load(step1_dir / f"seq{seq}_final_hidden.npy"), atol=1e-4, rtol=0
    )


def test_forward_without_use_cache_works(model, step1_dir: Path):
    # The reference raises here (its config lacks use_cache); ours must not.
    with torch.no_grad():
        out = model(_ids(step1_dir, "B"), use_cache=False)
    assert getattr(out, CACHE_FIELD) is None


def test_incremental_decoding_with_cache_equals_full_forward(model, step1_dir: Path):
    ids = _ids(step1_dir, "A")
    with torch.no_grad():
        full = model(ids).logits[0, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        cache = getattr(prefix, CACHE_FIELD)
        step = model(ids[:, -1:], use_cache=True, **{CACHE_FIELD: cache}).logits[0, -1]
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_generate_greedy_matches_manual_argmax_loop(model, step1_dir: Path):
    ids = _ids(step1_dir, "A")
    meta = json.loads((step1_dir / "meta.json").read_text())
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
        manual = ids
        for _ in range(4):
            nxt = model(manual).logits[:, -1].argmax(-1, keepdim=True)
            manual = torch.cat([manual, nxt], dim=1)
    assert out[0, ids.shape[1]].item() == meta["sequences"]["seqA"]["argmax_last"]
    assert torch.equal(out, manual)


def test_left_padded_batch_matches_unpadded_rows(model, step1_dir: Path):
    a, b = _ids(step1_dir, "A"), _ids(step1_dir, "B")
    pad = a.shape[1] - b.shape[1]
    batch = torch.cat([a, torch.cat([torch.zeros(1, pad, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        logits = model(batch, attention_mask=mask).logits
        alone = model(b).logits
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits[1, pad:], alone[0], atol=1e-5, rtol=0)


def test_lm_head_is_untied_when_checkpoint_has_it(model):
    assert not _tied(model)
    assert not model.config.tie_word_embeddings


def test_lm_head_is_tied_when_checkpoint_lacks_it(step1_dir: Path, tmp_path: Path):
    tensors = load_file(step1_dir / "model" / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(step1_dir / "model" / "config.json", tmp_path / "config.json")
    m = AutoModelForCausalLM.from_pretrained(tmp_path, **{DTYPE_KWARG: torch.float32})
    assert _tied(m)
    assert torch.equal(m.lm_head.weight, tensors["model.embed_tokens.weight"].float())


def test_bf16_forward_runs_close_to_fp32(step1_dir: Path):
    m = AutoModelForCausalLM.from_pretrained(step1_dir / "model", **{DTYPE_KWARG: torch.bfloat16})
    ids = _ids(step1_dir, "A")
    with torch.no_grad():
        logits = m(ids).logits
    assert logits.dtype == torch.bfloat16
    ref = np.load(step1_dir / "seqA_logits.npy")
    assert np.abs(logits.float().numpy() - ref).max() < 0.25


def test_long_prefill_attended_in_query_chunks_matches_golden(model, step1_dir, monkeypatch):
    # A tiny bias budget forces one query per chunk, the path long real prompts take.
    monkeypatch.setattr(step1_module, "MAX_BIAS_ELEMENTS", 1)
    with torch.no_grad():
        logits = model(_ids(step1_dir, "A")).logits.numpy()
    ref = np.load(step1_dir / "seqA_logits.npy")
    np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)


@pytest.mark.skipif(TRANSFORMERS_MAJOR < 5, reason="static cache masks changed in transformers 5")
def test_generate_with_static_cache_equals_dynamic_cache(model, step1_dir):
    ids = _ids(step1_dir, "B")
    with torch.no_grad():
        dynamic = model.generate(ids, max_new_tokens=3, do_sample=False)
        static = model.generate(
            ids, max_new_tokens=3, do_sample=False, cache_implementation="static"
        )
    assert torch.equal(static, dynamic)
