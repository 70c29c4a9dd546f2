"""Model directory discovery and validation (`stepaudio models check DIR`).

A 265 GB checkpoint that fails to load after ten minutes of reading weights is the worst way to learn
that one shard is missing or a config was edited by hand. Everything here reads only headers, configs
and small metadata files, so a whole model root is judged in well under a second and every problem
is reported at once, one line each, naming the file and what was expected.

The folder layout is the published one (see docs / reference/step-audio.md §1):

    <root>/Step-Audio-Tokenizer/   linguistic_tokenizer.npy, speech_tokenizer_v1.onnx, dengcunqin/…/
    <root>/Step-Audio-Chat/        config.json, tokenizer.model, *.safetensors (+ index)
    <root>/Step-Audio-TTS-3B/      the same + CosyVoice-300M-25Hz/ and CosyVoice-300M-25Hz-Music/
    <root>/speakers/               optional: speakers_info.json + {id}_prompt.wav
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import yaml

from .tokenizer.interleave import AUDIO_ID_BASE, AUDIO_VOCAB, VQ02_SIZE

TOKENIZER_DIR = "Step-Audio-Tokenizer"
CHAT_DIR = "Step-Audio-Chat"
TTS_DIR = "Step-Audio-TTS-3B"
SPEAKERS_DIR = "speakers"
PARAFORMER_SUBDIR = (
    "dengcunqin/speech_paraformer-large_asr_nat-zh-cantonese-en-16k-vocab8501-online"
)
CENTROIDS_FILE = "linguistic_tokenizer.npy"
S3_ONNX_FILE = "speech_tokenizer_v1.onnx"
COSYVOICE_DIR = "CosyVoice-300M-25Hz"
COSYVOICE_MUSIC_DIR = "CosyVoice-300M-25Hz-Music"
COSYVOICE_FILES = ("cosyvoice.yaml", "flow.pt", "hift.pt", "campplus.onnx", S3_ONNX_FILE)
SAFETENSORS_INDEX = "model.safetensors.index.json"
STEP1_ARCHITECTURE = "Step1ForCausalLM"

S3_MELS = 128
FBANK_BINS = 80  # CAM++ input
AUDIO_TOKEN_END = AUDIO_ID_BASE + AUDIO_VOCAB  # ids 65536..70655 are <audio_0>..<audio_5119>
_MAX_LISTED = 8  # per kind of problem and file, so a wrong layer count does not print 800 lines


@dataclass(frozen=True)
class ModelPaths:
    """Where each loader finds its files; one place so no loader spells a folder name itself."""

    root: Path
    tokenizer: Path
    centroids: Path
    s3_onnx: Path
    paraformer: Path
    chat: Path
    tts: Path
    cosyvoice: Path
    cosyvoice_music: Path
    speakers: Path


def model_paths(root: Path | str) -> ModelPaths:
    root = Path(root)
    tok = root / TOKENIZER_DIR
    tts = root / TTS_DIR
    return ModelPaths(
        root=root,
        tokenizer=tok,
        centroids=tok / CENTROIDS_FILE,
        s3_onnx=tok / S3_ONNX_FILE,
        paraformer=tok / PARAFORMER_SUBDIR,
        chat=root / CHAT_DIR,
        tts=tts,
        cosyvoice=tts / COSYVOICE_DIR,
        cosyvoice_music=tts / COSYVOICE_MUSIC_DIR,
        speakers=root / SPEAKERS_DIR,
    )


# --------------------------------------------------------------------------------------------------
# Entry points


def check_model_root(root: Path | str) -> list[str]:
    """One line per problem that would stop the server from loading `root`; empty means usable.

    The speakers folder is not checked: the server falls back to the packaged speakers.
    """
    root = Path(root)
    if not root.exists():
        return [f"{root}: not found"]
    if not root.is_dir():
        return [f"{root}: not a folder"]
    p = model_paths(root)
    problems: list[str] = []
    for sub, check in (
        (p.tokenizer, check_tokenizer_dir),
        (p.chat, check_step1_dir),
        (p.tts, check_tts_dir),
    ):
        if not sub.is_dir():
            problems.append(f"{sub.name}/: missing folder (expected under {root})")
            continue
        problems.extend(check(sub, label=sub.name))
    return problems


def check_tokenizer_dir(path: Path, label: str | None = None) -> list[str]:
    """Step-Audio-Tokenizer: k-means centroids, S3 ONNX, FunASR paraformer folder."""
    path = Path(path)
    label = label or path.name
    problems: list[str] = []
    dim = None
    npy = path / CENTROIDS_FILE
    if _require(npy, f"{label}/{CENTROIDS_FILE}", problems):
        try:
            shape, dtype = npy_header(npy)
        except ValueError as err:
            problems.append(f"{label}/{CENTROIDS_FILE}: not a readable .npy file ({err})")
        else:
            if len(shape) != 2 or shape[0] != VQ02_SIZE:
                problems.append(
                    f"{label}/{CENTROIDS_FILE}: shape {list(shape)}, expected [{VQ02_SIZE}, D] "
                    f"(one centroid per linguistic code)"
                )
            else:
                dim = shape[1]
            if not np.issubdtype(dtype, np.floating):
                problems.append(f"{label}/{CENTROIDS_FILE}: dtype {dtype}, expected float32")
    onnx_path = path / S3_ONNX_FILE
    if _require(onnx_path, f"{label}/{S3_ONNX_FILE}", problems):
        problems.extend(_check_s3_onnx(onnx_path, f"{label}/{S3_ONNX_FILE}"))
    para = path / PARAFORMER_SUBDIR
    if not para.is_dir():
        problems.append(f"{label}/{PARAFORMER_SUBDIR}/: missing folder")
    else:
        problems.extend(check_paraformer_dir(para, f"{label}/{PARAFORMER_SUBDIR}", centroid_dim=dim))
    return problems


def check_paraformer_dir(path: Path, label: str, centroid_dim: int | None = None) -> list[str]:
    """The FunASR streaming paraformer folder, as `funasr.AutoModel(model=DIR)` reads it."""
    problems: list[str] = []
    for name in ("model.pt", "am.mvn"):
        _require(path / name, f"{label}/{name}", problems)
    if not (path / "tokens.json").is_file() and not (path / "tokens.txt").is_file():
        problems.append(f"{label}/tokens.json: missing (neither tokens.json nor tokens.txt found)")
    elif (path / "tokens.json").is_file():
        tokens = _load_json(path / "tokens.json", f"{label}/tokens.json", problems)
        if tokens is not None and not (isinstance(tokens, list) and tokens):
            problems.append(f"{label}/tokens.json: expected a non-empty JSON list of tokens")
    if (path / "configuration.json").is_file():
        _load_json(path / "configuration.json", f"{label}/configuration.json", problems)
    cfg_path = path / "config.yaml"
    if not _require(cfg_path, f"{label}/config.yaml", problems):
        return problems
    try:
        cfg = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        problems.append(f"{label}/config.yaml: not valid YAML ({_one_line(err)})")
        return problems
    if not isinstance(cfg, dict):
        problems.append(f"{label}/config.yaml: expected a mapping at the top level")
        return problems
    where = f"{label}/config.yaml"
    out_size = _get_int(cfg, "encoder_conf.output_size", where, problems)
    if out_size is not None and centroid_dim is not None and out_size != centroid_dim:
        problems.append(
            f"{where}: encoder_conf.output_size is {out_size} but the k-means centroids in "
            f"{CENTROIDS_FILE} have dimension {centroid_dim}; they must match"
        )
    n_mels = _get_int(cfg, "frontend_conf.n_mels", where, problems)
    lfr_m = _get_int(cfg, "frontend_conf.lfr_m", where, problems)
    lfr_n = _get_int(cfg, "frontend_conf.lfr_n", where, problems)
    if lfr_n is not None and lfr_n != 6:
        problems.append(
            f"{where}: frontend_conf.lfr_n is {lfr_n}, expected 6 (one linguistic frame per 60 ms, "
            f"which the 2:3 interleave with the 25 Hz codes relies on)"
        )
    fs = _dig(cfg, "frontend_conf.fs")
    if fs is not None and fs != 16000:
        problems.append(f"{where}: frontend_conf.fs is {fs!r}, expected 16000")
    for key in ("model", "encoder", "frontend"):
        if not isinstance(cfg.get(key), str):
            problems.append(f"{where}: missing key {key!r} (a class name)")
    mvn = path / "am.mvn"
    if mvn.is_file() and n_mels is not None and lfr_m is not None:
        problems.extend(_check_am_mvn(mvn, f"{label}/am.mvn", n_mels * lfr_m))
    return problems


def check_step1_dir(path: Path, label: str | None = None) -> list[str]:
    """A Step1ForCausalLM folder (Chat or TTS-3B): config, tokenizer, safetensors headers."""
    path = Path(path)
    label = label or path.name
    problems: list[str] = []
    cfg = None
    if _require(path / "config.json", f"{label}/config.json", problems):
        raw = _load_json(path / "config.json", f"{label}/config.json", problems)
        if raw is not None:
            cfg = _check_step1_config(raw, f"{label}/config.json", problems)
    if _require(path / "tokenizer.model", f"{label}/tokenizer.model", problems):
        vocab = cfg["vocab_size"] if cfg else None
        problems.extend(_check_sentencepiece(path / "tokenizer.model", f"{label}/tokenizer.model", vocab))
    if _require(path / "tokenizer_config.json", f"{label}/tokenizer_config.json", problems):
        _load_json(path / "tokenizer_config.json", f"{label}/tokenizer_config.json", problems)
    expected = step1_tensor_shapes(cfg) if cfg else None
    problems.extend(_check_step1_weights(path, label, expected, cfg))
    return problems


def check_tts_dir(path: Path, label: str | None = None) -> list[str]:
    """Step-Audio-TTS-3B: the Step1 LM plus the two CosyVoice token-to-wav folders."""
    path = Path(path)
    label = label or path.name
    problems = check_step1_dir(path, label)
    for sub in (COSYVOICE_DIR, COSYVOICE_MUSIC_DIR):
        if not (path / sub).is_dir():
            problems.append(f"{label}/{sub}/: missing folder")
        else:
            problems.extend(check_cosyvoice_dir(path / sub, f"{label}/{sub}"))
    return problems


def check_cosyvoice_dir(path: Path, label: str | None = None) -> list[str]:
    """A CosyVoice-300M-25Hz* folder: its five files and a yaml with flow / hift / feat_extractor."""
    path = Path(path)
    label = label or path.name
    problems: list[str] = []
    for name in COSYVOICE_FILES:
        _require(path / name, f"{label}/{name}", problems)
    if (path / "cosyvoice.yaml").is_file():
        try:
            cfg = load_hyperpyyaml_plain(path / "cosyvoice.yaml")
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            problems.append(f"{label}/cosyvoice.yaml: not valid YAML ({_one_line(err)})")
        else:
            if not isinstance(cfg, dict):
                problems.append(f"{label}/cosyvoice.yaml: expected a mapping at the top level")
            else:
                for key in ("flow", "hift", "feat_extractor"):
                    if key not in cfg:
                        problems.append(f"{label}/cosyvoice.yaml: missing key {key!r}")
                flow = tag_args(cfg.get("flow"))
                vocab = flow.get("vocab_size")
                if isinstance(vocab, int) and vocab < AUDIO_VOCAB:
                    problems.append(
                        f"{label}/cosyvoice.yaml: flow vocab_size is {vocab}, expected at least "
                        f"{AUDIO_VOCAB} (the dual-codebook tokens 0..{AUDIO_VOCAB - 1})"
                    )
    if (path / "campplus.onnx").is_file():
        problems.extend(_check_campplus_onnx(path / "campplus.onnx", f"{label}/campplus.onnx"))
    if (path / S3_ONNX_FILE).is_file():
        problems.extend(_check_s3_onnx(path / S3_ONNX_FILE, f"{label}/{S3_ONNX_FILE}"))
    return problems


# --------------------------------------------------------------------------------------------------
# Step1 (Chat / TTS-3B)

_STEP1_INT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_attention_groups",
    "num_hidden_layers",
    "vocab_size",
    "max_seq_len",
)


def _check_step1_config(raw: Any, where: str, problems: list[str]) -> dict[str, Any] | None:
    """Returns the config when its shapes can be trusted, else None (problems already listed)."""
    if not isinstance(raw, dict):
        problems.append(f"{where}: expected a JSON object")
        return None
    before = len(problems)
    if raw.get("model_type") != "step1":
        problems.append(f"{where}: model_type is {raw.get('model_type')!r}, expected 'step1'")
    arch = raw.get("architectures")
    if not (isinstance(arch, list) and STEP1_ARCHITECTURE in arch):
        problems.append(f"{where}: architectures is {arch!r}, expected [{STEP1_ARCHITECTURE!r}]")
    for key in _STEP1_INT_KEYS:
        value = raw.get(key)
        if key not in raw:
            problems.append(f"{where}: missing key {key!r}")
        elif not _is_int(value) or value <= 0:
            problems.append(f"{where}: {key} is {value!r}, expected a positive integer")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in raw and not _is_int(raw[key]):
            problems.append(f"{where}: {key} is {raw[key]!r}, expected an integer")
    eps = raw.get("rms_norm_eps")
    if "rms_norm_eps" not in raw:
        problems.append(f"{where}: missing key 'rms_norm_eps'")
    elif isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < 1:
        problems.append(f"{where}: rms_norm_eps is {eps!r}, expected a small positive number")
    if len(problems) > before:
        return None
    hidden, heads, groups = raw["hidden_size"], raw["num_attention_heads"], raw["num_attention_groups"]
    if hidden % heads:
        problems.append(
            f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        )
    if heads % groups:
        problems.append(
            f"{where}: num_attention_heads {heads} is not a multiple of num_attention_groups {groups}"
        )
    if raw["vocab_size"] < AUDIO_TOKEN_END:
        problems.append(
            f"{where}: vocab_size is {raw['vocab_size']}, expected at least {AUDIO_TOKEN_END} "
            f"(<audio_0>..<audio_{AUDIO_VOCAB - 1}> are ids {AUDIO_ID_BASE}..{AUDIO_TOKEN_END - 1})"
        )
    return None if len(problems) > before else raw


def step1_tensor_shapes(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a Step1ForCausalLM checkpoint holds, in the published names.

    q/k/v are separate (vLLM packs them at load time); K/V have `groups * head_dim` rows (GQA);
    lm_head is its own tensor unless the config explicitly ties it.
    """
    hidden = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg["num_attention_groups"]) * (hidden // heads)
    vocab = int(cfg["vocab_size"])
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        shapes[p + "self_attn.k_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.v_proj.weight"] = (kv, hidden)
        shapes[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if cfg.get("tie_word_embeddings") is not True:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _shape_reason(name: str, cfg: Mapping[str, Any]) -> str:
    """Which config values a tensor's expected shape comes from, so the fix is obvious."""
    keys = ["hidden_size"]
    if "embed_tokens" in name or "lm_head" in name:
        keys.insert(0, "vocab_size")
    elif "k_proj" in name or "v_proj" in name:
        keys += ["num_attention_heads", "num_attention_groups"]
    elif ".mlp." in name:
        keys.insert(0, "intermediate_size")
    return ", ".join(f"{k} {cfg[k]}" for k in keys)


_SAFETENSORS_FLOATS = {"BF16", "F16", "F32"}


def _check_step1_weights(
    path: Path, label: str, expected: dict[str, tuple[int, ...]] | None, cfg: Any
) -> list[str]:
    """Safetensors headers against the config: single file, or shards named by the index."""
    problems: list[str] = []
    weight_map: dict[str, str] | None = None
    if (path / SAFETENSORS_INDEX).is_file():
        where = f"{label}/{SAFETENSORS_INDEX}"
        idx = _load_json(path / SAFETENSORS_INDEX, where, problems)
        if idx is None:
            return problems
        wm = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            problems.append(f"{where}: no 'weight_map' of tensor name -> file name")
            return problems
        weight_map = wm
        files = sorted(set(wm.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            problems.append(f"{label}/model.safetensors: missing (no *.safetensors files)")
            return problems
    found: dict[str, tuple[str, str, tuple[int, ...]]] = {}  # name -> (file, dtype, shape)
    unreadable: set[str] = set()
    for fname in files:
        where = f"{label}/{fname}"
        if not (path / fname).is_file():
            problems.append(f"{where}: missing (listed in {SAFETENSORS_INDEX})")
            unreadable.add(fname)
            continue
        try:
            header = read_safetensors_header(path / fname)
        except ValueError as err:
            problems.append(f"{where}: {err}")
            unreadable.add(fname)
            continue
        for name, (dtype, shape) in header.items():
            if weight_map is None or weight_map.get(name, fname) == fname:
                found.setdefault(name, (fname, dtype, shape))
    accounted = {n for n, f in (weight_map or {}).items() if f in unreadable}
    if weight_map is not None:
        gone = [n for n, f in weight_map.items() if f not in unreadable and n not in found]
        accounted.update(gone)
        _listed(problems, [
            f"{label}/{weight_map[n]}: tensor {n} is listed in {SAFETENSORS_INDEX} but not in the file"
            for n in gone
        ])
    if expected is None:
        return problems
    missing = [n for n in expected if n not in found and n not in accounted]
    _listed(problems, [f"{label}: missing tensor {n} {list(expected[n])}" for n in missing])
    wrong, bad_dtype = [], []
    for name, shape in expected.items():
        if name not in found:
            continue
        fname, dtype, got = found[name]
        if tuple(got) != shape:
            wrong.append(
                f"{label}/{fname}: tensor {name} has shape {list(got)}, expected {list(shape)} "
                f"(from config.json: {_shape_reason(name, cfg)})"
            )
        if dtype not in _SAFETENSORS_FLOATS:
            bad_dtype.append(f"{label}/{fname}: tensor {name} has dtype {dtype}, expected BF16")
    _listed(problems, wrong)
    _listed(problems, bad_dtype)
    _listed(problems, [f"{label}/{f}: unexpected tensor {n}" for n, (f, _, _) in found.items()
                       if n not in expected])
    return problems


def read_safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from the JSON header only; raises ValueError on a damaged file.

    Also catches truncated downloads: the header's data offsets must fit inside the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(raw, "little")
        if n <= 1 or n > size - 8 or n > 512 * 1024 * 1024:
            raise ValueError(f"not a safetensors file (header length {n} does not fit the file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"not a safetensors file (bad JSON header: {err})") from None
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file (header is not a JSON object)")
    data_len = size - 8 - n
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(meta["dtype"])
            shape = tuple(int(d) for d in meta["shape"])
            end = int(meta["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise ValueError(f"bad header entry for tensor {name}") from None
        if end > data_len:
            raise ValueError(
                f"truncated: tensor {name} ends at byte {end} of the data but the file holds "
                f"only {data_len} (interrupted download?)"
            )
        out[name] = (dtype, shape)
    return out


def _check_sentencepiece(path: Path, where: str, vocab_size: int | None) -> list[str]:
    """The ids every prompt depends on: specials 1/3/4 and <audio_N> at 65536 + N."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError type
        return [f"{where}: not a SentencePiece model ({_one_line(err)})"]
    pieces = proto.pieces
    problems = []
    if not pieces:
        return [f"{where}: not a SentencePiece model (no pieces)"]
    if vocab_size is not None and len(pieces) > vocab_size:
        problems.append(
            f"{where}: {len(pieces)} pieces but config.json vocab_size is {vocab_size}"
        )
    wanted = {1: "<s>", 3: "<|EOT|>", 4: "<|BOT|>", AUDIO_ID_BASE: "<audio_0>",
              AUDIO_TOKEN_END - 1: f"<audio_{AUDIO_VOCAB - 1}>"}
    for idx, piece in wanted.items():
        got = pieces[idx].piece if idx < len(pieces) else None
        if got != piece:
            problems.append(
                f"{where}: id {idx} is {got!r}, expected {piece!r}"
                + (" (the model has fewer pieces)" if got is None else "")
            )
    return problems


# --------------------------------------------------------------------------------------------------
# Tokenizer pieces


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file without reading its data (raises ValueError)."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        except (ValueError, OSError, SyntaxError) as err:
            raise ValueError(_one_line(err)) from None
    return tuple(shape), dtype


def _check_am_mvn(path: Path, where: str, dim: int) -> list[str]:
    """Kaldi nnet text: <AddShift> and <Rescale> vectors, each as long as the LFR feature."""
    text = path.read_text(encoding="utf-8", errors="replace")
    problems = []
    for tag in ("<AddShift>", "<Rescale>"):
        m = re.search(re.escape(tag) + r"[^\n]*\n\s*<LearnRateCoef>\s+\S+\s+\[([^\]]*)\]", text)
        if m is None:
            problems.append(f"{where}: no {tag} vector (Kaldi nnet text format expected)")
            continue
        try:
            n = len([float(v) for v in m.group(1).split()])
        except ValueError:
            problems.append(f"{where}: {tag} vector holds non-numbers")
            continue
        if n != dim:
            problems.append(
                f"{where}: {tag} vector has {n} values, expected {dim} (n_mels x lfr_m)"
            )
    return problems


# --------------------------------------------------------------------------------------------------
# ONNX signatures without loading the weights


@dataclass(frozen=True)
class OnnxIO:
    """One graph input or output: enough to tell whether a file is the model a loader expects."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name} {self.dtype} [{dims}]"


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64",
                9: "bool", 10: "float16", 11: "float64", 16: "bfloat16"}


def onnx_signature(path: Path) -> tuple[list[OnnxIO], list[OnnxIO]]:
    """Graph inputs and outputs, read by walking the protobuf wire format.

    `onnx.load` would parse every initializer (523 MB for the real S3 tokenizer); here each
    length-delimited field we do not need is skipped with a seek, so only a few hundred bytes are
    decoded. Raises ValueError when the file is not a well-formed ONNX model.
    """
    import onnx

    size = path.stat().st_size
    with open(path, "rb") as f:
        graph = None
        for field, start, length in _pb_fields(f, 0, size):
            if field == 7:  # ModelProto.graph
                graph = (start, length)
        if graph is None:
            raise ValueError("not an ONNX model (no graph)")
        inputs, outputs, initializers = [], [], set()
        for field, start, length in _pb_fields(f, graph[0], graph[0] + graph[1]):
            if field in (11, 12):  # GraphProto.input / output
                f.seek(start)
                vi = onnx.ValueInfoProto.FromString(f.read(length))
                (inputs if field == 11 else outputs).append(_onnx_io(vi))
            elif field == 5:  # initializer: only its name (old IR versions list them as inputs)
                for sub, s_start, s_len in _pb_fields(f, start, start + length):
                    if sub == 8:  # TensorProto.name
                        f.seek(s_start)
                        initializers.add(f.read(s_len).decode("utf-8", "replace"))
    return [i for i in inputs if i.name not in initializers], outputs


def _onnx_io(vi: Any) -> OnnxIO:
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
    return OnnxIO(vi.name, _ONNX_DTYPES.get(tt.elem_type, f"type{tt.elem_type}"), shape)


def _pb_varint(f: BinaryIO) -> int:
    result = shift = 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError("truncated protobuf")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7
        if shift > 63:
            raise ValueError("bad protobuf varint")


def _pb_fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, offset, length) of each length-delimited field in [start, end)."""
    f.seek(start)
    pos = start
    while pos < end:
        key = _pb_varint(f)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("bad protobuf field")
        if wire == 0:
            _pb_varint(f)
        elif wire == 1:
            f.seek(8, 1)
        elif wire == 5:
            f.seek(4, 1)
        elif wire == 2:
            length = _pb_varint(f)
            here = f.tell()
            if here + length > end:
                raise ValueError("truncated protobuf (a field runs past the end)")
            yield field, here, length
            f.seek(here + length)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        pos = f.tell()
    if pos != end:
        raise ValueError("truncated protobuf")


def _signature_or_problem(path: Path, where: str) -> tuple[list[OnnxIO], list[OnnxIO]] | str:
    try:
        return onnx_signature(path)
    except (ValueError, OSError) as err:
        return f"{where}: {err}"
    except Exception as err:  # noqa: BLE001 - protobuf's DecodeError is not a ValueError
        return f"{where}: not an ONNX model ({_one_line(err)})"


def _check_s3_onnx(path: Path, where: str) -> list[str]:
    """The reference feeds inputs by position: (feats float [B,128,T], feats_length int32 [B])."""
    sig = _signature_or_problem(path, where)
    if isinstance(sig, str):
        return [sig]
    inputs, outputs = sig
    want_in = f"feats float32 [batch, {S3_MELS}, T], feats_length int32 [batch]"
    ok = (
        len(inputs) == 2
        and _io_ok(inputs[0], ("float32",), 3, {1: S3_MELS})
        and _io_ok(inputs[1], ("int32",), 1, {})
    )
    problems = []
    if not ok:
        problems.append(
            f"{where}: inputs are ({_describe(inputs)}), expected 2 inputs ({want_in})"
        )
    if not outputs or not _io_ok(outputs[0], ("int64", "int32"), 2, {}):
        problems.append(
            f"{where}: outputs are ({_describe(outputs)}), expected indices int64 [batch, T_out]"
        )
    return problems


def _check_campplus_onnx(path: Path, where: str) -> list[str]:
    sig = _signature_or_problem(path, where)
    if isinstance(sig, str):
        return [sig]
    inputs, outputs = sig
    problems = []
    if len(inputs) != 1 or not _io_ok(inputs[0], ("float32",), 3, {2: FBANK_BINS}):
        problems.append(
            f"{where}: inputs are ({_describe(inputs)}), expected 1 input "
            f"(feature float32 [batch, frames, {FBANK_BINS}])"
        )
    if not outputs or not _io_ok(outputs[0], ("float32",), 2, {}):
        problems.append(
            f"{where}: outputs are ({_describe(outputs)}), expected embedding float32 [batch, 192]"
        )
    return problems


def _io_ok(io: OnnxIO, dtypes: tuple[str, ...], rank: int, fixed: dict[int, int]) -> bool:
    if io.dtype not in dtypes or io.shape is None or len(io.shape) != rank:
        return False
    return all(not isinstance(io.shape[i], int) or io.shape[i] == v for i, v in fixed.items())


def _describe(ios: list[OnnxIO]) -> str:
    return ", ".join(io.describe() for io in ios) or "none"


# --------------------------------------------------------------------------------------------------
# hyperpyyaml without hyperpyyaml


@dataclass
class YamlTag:
    """A hyperpyyaml tag (`!new:pkg.Class`, `!name:…`, `!ref`, …) kept by name with its value.

    Inspecting a cosyvoice.yaml must not import (or even need) the classes it names.
    """

    tag: str
    value: Any

    @property
    def target(self) -> str:
        """The dotted name after `!new:` / `!name:` / `!apply:`, else ''."""
        return self.tag.split(":", 1)[1] if ":" in self.tag else ""


class _HyperLoader(yaml.SafeLoader):
    pass


def _construct_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> YamlTag:
    if isinstance(node, yaml.MappingNode):
        value: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
    return YamlTag("!" + suffix, value)


_HyperLoader.add_multi_constructor("!", _construct_tag)
# YAML 1.2 (ruamel, which hyperpyyaml uses) reads `1e-06` as a float; PyYAML's 1.1 rules need a dot.
_HyperLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_hyperpyyaml_plain(source: Path | str) -> Any:
    """Parse a hyperpyyaml file into dicts/lists with `YamlTag`s; simple `!ref <a.b>` are resolved."""
    text = source.read_text(encoding="utf-8") if isinstance(source, Path) else source
    doc = yaml.load(text, Loader=_HyperLoader)  # noqa: S506 - a SafeLoader subclass
    return _resolve_refs(doc, doc)


_REF = re.compile(r"^<([A-Za-z_][\w.\[\]]*)>$")


def _resolve_refs(node: Any, doc: Any) -> Any:
    if isinstance(node, YamlTag):
        if node.tag == "!ref" and isinstance(node.value, str):
            m = _REF.match(node.value.strip())
            if m:
                target = _lookup(doc, m.group(1))
                if target is not None:
                    return _resolve_refs(target, doc)
            return node
        return YamlTag(node.tag, _resolve_refs(node.value, doc))
    if isinstance(node, dict):
        return {k: _resolve_refs(v, doc) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_refs(v, doc) for v in node]
    return node


def _lookup(doc: Any, path: str) -> Any:
    cur = doc
    for part in re.split(r"[.\[\]]+", path):
        if not part:
            continue
        cur = tag_args(cur).get(part) if isinstance(cur, dict | YamlTag) else None
        if cur is None:
            return None
    return cur


def tag_args(node: Any) -> dict[str, Any]:
    """The keyword arguments of a `!new:` node (or a plain mapping); {} for anything else."""
    if isinstance(node, YamlTag):
        node = node.value
    return node if isinstance(node, dict) else {}


# --------------------------------------------------------------------------------------------------
# Small helpers


def _require(path: Path, where: str, problems: list[str]) -> bool:
    if path.is_file() and path.stat().st_size > 0:
        return True
    problems.append(f"{where}: {'empty file' if path.is_file() else 'missing'}")
    return False


def _load_json(path: Path, where: str, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        problems.append(f"{where}: not valid JSON ({_one_line(err)})")
        return None


def _dig(cfg: Any, dotted: str) -> Any:
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _get_int(cfg: Any, dotted: str, where: str, problems: list[str]) -> int | None:
    value = _dig(cfg, dotted)
    if value is None:
        problems.append(f"{where}: missing key {dotted!r}")
        return None
    if not _is_int(value) or value <= 0:
        problems.append(f"{where}: {dotted} is {value!r}, expected a positive integer")
        return None
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _listed(problems: list[str], lines: list[str]) -> None:
    problems.extend(lines[:_MAX_LISTED])
    if len(lines) > _MAX_LISTED:
        problems.append(f"... and {len(lines) - _MAX_LISTED} more like the line above")


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


__all__ = [
    "CHAT_DIR",
    "COSYVOICE_DIR",
    "COSYVOICE_FILES",
    "COSYVOICE_MUSIC_DIR",
    "ModelPaths",
    "OnnxIO",
    "PARAFORMER_SUBDIR",
    "SPEAKERS_DIR",
    "TOKENIZER_DIR",
    "TTS_DIR",
    "YamlTag",
    "check_cosyvoice_dir",
    "check_model_root",
    "check_paraformer_dir",
    "check_step1_dir",
    "check_tokenizer_dir",
    "check_tts_dir",
    "load_hyperpyyaml_plain",
    "model_paths",
    "npy_header",
    "onnx_signature",
    "read_safetensors_header",
    "step1_tensor_shapes",
    "tag_args",
]
