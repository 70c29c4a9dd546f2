"""Whether a Step1 checkpoint fits where the in-process engine would load it, asked before loading.

The transformers engine loads a whole checkpoint into one process on one device. For TTS-3B that is
7 GB in bf16 (14 GB in float32); for the 132 B-parameter Step-Audio-Chat it is 264 GB in bf16 and
528 GB in float32, which no single device holds: started that way, the loader would grind through
swap or be killed long after start-up. So the size is read from the folder first (exactly from
the safetensors headers, else the index's ``total_size``, else the architecture in config.json)
and compared with the memory the device has free.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from stepaudio.errors import ModelError

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                   "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
#: Room left for activations, the KV cache and the allocator (a load needs more than the weights).
HEADROOM = 1.1


@dataclass(frozen=True)
class CheckpointSize:
    parameters: int
    stored_dtype: str  # "bfloat16", "float32", ... as far as known
    source: str  # where the count came from


def _safetensors_count(path: Path) -> tuple[int, int]:
    """(parameters, bytes) of one safetensors file, from its JSON header only."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    params = nbytes = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in info["shape"]:
            count *= int(d)
        params += count
        nbytes += count * _ST_DTYPE_BYTES.get(info.get("dtype", "F32"), 4)
    return params, nbytes


def _config_count(cfg: dict) -> int:
    """Step1's parameters from its architecture: GQA attention, SwiGLU MLP, two RMSNorms a layer,
    untied embeddings and lm_head (the published checkpoints hold both)."""
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    heads = int(cfg["num_attention_heads"])
    groups = int(cfg.get("num_attention_groups") or cfg.get("num_key_value_heads") or heads)
    layers, vocab = int(cfg["num_hidden_layers"]), int(cfg["vocab_size"])
    kv = 2 * h * (h // heads) * groups
    per_layer = 2 * h * h + kv + 3 * h * inter + 2 * h
    return layers * per_layer + 2 * vocab * h + h


def checkpoint_size(folder: str | os.PathLike[str]) -> CheckpointSize:
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelError(f"{folder}/config.json: cannot read it ({err})") from None
    stored = str(cfg.get("torch_dtype") or "float32")
    index = folder / "model.safetensors.index.json"
    files = sorted({folder / f for f in _weight_map(index).values()}) if index.is_file() else []
    if not files and (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    if files and all(f.is_file() for f in files):
        try:
            counts = [_safetensors_count(f) for f in files]
            return CheckpointSize(sum(c for c, _ in counts), stored, "safetensors headers")
        except (OSError, ValueError, KeyError, struct.error):
            pass  # an unreadable header: the loader will say what is wrong
    if index.is_file():
        total = (json.loads(index.read_text(encoding="utf-8")).get("metadata") or {}).get(
            "total_size")
        if total:
            return CheckpointSize(int(total) // DTYPE_BYTES.get(stored, 2), stored,
                                  "the safetensors index")
    try:
        return CheckpointSize(_config_count(cfg), stored, "config.json")
    except (KeyError, ValueError, TypeError, ZeroDivisionError):
        raise ModelError(f"{folder}: cannot tell the model's size from config.json") from None


def _weight_map(index: Path) -> dict[str, str]:
    try:
        return dict(json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {})
    except (OSError, ValueError):
        return {}


def available_bytes(device: str) -> int | None:
    """Memory free for a new model on ``device``; None when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if device != "cpu":
        return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:  # a container's own limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, avail)


def check_fits(folder: str | os.PathLike[str], device: str, dtype: str,
               available: int | None = None) -> CheckpointSize:
    """Raise :class:`ModelError` (pointing to vLLM) when the model cannot fit on ``device``."""
    size = checkpoint_size(folder)
    per = DTYPE_BYTES.get(size.stored_dtype if dtype == "auto" else dtype, 4)
    need = size.parameters * per
    free = available_bytes(device) if available is None else available
    if free is not None and need * HEADROOM > free:
        shown = size.stored_dtype if dtype == "auto" else dtype
        raise ModelError(
            f"{Path(folder).name} has {size.parameters / 1e9:.1f} B parameters "
            f"({need / 1e9:.0f} GB in {shown}, from {size.source}) but {device} has "
            f"{free / 1e9:.0f} GB free: the in-process transformers engine loads the whole model "
            f"on one device. Serve it on vLLM with tensor parallelism instead (llm.engine: openai "
            f"with the command `stepaudio vllm-command` prints, or llm.engine: vllm; docs/vllm.md)"
            + (", or load it in bfloat16" if shown == "float32" and need / 2 * HEADROOM <= free
               else "")
        )
    return size
