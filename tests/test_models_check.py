"""`stepaudio models check`: one clear line per problem, no weights read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stepaudio import models
from stepaudio.cli import main
from stepaudio.models import (
    CHAT_DIR,
    PARAFORMER_SUBDIR,
    TOKENIZER_DIR,
    TTS_DIR,
    YamlTag,
    check_cosyvoice_dir,
    check_model_root,
    check_step1_dir,
    check_tokenizer_dir,
    load_hyperpyyaml_plain,
    model_paths,
    onnx_signature,
)

GOLDEN = Path(__file__).parent / "fixtures" / "golden"


@pytest.fixture
def root(tiny_root: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny root that a test may break."""
    return Path(shutil.copytree(tiny_root, tmp_path / "models"))


def _rewrite_safetensors(path: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_fresh_tiny_root_has_no_problems(tiny_root):
    assert check_model_root(tiny_root) == []


def test_check_reads_no_weights(tiny_root, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(np, "load", refuse)
    monkeypatch.setattr("onnx.load", refuse)
    assert check_model_root(tiny_root) == []


def test_golden_tokenizer_and_cosyvoice_folders_pass():
    assert check_tokenizer_dir(GOLDEN / "tokenizer" / "Step-Audio-Tokenizer") == []
    assert check_cosyvoice_dir(GOLDEN / "tts" / "CosyVoice-300M-25Hz") == []


def test_golden_step1_checkpoint_with_golden_tokenizer_passes(tmp_path):
    folder = Path(shutil.copytree(GOLDEN / "step1" / "model", tmp_path / "Step1"))
    for f in (GOLDEN / "prompts" / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    assert check_step1_dir(folder) == []


def test_missing_root_is_one_line(tmp_path):
    assert check_model_root(tmp_path / "nope") == [f"{tmp_path / 'nope'}: not found"]


def test_missing_file_is_reported_with_its_path(root):
    (root / TTS_DIR / "CosyVoice-300M-25Hz" / "hift.pt").unlink()
    assert check_model_root(root) == ["Step-Audio-TTS-3B/CosyVoice-300M-25Hz/hift.pt: missing"]


def test_missing_folder_is_reported(root):
    shutil.rmtree(root / CHAT_DIR)
    problems = check_model_root(root)
    assert len(problems) == 1 and problems[0].startswith("Step-Audio-Chat/: missing folder")


def test_wrong_tensor_shape_names_tensor_shapes_and_config_keys(root):
    name = "model.layers.1.mlp.up_proj.weight"

    def edit(t):
        t[name] = t[name][:-1].clone()

    _rewrite_safetensors(root / TTS_DIR / "model.safetensors", edit)
    assert check_model_root(root) == [
        f"Step-Audio-TTS-3B/model.safetensors: tensor {name} has shape [47, 16], expected [48, 16] "
        "(from config.json: intermediate_size 48, hidden_size 16)"
    ]


def test_missing_tensor_is_reported_once(root):
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_safetensors(root / CHAT_DIR / "model.safetensors", lambda t: t.pop(name))
    index_path = root / CHAT_DIR / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    assert check_model_root(root) == [f"Step-Audio-Chat: missing tensor {name} [8, 24]"]


def test_tensor_listed_in_index_but_absent_from_shard_is_reported(root):
    name = "lm_head.weight"
    _rewrite_safetensors(root / CHAT_DIR / "model.safetensors", lambda t: t.pop(name))
    assert check_model_root(root) == [
        f"Step-Audio-Chat/model.safetensors: tensor {name} is listed in "
        "model.safetensors.index.json but not in the file"
    ]


def test_extra_tensor_is_reported(root):
    def edit(t):
        t["model.layers.9.mlp.up_proj.weight"] = torch.zeros(2, 2, dtype=torch.bfloat16)

    (root / CHAT_DIR / "model.safetensors.index.json").unlink()  # single-file layout
    _rewrite_safetensors(root / CHAT_DIR / "model.safetensors", edit)
    assert check_model_root(root) == [
        "Step-Audio-Chat/model.safetensors: unexpected tensor model.layers.9.mlp.up_proj.weight"
    ]


def test_truncated_safetensors_is_reported(root):
    path = root / CHAT_DIR / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    (problem,) = check_model_root(root)
    assert problem.startswith("Step-Audio-Chat/model.safetensors: truncated: tensor ")


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("num_attention_groups", 4,
         "Step-Audio-Chat/config.json: num_attention_heads 6 is not a multiple of "
         "num_attention_groups 4"),
        ("vocab_size", 32000,
         "Step-Audio-Chat/config.json: vocab_size is 32000, expected at least 70656 "
         "(<audio_0>..<audio_5119> are ids 65536..70655)"),
        ("hidden_size", "24",
         "Step-Audio-Chat/config.json: hidden_size is '24', expected a positive integer"),
        ("model_type", "llama",
         "Step-Audio-Chat/config.json: model_type is 'llama', expected 'step1'"),
    ],
)
def test_wrong_config_value_is_one_clear_line(root, key, value, expected):
    path = root / CHAT_DIR / "config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))
    problems = check_model_root(root)
    assert expected in problems
    if key != "vocab_size":
        assert problems == [expected]


def test_onnx_with_wrong_inputs_is_reported(root):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "wrong",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 80])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 80])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (root / TOKENIZER_DIR / "speech_tokenizer_v1.onnx").write_bytes(model.SerializeToString())
    assert check_model_root(root) == [
        "Step-Audio-Tokenizer/speech_tokenizer_v1.onnx: inputs are (x float32 [1, 80]), expected "
        "2 inputs (feats float32 [batch, 128, T], feats_length int32 [batch])",
        "Step-Audio-Tokenizer/speech_tokenizer_v1.onnx: outputs are (y float32 [1, 80]), expected "
        "indices int64 [batch, T_out]",
    ]


def test_garbage_onnx_is_reported(root):
    (root / TTS_DIR / "CosyVoice-300M-25Hz" / "campplus.onnx").write_bytes(b"\xff" * 64)
    (problem,) = check_model_root(root)
    assert problem.startswith("Step-Audio-TTS-3B/CosyVoice-300M-25Hz/campplus.onnx: ")


def test_encoder_size_must_match_centroids(root):
    path = root / TOKENIZER_DIR / PARAFORMER_SUBDIR / "config.yaml"
    path.write_text(path.read_text().replace("output_size: 512", "output_size: 256"))
    assert check_model_root(root) == [
        f"Step-Audio-Tokenizer/{PARAFORMER_SUBDIR}/config.yaml: encoder_conf.output_size is 256 "
        "but the k-means centroids in linguistic_tokenizer.npy have dimension 512; they must match"
    ]


def test_tokenizer_without_audio_pieces_is_reported(root):
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = root / CHAT_DIR / "tokenizer.model"
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    del proto.pieces[1000:]
    path.write_bytes(proto.SerializeToString())
    assert check_model_root(root) == [
        "Step-Audio-Chat/tokenizer.model: id 65536 is None, expected '<audio_0>' "
        "(the model has fewer pieces)",
        "Step-Audio-Chat/tokenizer.model: id 70655 is None, expected '<audio_5119>' "
        "(the model has fewer pieces)",
    ]


def test_onnx_signature_reader_agrees_with_onnx_load(tiny_root):
    import onnx

    files = sorted(tiny_root.rglob("*.onnx")) + sorted(GOLDEN.rglob("*.onnx"))
    assert len(files) >= 6
    for path in files:
        full = onnx.load(str(path))
        inputs, outputs = onnx_signature(path)
        assert [i.name for i in inputs] == [i.name for i in full.graph.input]
        assert [o.name for o in outputs] == [o.name for o in full.graph.output]


def test_hyperpyyaml_tags_are_kept_and_simple_refs_resolved():
    cfg = load_hyperpyyaml_plain(GOLDEN / "tts" / "CosyVoice-300M-25Hz" / "cosyvoice.yaml")
    flow = cfg["flow"]
    assert isinstance(flow, YamlTag) and flow.tag == "!new:cosyvoice.flow.flow.MaskedDiffWithXvec"
    assert flow.value["spk_embed_dim"] == 192  # !ref <spk_embed_dim>
    assert cfg["feat_extractor"].tag == "!name:cosyvoice.matcha.audio.mel_spectrogram"
    cfm = flow.value["decoder"].value["cfm_params"].value["content"]
    assert cfm["sigma_min"] == pytest.approx(1e-6) and cfm["inference_cfg_rate"] == 0.7


def test_model_paths_name_the_published_layout(tmp_path):
    p = model_paths(tmp_path)
    assert p.centroids == tmp_path / "Step-Audio-Tokenizer" / "linguistic_tokenizer.npy"
    assert p.paraformer == tmp_path / "Step-Audio-Tokenizer" / models.PARAFORMER_SUBDIR
    assert p.cosyvoice_music == tmp_path / "Step-Audio-TTS-3B" / "CosyVoice-300M-25Hz-Music"
    assert p.chat.name == "Step-Audio-Chat" and p.speakers.name == "speakers"


def test_cli_models_check_exit_codes_and_one_line_per_problem(root, tiny_root, capsys):
    assert main(["models", "check", str(tiny_root)]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    (root / TTS_DIR / "CosyVoice-300M-25Hz-Music" / "flow.pt").unlink()
    (root / TOKENIZER_DIR / "linguistic_tokenizer.npy").unlink()
    assert main(["models", "check", str(root)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == check_model_root(root)
    assert len(lines) == 2 and all(line.endswith(": missing") for line in lines)
