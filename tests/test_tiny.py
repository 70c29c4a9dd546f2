"""Tiny checkpoints: deterministic, small, and loadable by the real loaders unchanged."""

from __future__ import annotations

import hashlib
import json
import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio import tiny
from stepaudio.cli import main
from stepaudio.errors import ModelError
from stepaudio.models import (
    CHAT_DIR,
    PARAFORMER_SUBDIR,
    TOKENIZER_DIR,
    TTS_DIR,
    load_hyperpyyaml_plain,
    model_paths,
    step1_tensor_shapes,
)

GOLDEN_TTS = Path(__file__).parent / "fixtures" / "golden" / "tts" / "CosyVoice-300M-25Hz"


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_cli_tiny_twice_with_same_seed_gives_byte_identical_tree(tiny_root, tmp_path, capsys):
    again = tmp_path / "again"
    assert main(["tiny", str(again)]) == 0  # with the progress bar, as a user runs it
    out = capsys.readouterr()
    assert out.out.strip() == str(again)
    first, second = _hashes(tiny_root), _hashes(again)
    assert sorted(first) == sorted(tiny.expected_files() + [tiny.MARKER_FILE])
    assert first == second


def test_tiny_root_is_under_50_mb(tiny_root):
    total = sum(p.stat().st_size for p in tiny_root.rglob("*") if p.is_file())
    assert total < 50 * 1024 * 1024


def test_different_seed_gives_different_weights(tiny_root, tmp_path):
    tiny._write_centroids(tmp_path, seed=1)
    other = np.load(tmp_path / "linguistic_tokenizer.npy")
    ours = np.load(model_paths(tiny_root).centroids)
    assert other.shape == ours.shape == (1024, 512) and ours.dtype == np.float32
    assert not np.array_equal(other, ours)


def test_write_refuses_non_empty_folder_without_force(tmp_path):
    (tmp_path / "precious.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError, match="not empty"):
        tiny.write_tiny_models(tmp_path)
    assert (tmp_path / "precious.safetensors").read_bytes() == b"x"


def test_cli_tiny_on_existing_root_exits_1_and_keeps_it(tiny_root, capsys):
    before = (tiny_root / tiny.MARKER_FILE).stat().st_mtime_ns
    assert main(["tiny", str(tiny_root), "--quiet"]) == 1
    assert "--force" in capsys.readouterr().err
    assert (tiny_root / tiny.MARKER_FILE).stat().st_mtime_ns == before


def test_interrupted_generation_leaves_nothing_behind(tmp_path):
    calls = []

    def progress(step: str, done: int, total: int) -> None:
        calls.append((step, done, total))
        if done == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tiny.write_tiny_models(tmp_path / "models", progress=progress)
    assert list(tmp_path.iterdir()) == []
    assert [c[1] for c in calls] == [0, 1] and calls[0][2] == calls[1][2] > 1


def test_ensure_returns_complete_root_without_rewriting(tiny_root):
    marker = tiny_root / tiny.MARKER_FILE
    before = marker.stat().st_mtime_ns
    assert tiny.ensure_tiny_models(tiny_root) == tiny_root
    assert marker.stat().st_mtime_ns == before
    assert json.loads(marker.read_text())["seed"] == 0


def test_ensure_refuses_a_folder_that_is_not_ours(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="does not hold tiny checkpoints"):
        tiny.ensure_tiny_models(tmp_path)


def test_completeness_needs_every_file_and_the_same_seed(tmp_path):
    for rel in tiny.expected_files():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / tiny.MARKER_FILE).write_text(tiny._marker_text(3))
    assert tiny.is_complete_tiny_root(tmp_path, 3)
    assert not tiny.is_complete_tiny_root(tmp_path, 0)
    (tmp_path / tiny.expected_files()[5]).unlink()
    assert not tiny.is_complete_tiny_root(tmp_path, 3)


def test_speakers_are_copied_with_their_license(tiny_root):
    speakers = model_paths(tiny_root).speakers
    info = json.loads((speakers / "speakers_info.json").read_text(encoding="utf-8"))
    assert set(info) == {"Tingting", "TingtingRAP", "Tingting哼唱"}
    for sid in info:
        assert (speakers / f"{sid}_prompt.wav").stat().st_size > 10_000
    assert (speakers / "LICENSE").is_file() and (speakers / "NOTICE").is_file()


# ---------------------------------------------------------------------------------------------
# The real loaders accept the files


def _no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_funasr_automodel_loads_tiny_paraformer_offline_with_every_key(tiny_root, monkeypatch):
    funasr = pytest.importorskip("funasr")
    _no_network(monkeypatch)
    folder = tiny_root / TOKENIZER_DIR / PARAFORMER_SUBDIR
    model = funasr.AutoModel(model=str(folder), disable_update=True, device="cpu")
    saved = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    loaded = model.model.state_dict()
    assert list(saved) == list(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert model.kwargs["frontend_conf"]["dither"] == 0.0
    norms = [k for k in saved if k.endswith("norm1.weight")]
    assert norms and not torch.allclose(saved[norms[0]], torch.ones_like(saved[norms[0]]))
    centroids = np.load(model_paths(tiny_root).centroids, mmap_mode="r")
    assert model.model.encoder.output_size() == centroids.shape[1] == 512


def test_s3_tokenizer_onnx_gives_25hz_codes(tiny_root):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_paths(tiny_root).s3_onnx),
                                providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["feats", "feats_length"]
    feats = np.random.default_rng(0).standard_normal((2, 128, 101)).astype(np.float32)
    (codes,) = sess.run(None, {"feats": feats, "feats_length": np.array([101, 40], np.int32)})
    assert codes.dtype == np.int64
    assert codes.shape == (2, math.ceil(math.ceil(101 / 2) / 2))
    assert 0 <= codes.min() and codes.max() < 4096
    assert len(set(codes[0].tolist())) > 5


def test_campplus_onnx_maps_fbank_to_192d_embedding(tiny_root):
    import onnxruntime as ort

    path = model_paths(tiny_root).cosyvoice / "campplus.onnx"
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feats = np.random.default_rng(0).standard_normal((1, 57, 80)).astype(np.float32)
    (emb,) = sess.run(None, {sess.get_inputs()[0].name: feats})
    assert emb.shape == (1, 192) and emb.dtype == np.float32 and np.isfinite(emb).all()


@pytest.mark.parametrize("folder", [CHAT_DIR, TTS_DIR])
def test_step1_checkpoint_is_bf16_with_published_names(tiny_root, folder):
    from safetensors import safe_open

    path = tiny_root / folder
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["vocab_size"] == 74752 and cfg["model_type"] == "step1"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_step1.Step1ForCausalLM"
    expected = step1_tensor_shapes(cfg)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(expected)
        for name in ("lm_head.weight", "model.layers.1.self_attn.k_proj.weight"):
            t = f.get_tensor(name)
            assert t.dtype == torch.bfloat16 and tuple(t.shape) == expected[name]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_tokenizer_model_has_step1_special_ids(tiny_root):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tiny_root / CHAT_DIR / "tokenizer.model"))
    assert sp.get_piece_size() == 74752
    assert [sp.id_to_piece(i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<|EOT|>", "<|BOT|>"]
    assert sp.id_to_piece(5) == "<0x00>" and sp.id_to_piece(260) == "<0xFF>"
    assert sp.piece_to_id("<audio_0>") == 65536 and sp.piece_to_id("<audio_5119>") == 70655
    assert sp.is_unused(65535) and sp.is_unused(70656) and sp.is_unused(74751)
    learned = [sp.id_to_piece(i) for i in range(261, 400)]
    assert all(not p.startswith("<reserved_") for p in learned)
    assert (tiny_root / TTS_DIR / "tokenizer.model").read_bytes() == (
        tiny_root / CHAT_DIR / "tokenizer.model").read_bytes()


def test_fast_tokenizer_loads_folder_and_maps_audio_tokens(tiny_root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_root / CHAT_DIR))
    assert "Llama" in type(tok).__name__ and tok.is_fast
    assert tok.encode("<audio_12>") == [1, 65548]
    ids = tok.encode("<|BOT|>human\n你好<audio_0><audio_5119><|EOT|>")
    assert ids[:2] == [1, 4] and ids[-3:] == [65536, 70655, 3]
    assert tok.padding_side == "left"


# ---------------------------------------------------------------------------------------------
# flow.pt / hift.pt layouts are derived from the yaml's hyper-parameters


@pytest.mark.parametrize("part", ["flow", "hift"])
def test_state_dict_layout_from_golden_yaml_equals_golden_checkpoint(part):
    cfg = load_hyperpyyaml_plain(GOLDEN_TTS / "cosyvoice.yaml")
    derive = tiny.flow_param_shapes if part == "flow" else tiny.hift_param_shapes
    got = derive(cfg[part])
    golden = torch.load(GOLDEN_TTS / f"{part}.pt", map_location="cpu", weights_only=True)
    assert list(got) == list(golden)
    assert {k: tuple(v.shape) for k, v in golden.items()} == dict(got)


@pytest.mark.parametrize("sub", ["CosyVoice-300M-25Hz", "CosyVoice-300M-25Hz-Music"])
def test_tiny_cosyvoice_weights_match_their_yaml(tiny_root, sub):
    folder = tiny_root / TTS_DIR / sub
    cfg = load_hyperpyyaml_plain(folder / "cosyvoice.yaml")
    assert cfg["flow"].target == "cosyvoice.flow.flow.MaskedDiffWithXvec"
    assert cfg["flow"].value["input_frame_rate"] == pytest.approx(125 / 3)
    for part, derive in (("flow", tiny.flow_param_shapes), ("hift", tiny.hift_param_shapes)):
        sd = torch.load(folder / f"{part}.pt", map_location="cpu", weights_only=True)
        assert {k: tuple(v.shape) for k, v in sd.items()} == dict(derive(cfg[part]))
        assert all(v.dtype == torch.float32 for v in sd.values())
    hift = torch.load(folder / "hift.pt", map_location="cpu", weights_only=True)
    assert any(k.endswith(".weight_g") for k in hift) and "conv_pre.weight" not in hift


def test_music_and_common_cosyvoice_weights_differ(tiny_root):
    a = (tiny_root / TTS_DIR / "CosyVoice-300M-25Hz" / "flow.pt").read_bytes()
    b = (tiny_root / TTS_DIR / "CosyVoice-300M-25Hz-Music" / "flow.pt").read_bytes()
    assert a != b
