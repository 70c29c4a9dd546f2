"""Tiny random-weight checkpoints in the exact published layouts (`stepaudio tiny DIR`).

Without 280 GB of weights and five GPUs the whole server must still run end to end, through the very
loaders that read the real checkpoints: same folder names, file names, tensor names, config keys,
ONNX signatures and token ids; only the sizes are tiny and the weights random. Output is babble.

Every byte is a function of the seed (no timestamps, no global RNG), so a tree can be regenerated
and compared, and caches keyed by the seed stay valid. The tree is written into a temporary sibling
folder and renamed into place at the end: an interrupted run never leaves a half-written root.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ModelError
from .models import (
    CENTROIDS_FILE,
    CHAT_DIR,
    COSYVOICE_DIR,
    COSYVOICE_MUSIC_DIR,
    PARAFORMER_SUBDIR,
    S3_ONNX_FILE,
    SAFETENSORS_INDEX,
    SPEAKERS_DIR,
    STEP1_ARCHITECTURE,
    TOKENIZER_DIR,
    TTS_DIR,
    load_hyperpyyaml_plain,
    step1_tensor_shapes,
    tag_args,
)
from .tokenizer.interleave import AUDIO_ID_BASE, AUDIO_VOCAB, VQ02_SIZE, VQ06_SIZE

Progress = Callable[[str, int, int], None]

FORMAT_VERSION = 2  # 2: the TTS LM's head steered to audio ids and <|EOT|> (bias_tts_head)
MARKER_FILE = "stepaudio-tiny.json"
STEP1_VOCAB = 74752  # the published vocab_size: 65536 text ids + 5120 audio ids + 4096 reserved
SPEAKER_ASSETS = Path(__file__).resolve().parent / "assets" / "speakers"

# Chat and TTS differ on purpose, so a loader that reads the wrong config fails loudly. Six heads are
# not a power of two, which exercises both branches of the ALiBi slope formula.
CHAT_SIZES = {"hidden_size": 24, "intermediate_size": 64, "num_attention_heads": 6,
              "num_attention_groups": 2, "num_hidden_layers": 2}
TTS_SIZES = {"hidden_size": 16, "intermediate_size": 48, "num_attention_heads": 4,
             "num_attention_groups": 2, "num_hidden_layers": 2}

PARAFORMER_TOKENS = (
    ["<blank>", "<s>", "</s>"]
    + list("的一是不了在人有我他这个们中来上大为和国地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里")
    + ["a", "the", "to", "@@", "<unk>"]
)


def write_tiny_models(
    root: Path | str,
    seed: int = 0,
    force: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write a complete tiny model root at `root` and return it.

    Refuses a non-empty `root` unless `force`, because the same command pointed at a real model
    folder by mistake must not destroy 280 GB of downloads.
    """
    return _write(Path(root), seed, force, progress, keep_complete=False)


def _write(root: Path, seed: int, force: bool, progress: Progress | None, keep_complete: bool
           ) -> Path:
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ModelError(f"tiny models: seed must be a non-negative integer, got {seed!r}")
    if root.exists() and not root.is_dir():
        raise ModelError(f"{root}: exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise ModelError(
            f"{root}: folder exists and is not empty; refusing to overwrite it "
            f"(use --force / force=True to replace it with tiny checkpoints)"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    steps = _steps(seed)
    try:
        with _one_torch_thread():
            for i, (name, write) in enumerate(steps):
                if progress:
                    progress(name, i, len(steps))
                write(tmp)
        (tmp / MARKER_FILE).write_text(_marker_text(seed), encoding="utf-8")
        if keep_complete and is_complete_tiny_root(root, seed):
            shutil.rmtree(tmp)  # another process finished first; leave its files in place
        else:
            _swap_into_place(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        progress("done", len(steps), len(steps))
    return root


def ensure_tiny_models(root: Path | str, seed: int = 0, progress: Progress | None = None) -> Path:
    """Return `root`, generating it first when absent, incomplete or made with another seed.

    A non-empty folder without our marker is someone else's: it is refused, never overwritten.
    """
    root = Path(root)
    if is_complete_tiny_root(root, seed):
        return root
    if root.is_dir() and any(root.iterdir()) and _read_marker(root) is None:
        raise ModelError(
            f"{root}: folder exists and does not hold tiny checkpoints (no {MARKER_FILE}); "
            f"point the tiny profile at an empty or new folder"
        )
    try:
        return _write(root, seed, True, progress, keep_complete=True)
    except OSError:
        if is_complete_tiny_root(root, seed):  # another process won the race to rename
            return root
        raise


def is_complete_tiny_root(root: Path, seed: int) -> bool:
    marker = _read_marker(root)
    if marker != json.loads(_marker_text(seed)):
        return False
    return all((root / rel).is_file() for rel in expected_files())


def expected_files() -> list[str]:
    """Every file the generator writes, relative to the root (speaker files included)."""
    tok, para = TOKENIZER_DIR, f"{TOKENIZER_DIR}/{PARAFORMER_SUBDIR}"
    files = [f"{tok}/{CENTROIDS_FILE}", f"{tok}/{S3_ONNX_FILE}"]
    files += [f"{para}/{n}" for n in ("config.yaml", "model.pt", "am.mvn", "configuration.json",
                                       "tokens.json", "tokens.txt")]
    for d in (CHAT_DIR, TTS_DIR):
        files += [f"{d}/{n}" for n in ("config.json", "model.safetensors", SAFETENSORS_INDEX,
                                        "tokenizer.model", "tokenizer_config.json")]
    for sub in (COSYVOICE_DIR, COSYVOICE_MUSIC_DIR):
        files += [f"{TTS_DIR}/{sub}/{n}" for n in ("cosyvoice.yaml", "flow.pt", "hift.pt",
                                                    "campplus.onnx", S3_ONNX_FILE)]
    files += [f"{SPEAKERS_DIR}/{p.name}" for p in sorted(SPEAKER_ASSETS.iterdir()) if p.is_file()]
    return files


# --------------------------------------------------------------------------------------------------
# Orchestration


def _steps(seed: int) -> list[tuple[str, Callable[[Path], None]]]:
    spm_cache: dict[str, bytes] = {}

    def spm() -> bytes:
        if "model" not in spm_cache:
            spm_cache["model"] = sentencepiece_model_bytes()
        return spm_cache["model"]

    return [
        ("tokenizer: k-means codebook", lambda r: _write_centroids(r / TOKENIZER_DIR, seed)),
        ("tokenizer: S3 ONNX", lambda r: _write_onnx(
            r / TOKENIZER_DIR / S3_ONNX_FILE, s3_tokenizer_onnx(_rng(seed, "s3"), width=32))),
        ("tokenizer: paraformer", lambda r: write_paraformer(
            r / TOKENIZER_DIR / PARAFORMER_SUBDIR, seed)),
        ("chat: Step1 LM", lambda r: write_step1(r / CHAT_DIR, CHAT_SIZES, seed, "chat", spm())),
        ("tts: Step1 LM", lambda r: write_step1(r / TTS_DIR, TTS_SIZES, seed, "tts", spm())),
        ("tts: CosyVoice-300M-25Hz", lambda r: write_cosyvoice(
            r / TTS_DIR / COSYVOICE_DIR, seed, "cosyvoice")),
        ("tts: CosyVoice-300M-25Hz-Music", lambda r: write_cosyvoice(
            r / TTS_DIR / COSYVOICE_MUSIC_DIR, seed, "cosyvoice-music")),
        ("speakers", lambda r: _copy_speakers(r / SPEAKERS_DIR)),
    ]


def _marker_text(seed: int) -> str:
    return json.dumps(
        {
            "generator": "stepaudio.tiny",
            "format": FORMAT_VERSION,
            "seed": seed,
            "note": "TINY RANDOM WEIGHTS in the published Step-Audio layouts; output is babble.",
        },
        indent=2,
    ) + "\n"


def _read_marker(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == "stepaudio.tiny" else None


def _swap_into_place(tmp: Path, root: Path) -> None:
    """Rename `tmp` to `root`; an old `root` is moved aside first and deleted only afterwards."""
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()
    trash = None
    if root.exists():
        trash = root.parent / f".{root.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(root, trash)
    try:
        os.rename(tmp, root)
    except OSError:
        if trash is not None and not root.exists():
            os.rename(trash, root)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _one_torch_thread():
    """Generation is tiny; more threads only fight the other processes of a small host."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rng(seed: int, part: str) -> np.random.Generator:
    """An independent stream per part, so adding a part never changes the bytes of another."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(part.encode())]))


def _init_array(rng: np.random.Generator, name: str, shape: tuple[int, ...], std: float | None = None
                ) -> np.ndarray:
    """Random values that keep activations in a sane range: fan-in scaled weights, norms near 1.

    Norm weights and biases are random too (not 1 and 0), so a loader that silently skips them is
    caught by any numeric comparison.
    """
    leaf = name.rsplit(".", 1)[-1]
    shape = tuple(int(d) for d in shape)
    if leaf == "num_batches_tracked":
        return np.zeros(shape, np.int64)
    n = rng.standard_normal(shape, dtype=np.float32)
    if leaf == "running_var":
        return (1 + 0.1 * np.abs(n)).astype(np.float32)
    if leaf in ("bias", "running_mean", "pos_bias_u", "pos_bias_v"):
        return (0.1 * n).astype(np.float32)
    if leaf == "alpha" or len(shape) == 1:  # Snake alphas and norm weights
        return (1 + 0.1 * n).astype(np.float32)
    scale = std if std is not None else 1 / math.sqrt(max(1, int(np.prod(shape[1:]))))
    return (n * np.float32(scale)).astype(np.float32)


def random_state(shapes: Mapping[str, tuple[int, ...]], rng: np.random.Generator
                 ) -> OrderedDict[str, np.ndarray]:
    """Arrays for a state_dict layout; weight_norm gains equal the norms of their directions."""
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, shape in shapes.items():
        out[name] = _init_array(rng, name, shape)
    for name in out:
        if name.endswith(".weight_g"):
            v = out[name[: -len("_g")] + "_v"]
            out[name] = np.sqrt((v.astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True)
                                ).astype(np.float32)
    return out


def _save_torch(state: Mapping[str, np.ndarray], path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    sd = OrderedDict((k, torch.from_numpy(np.ascontiguousarray(v)).clone()) for k, v in state.items())
    torch.save(sd, path)


# --------------------------------------------------------------------------------------------------
# Step-Audio-Tokenizer


def _write_centroids(folder: Path, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    centroids = _rng(seed, "kmeans").standard_normal((VQ02_SIZE, 512), dtype=np.float32)
    np.save(folder / CENTROIDS_FILE, centroids)


def _write_onnx(path: Path, model: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def _onnx_model(nodes: list, inputs: list, outputs: list, inits: list, name: str) -> Any:
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    # IR 8 / opset 17, like the published files, so older onnxruntime builds accept them too.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="stepaudio.tiny", ir_version=8)
    return model


def _gelu_nodes(x: str, out: str) -> list:
    """Exact GELU from Erf: opset 17 has no Gelu operator."""
    from onnx import helper

    return [
        helper.make_node("Div", [x, "c_sqrt2"], [f"{out}_d"]),
        helper.make_node("Erf", [f"{out}_d"], [f"{out}_e"]),
        helper.make_node("Add", [f"{out}_e", "c_one"], [f"{out}_a"]),
        helper.make_node("Mul", [x, f"{out}_a"], [f"{out}_m"]),
        helper.make_node("Mul", [f"{out}_m", "c_half"], [out]),
    ]


def s3_tokenizer_onnx(rng: np.random.Generator, width: int) -> Any:
    """Stand-in for the CosyVoice S3 tokenizer with its signature and 25 Hz framing.

    feats float32 [B,128,T] + feats_length int32 [B] -> indices int64 [B, ceil(ceil(T/2)/2)]:
    two stride-2 convs (k3, pad 1) with GELU, LayerNorm, a length mask, Linear to 4096, argmax.
    """
    from onnx import TensorProto, helper, numpy_helper

    def arr(name: str, a: np.ndarray) -> Any:
        return numpy_helper.from_array(np.ascontiguousarray(a), name)

    w = width
    inits = [
        arr("conv1.weight", _init_array(rng, "conv1.weight", (w, 128, 3))),
        arr("conv1.bias", _init_array(rng, "conv1.bias", (w,))),
        arr("conv2.weight", _init_array(rng, "conv2.weight", (w, w, 3))),
        arr("conv2.bias", _init_array(rng, "conv2.bias", (w,))),
        arr("norm.weight", _init_array(rng, "norm.weight", (w,))),
        arr("norm.bias", _init_array(rng, "norm.bias", (w,))),
        arr("proj.weight", _init_array(rng, "proj.weight", (w, VQ06_SIZE), std=1 / math.sqrt(w))),
        arr("proj.bias", _init_array(rng, "proj.bias", (VQ06_SIZE,))),
        arr("c_sqrt2", np.array(math.sqrt(2.0), np.float32)),
        arr("c_one", np.array(1.0, np.float32)),
        arr("c_half", np.array(0.5, np.float32)),
        arr("i_zero", np.array(0, np.int64)),
        arr("i_one", np.array(1, np.int64)),
        arr("i_two", np.array(2, np.int64)),
        arr("axes0", np.array([0], np.int64)),
        arr("axes1", np.array([1], np.int64)),
        arr("axes2", np.array([2], np.int64)),
    ]
    conv = {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}
    nodes = [
        helper.make_node("Conv", ["feats", "conv1.weight", "conv1.bias"], ["c1"], **conv),
        *_gelu_nodes("c1", "g1"),
        helper.make_node("Conv", ["g1", "conv2.weight", "conv2.bias"], ["c2"], **conv),
        *_gelu_nodes("c2", "g2"),
        helper.make_node("Transpose", ["g2"], ["h"], perm=[0, 2, 1]),
        helper.make_node("LayerNormalization", ["h", "norm.weight", "norm.bias"], ["hn"],
                         axis=-1, epsilon=1e-5),
        # valid output frames: ceil(ceil(len / 2) / 2), from the lengths input
        helper.make_node("Cast", ["feats_length"], ["len0"], to=TensorProto.INT64),
        helper.make_node("Add", ["len0", "i_one"], ["len0p"]),
        helper.make_node("Div", ["len0p", "i_two"], ["len1"]),
        helper.make_node("Add", ["len1", "i_one"], ["len1p"]),
        helper.make_node("Div", ["len1p", "i_two"], ["len2"]),
        helper.make_node("Shape", ["hn"], ["hshape"]),
        helper.make_node("Gather", ["hshape", "i_one"], ["tout"], axis=0),
        helper.make_node("Range", ["i_zero", "tout", "i_one"], ["steps"]),
        helper.make_node("Unsqueeze", ["steps", "axes0"], ["steps2"]),
        helper.make_node("Unsqueeze", ["len2", "axes1"], ["len2u"]),
        helper.make_node("Less", ["steps2", "len2u"], ["valid"]),
        helper.make_node("Cast", ["valid"], ["validf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["validf", "axes2"], ["mask"]),
        helper.make_node("Mul", ["hn", "mask"], ["hm"]),
        helper.make_node("MatMul", ["hm", "proj.weight"], ["logits0"]),
        helper.make_node("Add", ["logits0", "proj.bias"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["indices"], axis=2, keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["batch", 128, "T"]),
        helper.make_tensor_value_info("feats_length", TensorProto.INT32, ["batch"]),
    ]
    outputs = [helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "T_out"])]
    return _onnx_model(nodes, inputs, outputs, inits, "s3_tokenizer_tiny")


def campplus_onnx(rng: np.random.Generator, width: int = 32, dim: int = 192) -> Any:
    """Stand-in for CAM++: fbank float32 [B, frames, 80] -> speaker embedding float32 [B, 192].

    Conv, ReLU, conv, ReLU, mean+std pooling over time, linear: the same signature, any length.
    """
    from onnx import TensorProto, helper, numpy_helper

    def arr(name: str, a: np.ndarray) -> Any:
        return numpy_helper.from_array(np.ascontiguousarray(a), name)

    inits = [
        arr("conv1.weight", _init_array(rng, "conv1.weight", (width, 80, 5))),
        arr("conv1.bias", _init_array(rng, "conv1.bias", (width,))),
        arr("conv2.weight", _init_array(rng, "conv2.weight", (width, width, 3))),
        arr("conv2.bias", _init_array(rng, "conv2.bias", (width,))),
        arr("lin.weight", _init_array(rng, "lin.weight", (dim, 2 * width))),
        arr("lin.bias", _init_array(rng, "lin.bias", (dim,))),
        arr("eps", np.array(1e-5, np.float32)),
    ]
    nodes = [
        helper.make_node("Transpose", ["feature"], ["x"], perm=[0, 2, 1]),
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"],
                         kernel_shape=[5], pads=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"],
                         kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("ReduceMean", ["r2"], ["mean_k"], axes=[2], keepdims=1),
        helper.make_node("Sub", ["r2", "mean_k"], ["centred"]),
        helper.make_node("Mul", ["centred", "centred"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[2], keepdims=0),
        helper.make_node("Add", ["var", "eps"], ["var_eps"]),
        helper.make_node("Sqrt", ["var_eps"], ["std"]),
        helper.make_node("ReduceMean", ["r2"], ["mean"], axes=[2], keepdims=0),
        helper.make_node("Concat", ["mean", "std"], ["pooled"], axis=1),
        helper.make_node("Gemm", ["pooled", "lin.weight", "lin.bias"], ["embedding"], transB=1),
    ]
    inputs = [helper.make_tensor_value_info("feature", TensorProto.FLOAT,
                                            ["batch_size", "frame_num", 80])]
    outputs = [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch_size", dim])]
    return _onnx_model(nodes, inputs, outputs, inits, "campplus_tiny")


PARAFORMER_CONFIG = """\
# TINY RANDOM-WEIGHT test model written by `stepaudio tiny`; the layout of the real
# dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online
model: ParaformerStreaming
model_conf:
  ctc_weight: 0.0
  lsm_weight: 0.1
  length_normalized_loss: true
  predictor_weight: 1.0
  predictor_bias: 1
  sampling_ratio: 0.75
encoder: SANMEncoderChunkOpt
encoder_conf:
  output_size: 512
  attention_heads: 4
  linear_units: 32
  num_blocks: 2
  dropout_rate: 0.1
  positional_dropout_rate: 0.1
  attention_dropout_rate: 0.1
  input_layer: pe_online
  pos_enc_class: SinusoidalPositionEncoder
  normalize_before: true
  kernel_size: 11
  sanm_shfit: 0
  selfattention_layer_type: sanm
  chunk_size: [12, 15]
  stride: [8, 10]
  pad_left: [0, 0]
  encoder_att_look_back_factor: [4, 4]
  decoder_att_look_back_factor: [1, 1]
decoder: ParaformerSANMDecoder
decoder_conf:
  attention_heads: 4
  linear_units: 32
  num_blocks: 1
  dropout_rate: 0.1
  positional_dropout_rate: 0.1
  self_attention_dropout_rate: 0.1
  src_attention_dropout_rate: 0.1
  att_layer_num: 0
  kernel_size: 11
  sanm_shfit: 5
predictor: CifPredictorV2
predictor_conf:
  idim: 512
  threshold: 1.0
  l_order: 1
  r_order: 1
  tail_threshold: 0.45
frontend: WavFrontendOnline
frontend_conf:
  fs: 16000
  window: hamming
  n_mels: 80
  frame_length: 25
  frame_shift: 10
  lfr_m: 7
  lfr_n: 6
  dither: 0.0
specaug: SpecAugLFR
specaug_conf:
  apply_time_warp: false
  time_warp_window: 5
  time_warp_mode: bicubic
  apply_freq_mask: true
  freq_mask_width_range: [0, 30]
  lfr_rate: 6
  num_freq_mask: 1
  apply_time_mask: true
  time_mask_width_range: [0, 12]
  num_time_mask: 1
tokenizer: CharTokenizer
tokenizer_conf:
  unk_symbol: <unk>
  split_with_space: true
ctc_conf:
  dropout_rate: 0.0
  ctc_type: builtin
  reduce: true
  ignore_nan_grad: true
normalize: null
"""

MODELSCOPE_CONFIGURATION = {
    "framework": "pytorch",
    "task": "auto-speech-recognition",
    "model": {"type": "funasr"},
    "pipeline": {"type": "funasr-pipeline"},
    "model_name_in_hub": {"ms": "", "hf": ""},
    "file_path_metas": {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"token_list": "tokens.json", "seg_dict_file": "seg_dict"},
        "frontend_conf": {"cmvn_file": "am.mvn"},
    },
}


def write_paraformer(folder: Path, seed: int) -> None:
    """The FunASR folder that `funasr.AutoModel(model=folder)` loads offline, with random weights."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(PARAFORMER_CONFIG, encoding="utf-8")
    cfg = yaml.safe_load(PARAFORMER_CONFIG)
    (folder / "configuration.json").write_text(
        json.dumps(MODELSCOPE_CONFIGURATION, indent=2) + "\n", encoding="utf-8")
    (folder / "tokens.json").write_text(
        json.dumps(PARAFORMER_TOKENS, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    (folder / "tokens.txt").write_text("\n".join(PARAFORMER_TOKENS) + "\n", encoding="utf-8")
    fc = cfg["frontend_conf"]
    (folder / "am.mvn").write_text(
        am_mvn_text(_rng(seed, "am.mvn"), fc["n_mels"], fc["lfr_m"]), encoding="utf-8")
    shapes = paraformer_param_shapes(cfg, vocab_size=len(PARAFORMER_TOKENS))
    _save_torch(random_state(shapes, _rng(seed, "paraformer")), folder / "model.pt")


def paraformer_param_shapes(cfg: Mapping[str, Any], vocab_size: int) -> OrderedDict[str, tuple]:
    """state_dict names and shapes of pip FunASR's model class for this config.

    Built from FunASR's own class (the one that loads the real checkpoint), so the names can never
    drift from what the loader expects; only shapes are kept, the module itself is discarded.
    """
    import torch

    with contextlib.redirect_stdout(io.StringIO()):  # funasr prints an ffmpeg notice on import
        import funasr  # noqa: F401 - registers the model classes
        from funasr.register import tables
    model_class = tables.model_classes.get(cfg["model"])
    if model_class is None:
        raise ModelError(f"funasr has no model class {cfg['model']!r}")
    fc = cfg["frontend_conf"]
    conf = {**cfg, **cfg.get("model_conf", {}), "vocab_size": vocab_size,
            "input_size": fc["n_mels"] * fc["lfr_m"]}
    with torch.random.fork_rng(devices=[]):  # its initialisers must not move the caller's RNG
        model = model_class(**conf)
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


def am_mvn_text(rng: np.random.Generator, n_mels: int, lfr_m: int) -> str:
    """Kaldi nnet CMVN: shift = -mean, scale = 1/std of log-mel fbank (x32768 waveform scale).

    A smooth speech-like mean/std curve per mel bin, repeated for each LFR frame, with ±5% seeded
    jitter: realistic magnitudes, so features after CMVN stay near zero mean and unit variance.
    """
    k = np.arange(n_mels) / max(1, n_mels - 1)
    mean = 15.5 - 4.0 * np.exp(-k * 6.0) + 1.5 * np.cos(np.pi * k)
    std = 3.0 + 0.9 * np.sin(np.pi * k)
    mean = np.tile(mean, lfr_m) * (1 + 0.05 * rng.uniform(-1, 1, n_mels * lfr_m))
    std = np.tile(std, lfr_m) * (1 + 0.05 * rng.uniform(-1, 1, n_mels * lfr_m))
    dim = n_mels * lfr_m

    def vec(v: np.ndarray) -> str:
        return " ".join(f"{x:.6f}" for x in v)

    return (
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {vec(-mean)} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {vec(1 / std)} ]\n</Nnet>\n"
    )


# --------------------------------------------------------------------------------------------------
# Step1 LMs (Chat / TTS-3B)


def step1_config(sizes: Mapping[str, int]) -> dict[str, Any]:
    """The published config.json keys, with tiny sizes and the real vocabulary size."""
    return {
        "architectures": [STEP1_ARCHITECTURE],
        "auto_map": {
            "AutoConfig": "configuration_step1.Step1Config",
            "AutoModelForCausalLM": "modeling_step1.Step1ForCausalLM",
        },
        "bos_token_id": 1,
        "eos_token_id": 3,
        "max_seq_len": 32768,
        "model_type": "step1",
        "pad_token_id": 0,
        "rms_norm_eps": 1e-05,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3",
        "vocab_size": STEP1_VOCAB,
        **sizes,
    }


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "legacy": False,
    "model_max_length": 65536,
    "pad_token": "<unk>",
    "padding_side": "left",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": "<unk>",
}


def write_step1(folder: Path, sizes: Mapping[str, int], seed: int, part: str, spm: bytes) -> None:
    """config.json, bf16 model.safetensors + index, tokenizer.model, tokenizer_config.json."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = step1_config(sizes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n",
                                        encoding="utf-8")
    rng = _rng(seed, part)
    arrays: dict[str, np.ndarray] = {}
    for name, shape in step1_tensor_shapes(cfg).items():
        if len(shape) == 1:  # RMSNorm weights
            arrays[name] = 1 + 0.2 * rng.standard_normal(shape, dtype=np.float32)
        else:
            arrays[name] = 0.2 * rng.standard_normal(shape, dtype=np.float32)
    if part == "tts":
        bias_tts_head(arrays, _rng(seed, "tts/head"))
    tensors = {name: torch.from_numpy(a).to(torch.bfloat16) for name, a in arrays.items()}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: "model.safetensors" for name in sorted(tensors)},
    }
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer.model").write_bytes(spm)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")


#: How the tiny TTS-3B is steered towards speech-like output (see `bias_tts_head`).
TTS_HEAD_BIAS = {"carrier": 2.0, "audio": 1.0, "text": -2.0, "eot": 1.1, "eot_spread": 3.0}


def bias_tts_head(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    """Make the random TTS LM write mostly ``<audio_N>`` ids and end with ``<|EOT|>`` after a
    plausible length, as the real one does, so the TTS path runs end to end on tiny checkpoints.

    Step1 has no lm_head bias, so one is built from a carrier: hidden dimension 0 of every token
    embedding is set to a constant, which the residual stream carries to the final norm, where it
    is a near-constant feature of every position. lm_head column 0 then gives every audio id a
    positive and every other id a negative offset; the ``<|EOT|>`` row gets a similar offset plus
    larger random weights on the other dimensions, so it wins only at some positions: a roughly
    geometric length, measured at 19-297 tokens (0.5-7 s) over 8 seeds, mean ~110. Pure
    functions of the seed.
    """
    b = TTS_HEAD_BIAS
    emb = arrays["model.embed_tokens.weight"]
    emb[:, 0] = b["carrier"]
    head = arrays["lm_head.weight"]
    head[:, 0] = b["text"]
    head[AUDIO_ID_BASE: AUDIO_ID_BASE + AUDIO_VOCAB, 0] = b["audio"]
    eot = 3
    head[eot, 1:] = (b["eot_spread"] * 0.2 * rng.standard_normal(head.shape[1] - 1)).astype(np.float32)
    head[eot, 0] = b["eot"]


_SPM_CORPUS = """\
Step-Audio is an open speech dialogue model: it listens, thinks and answers in speech.
The server hears the end of a turn, answers within a fraction of a second and stops when interrupted.
Hello, how are you today? I am fine, thank you. What is the weather like in Shanghai?
Please tell me a short story about a cat who learns to play the piano.
The quick brown fox jumps over the lazy dog while 12 birds sing 345 songs.
Speak slowly and clearly, please. Can you repeat that in English or in Chinese?
你好，今天天气真好，我们一起去公园散步吧。
请记录下你所听到的语音内容。
适配用户的语言，用简短口语化的文字回答。
那等我们到海洋馆之后，给妈妈买个礼物，好不好呀？
请用高兴的语气说这句话，然后用粤语再说一遍，最后用四川话说。
作为一名卓越的声优演员，你的任务是根据文本中的指令和情感，用指定的声音大声朗读文本。
你从一座叫我的小镇经过，刚好屋顶的雪化成雨飘落。
远远甩开的笑，他是陆行龟，他曾跌倒也曾吃过灰。
人活一辈子，总得是有高峰，有低谷，有顺境，有逆境。
我们明天上午十点在图书馆门口见面，记得带上你的笔记本。
这个问题很有意思，让我想一想再回答你。
"""


def sentencepiece_model_bytes() -> bytes:
    """A SentencePiece BPE with the Step1 id layout, deterministic byte for byte.

    0 <unk>, 1 <s>, 2 </s>, 3 <|EOT|>, 4 <|BOT|>, 256 byte-fallback pieces, learned pieces, then
    <reserved_N> (unused) up to 65535, <audio_0>..<audio_5119> (user-defined) at 65536..70655,
    and <reserved_N> up to the vocab size. Trained single-threaded on a fixed text, then extended.
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SPM_CORPUS.splitlines()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=800,
        hard_vocab_limit=False,
        character_coverage=1.0,
        num_threads=1,
        split_digits=True,
        byte_fallback=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        user_defined_symbols=["<|EOT|>", "<|BOT|>"],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    unused = spm_pb2.ModelProto.SentencePiece.UNUSED
    user = spm_pb2.ModelProto.SentencePiece.USER_DEFINED
    for i in range(len(proto.pieces), STEP1_VOCAB):
        piece = proto.pieces.add()
        if AUDIO_ID_BASE <= i < AUDIO_ID_BASE + AUDIO_VOCAB:
            piece.piece, piece.type = f"<audio_{i - AUDIO_ID_BASE}>", user
        else:
            piece.piece, piece.type = f"<reserved_{i}>", unused
        piece.score = 0.0
    return proto.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------------------------------
# CosyVoice token -> wav folders

COSYVOICE_YAML = """\
# TINY RANDOM-WEIGHT CosyVoice-300M-25Hz-style model written by `stepaudio tiny` (not the real sizes)
sample_rate: 22050
spk_embed_dim: 192

flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: 16
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: 5120
    input_frame_rate: 41.666666666666664
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: 16
        attention_heads: 2
        linear_units: 32
        num_blocks: 2
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: 16
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: [1, 1]
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [16, 16]
            dropout: 0.0
            attention_head_dim: 8
            n_blocks: 1
            num_mid_blocks: 1
            num_heads: 2
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 16
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 16

feat_extractor: !name:cosyvoice.matcha.audio.mel_spectrogram
    n_fft: 1024
    num_mels: 80
    sampling_rate: !ref <sample_rate>
    hop_size: 256
    win_size: 1024
    fmin: 0
    fmax: 8000
    center: False
"""


def write_cosyvoice(folder: Path, seed: int, part: str) -> None:
    """cosyvoice.yaml, flow.pt, hift.pt (legacy weight_norm keys), campplus.onnx, S3 placeholder.

    The weights' shapes are derived from the yaml just written, so the two cannot disagree.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cosyvoice.yaml").write_text(COSYVOICE_YAML, encoding="utf-8")
    cfg = load_hyperpyyaml_plain(COSYVOICE_YAML)
    _save_torch(random_state(flow_param_shapes(cfg["flow"]), _rng(seed, part + "/flow")),
                folder / "flow.pt")
    hift = random_state(hift_param_shapes(cfg["hift"]), _rng(seed, part + "/hift"))
    # Lift the f0 predictor into a voice-like range (tens to a few hundred Hz) so the source
    # excitation is mostly voiced, as with real speech, instead of all-noise.
    if "f0_predictor.classifier.bias" in hift:
        hift["f0_predictor.classifier.bias"] = hift["f0_predictor.classifier.bias"] * 100 + 120
        hift["f0_predictor.classifier.weight"] = hift["f0_predictor.classifier.weight"] * 30
    _save_torch(hift, folder / "hift.pt")
    _write_onnx(folder / "campplus.onnx", campplus_onnx(_rng(seed, part + "/campplus")))
    _write_onnx(folder / S3_ONNX_FILE, s3_tokenizer_onnx(_rng(seed, part + "/s3"), width=8))


class _Shapes(OrderedDict):
    """Ordered state_dict layout builder, mirroring the torch modules' registration order."""

    def linear(self, p: str, out: int, inp: int, bias: bool = True) -> None:
        self[p + "weight"] = (out, inp)
        if bias:
            self[p + "bias"] = (out,)

    def conv(self, p: str, out: int, inp: int, k: int, bias: bool = True) -> None:
        self[p + "weight"] = (out, inp, k)
        if bias:
            self[p + "bias"] = (out,)

    def norm(self, p: str, n: int) -> None:
        self[p + "weight"] = (n,)
        self[p + "bias"] = (n,)

    def wn_conv(self, p: str, out: int, inp: int, k: int) -> None:
        # legacy torch.nn.utils.weight_norm: `weight` is replaced by weight_g / weight_v after bias
        self[p + "bias"] = (out,)
        self[p + "weight_g"] = (out, 1, 1)
        self[p + "weight_v"] = (out, inp, k)

    def wn_conv_transpose(self, p: str, inp: int, out: int, k: int) -> None:
        self[p + "bias"] = (out,)
        self[p + "weight_g"] = (inp, 1, 1)
        self[p + "weight_v"] = (inp, out, k)

    def sub(self, p: str, other: Mapping[str, tuple]) -> None:
        for k, v in other.items():
            self[p + k] = v


def flow_param_shapes(flow: Any) -> OrderedDict[str, tuple]:
    """state_dict layout of `MaskedDiffWithXvec` for the yaml's `flow:` node (reference defaults)."""
    a = tag_args(flow)
    input_size = a.get("input_size", 512)
    output_size = a.get("output_size", 80)
    enc = tag_args(a["encoder"])
    s = _Shapes()
    s["input_embedding.weight"] = (a.get("vocab_size", 4096), input_size)
    s.linear("spk_embed_affine_layer.", output_size, a.get("spk_embed_dim", 192))
    s.sub("encoder.", conformer_param_shapes(a["encoder"]))
    s.linear("encoder_proj.", output_size, enc.get("output_size", 256))
    s.sub("decoder.estimator.", conditional_decoder_param_shapes(tag_args(a["decoder"])["estimator"]))
    s.sub("length_regulator.", interpolate_regulator_param_shapes(a["length_regulator"]))
    return s


def conformer_param_shapes(encoder: Any) -> OrderedDict[str, tuple]:
    """cosyvoice.transformer.encoder.ConformerEncoder (linear input layer)."""
    if getattr(encoder, "target", "ConformerEncoder").rsplit(".", 1)[-1] != "ConformerEncoder":
        raise ValueError(f"unsupported flow encoder {encoder.target!r}")
    a = tag_args(encoder)
    d = a.get("output_size", 256)
    heads = a.get("attention_heads", 4)
    units = a.get("linear_units", 2048)
    if a.get("input_layer", "conv2d") != "linear":
        raise ValueError(f"unsupported encoder input_layer {a.get('input_layer', 'conv2d')!r}")
    if a.get("pos_enc_layer_type", "rel_pos") not in ("rel_pos", "rel_pos_espnet", "abs_pos", "no_pos"):
        raise ValueError(f"unsupported pos_enc_layer_type {a.get('pos_enc_layer_type')!r}")
    rel = a.get("selfattention_layer_type", "rel_selfattn") == "rel_selfattn"
    macaron = a.get("macaron_style", True)
    cnn = a.get("use_cnn_module", True)
    kernel = a.get("cnn_module_kernel", 15)
    s = _Shapes()
    s.linear("embed.out.0.", d, a["input_size"])
    s.norm("embed.out.1.", d)
    s.norm("after_norm.", d)
    for i in range(a.get("num_blocks", 6)):
        p = f"encoders.{i}."
        if rel:
            s[p + "self_attn.pos_bias_u"] = (heads, d // heads)
            s[p + "self_attn.pos_bias_v"] = (heads, d // heads)
        for name in ("linear_q", "linear_k", "linear_v", "linear_out"):
            s.linear(f"{p}self_attn.{name}.", d, d,
                     bias=name != "linear_k" or a.get("key_bias", True))
        if rel:
            s.linear(p + "self_attn.linear_pos.", d, d, bias=False)
        ff = ["feed_forward"] + (["feed_forward_macaron"] if macaron else [])
        for name in ff:
            s.linear(f"{p}{name}.w_1.", units, d)
            s.linear(f"{p}{name}.w_2.", d, units)
        if cnn:
            c = p + "conv_module."
            s.conv(c + "pointwise_conv1.", 2 * d, d, 1)
            s.conv(c + "depthwise_conv.", d, 1, kernel)
            s.norm(c + "norm.", d)
            if a.get("cnn_module_norm", "batch_norm") == "batch_norm":
                s[c + "norm.running_mean"] = (d,)
                s[c + "norm.running_var"] = (d,)
                s[c + "norm.num_batches_tracked"] = ()
            s.conv(c + "pointwise_conv2.", d, d, 1)
        s.norm(p + "norm_ff.", d)
        s.norm(p + "norm_mha.", d)
        if macaron:
            s.norm(p + "norm_ff_macaron.", d)
        if cnn:
            s.norm(p + "norm_conv.", d)
            s.norm(p + "norm_final.", d)
    return s


def conditional_decoder_param_shapes(estimator: Any) -> OrderedDict[str, tuple]:
    """cosyvoice.flow.decoder.ConditionalDecoder: the U-Net of ResNet + transformer blocks."""
    a = tag_args(estimator)
    cin, cout = a["in_channels"], a["out_channels"]
    channels = tuple(a.get("channels", (256, 256)))
    heads, head_dim = a.get("num_heads", 4), a.get("attention_head_dim", 64)
    n_blocks, act = a.get("n_blocks", 1), a.get("act_fn", "snake")
    if act not in ("gelu", "gelu-approximate", "geglu"):
        raise ValueError(f"unsupported estimator act_fn {act!r}")
    temb = channels[0] * 4
    s = _Shapes()
    s.linear("time_mlp.linear_1.", temb, cin)
    s.linear("time_mlp.linear_2.", temb, temb)

    def resnet(p: str, dim: int, dim_out: int) -> None:
        s.linear(p + "mlp.1.", dim_out, temb)
        s.conv(p + "block1.block.0.", dim_out, dim, 3)
        s.norm(p + "block1.block.1.", dim_out)
        s.conv(p + "block2.block.0.", dim_out, dim_out, 3)
        s.norm(p + "block2.block.1.", dim_out)
        s.conv(p + "res_conv.", dim_out, dim, 1)

    def transformers(p: str, dim: int) -> None:
        inner = heads * head_dim
        for j in range(n_blocks):
            t = f"{p}{j}."
            s.norm(t + "norm1.", dim)
            for name in ("to_q", "to_k", "to_v"):
                s.linear(f"{t}attn1.{name}.", inner, dim, bias=False)
            s.linear(t + "attn1.to_out.0.", dim, inner)
            s.norm(t + "norm3.", dim)
            s.linear(t + "ff.net.0.proj.", dim * 4 * (2 if act == "geglu" else 1), dim)
            s.linear(t + "ff.net.2.", dim, dim * 4)

    out_ch = cin
    for i, ch in enumerate(channels):
        in_ch, out_ch = out_ch, ch
        p = f"down_blocks.{i}."
        resnet(p + "0.", in_ch, out_ch)
        transformers(p + "1.", out_ch)
        if i < len(channels) - 1:
            s.conv(p + "2.conv.", out_ch, out_ch, 3)  # Downsample1D
        else:
            s.conv(p + "2.", out_ch, out_ch, 3)
    for i in range(a.get("num_mid_blocks", 2)):
        resnet(f"mid_blocks.{i}.0.", channels[-1], out_ch)
        transformers(f"mid_blocks.{i}.1.", out_ch)
    up = channels[::-1] + (channels[0],)
    for i in range(len(up) - 1):
        p = f"up_blocks.{i}."
        resnet(p + "0.", up[i] * 2, up[i + 1])
        transformers(p + "1.", up[i + 1])
        if i < len(up) - 2:
            s[p + "2.conv.weight"] = (up[i + 1], up[i + 1], 4)  # Upsample1D: ConvTranspose1d k4
            s[p + "2.conv.bias"] = (up[i + 1],)
        else:
            s.conv(p + "2.", up[i + 1], up[i + 1], 3)
    s.conv("final_block.block.0.", up[-1], up[-1], 3)
    s.norm("final_block.block.1.", up[-1])
    s.conv("final_proj.", cout, up[-1], 1)
    return s


def interpolate_regulator_param_shapes(regulator: Any) -> OrderedDict[str, tuple]:
    """cosyvoice.flow.length_regulator.InterpolateRegulator: (Conv k3, GroupNorm, Mish)* + 1x1."""
    a = tag_args(regulator)
    ch = a["channels"]
    out = a.get("out_channels") or ch
    s = _Shapes()
    ratios = list(a.get("sampling_ratios", []))
    for i in range(len(ratios)):
        s.conv(f"model.{3 * i}.", ch, ch, 3)
        s.norm(f"model.{3 * i + 1}.", ch)
    s.conv(f"model.{3 * len(ratios)}.", out, ch, 1)
    return s


def hift_param_shapes(hift: Any) -> OrderedDict[str, tuple]:
    """cosyvoice.hifigan.generator.HiFTGenerator with its ConvRNNF0Predictor (reference defaults)."""
    a = tag_args(hift)
    base = a.get("base_channels", 512)
    n_fft = tag_args(a.get("istft_params", {"n_fft": 16})).get("n_fft", 16)
    ups = list(a.get("upsample_rates", [8, 8]))
    up_k = list(a.get("upsample_kernel_sizes", [16, 16]))
    rk = list(a.get("resblock_kernel_sizes", [3, 7, 11]))
    rd = list(a.get("resblock_dilation_sizes", [[1, 3, 5]] * 3))
    sk = list(a.get("source_resblock_kernel_sizes", [7, 11]))
    sd = list(a.get("source_resblock_dilation_sizes", [[1, 3, 5]] * 2))
    s = _Shapes()
    s.linear("m_source.l_linear.", 1, a.get("nb_harmonics", 8) + 1)
    s.wn_conv("conv_pre.", base, a.get("in_channels", 80), 7)
    for i, (_, k) in enumerate(zip(ups, up_k, strict=False)):
        s.wn_conv_transpose(f"ups.{i}.", base // 2**i, base // 2 ** (i + 1), k)
    cum = np.cumprod([1] + ups[::-1][:-1])[::-1]
    for i, (u, _, _) in enumerate(zip(cum, sk, sd, strict=False)):
        s.conv(f"source_downs.{i}.", base // 2 ** (i + 1), n_fft + 2, 1 if u == 1 else int(u) * 2)

    def resblock(p: str, ch: int, k: int, dilations: list) -> None:
        for j in range(len(dilations)):
            s.wn_conv(f"{p}convs1.{j}.", ch, ch, k)
        for j in range(len(dilations)):
            s.wn_conv(f"{p}convs2.{j}.", ch, ch, k)
        for name in ("activations1", "activations2"):
            for j in range(len(dilations)):
                s[f"{p}{name}.{j}.alpha"] = (ch,)

    for i, (_, k, d) in enumerate(zip(cum, sk, sd, strict=False)):
        resblock(f"source_resblocks.{i}.", base // 2 ** (i + 1), k, d)
    n = 0
    for i in range(len(ups)):
        for k, d in zip(rk, rd, strict=False):
            resblock(f"resblocks.{n}.", base // 2 ** (i + 1), k, d)
            n += 1
    s.wn_conv("conv_post.", n_fft + 2, base // 2 ** len(ups), 7)
    f0 = tag_args(a.get("f0_predictor"))
    if f0 or a.get("f0_predictor") is not None:
        cond, cin = f0.get("cond_channels", 512), f0.get("in_channels", 80)
        for j in range(5):
            s.wn_conv(f"f0_predictor.condnet.{2 * j}.", cond, cin if j == 0 else cond, 3)
        s.linear("f0_predictor.classifier.", f0.get("num_class", 1), cond)
    return s


# --------------------------------------------------------------------------------------------------
# Speakers


def _copy_speakers(folder: Path) -> None:
    """The packaged Apache-2.0 prompts, with their LICENSE and NOTICE kept beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(SPEAKER_ASSETS.iterdir()):
        if src.is_file():
            shutil.copyfile(src, folder / src.name)


__all__ = [
    "ensure_tiny_models",
    "expected_files",
    "flow_param_shapes",
    "hift_param_shapes",
    "is_complete_tiny_root",
    "paraformer_param_shapes",
    "sentencepiece_model_bytes",
    "write_tiny_models",
]
