"""The few places where transformers 4.x and 5.x disagree, kept in one spot.

The golden vectors were made with transformers 4.48; we run on 5.x. The differences that touch a
causal LM written outside the library are: the cache argument is ``past_key_values`` in 4.x and
``cache`` in 5.x (in ``forward``, in ``generate`` and in the output classes), ``_tied_weights_keys``
became a ``{target: source}`` dict, the loading dtype argument became ``dtype``, and a
``DynamicCache`` takes the model config in 5.x.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import transformers
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

#: Name of the cache field in transformers' output classes ("cache" in 5.x).
CACHE_FIELD = (
    "cache"
    if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    else "past_key_values"
)

#: Name of the ``from_pretrained`` argument that sets the weights' dtype.
DTYPE_KWARG = "dtype" if TRANSFORMERS_MAJOR >= 5 else "torch_dtype"

LM_HEAD_KEY = "lm_head.weight"
EMBED_KEY = "model.embed_tokens.weight"


def tied_weights_keys() -> dict[str, str] | list[str]:
    """``_tied_weights_keys`` in the form this transformers version expects."""
    if TRANSFORMERS_MAJOR >= 5:
        return {LM_HEAD_KEY: EMBED_KEY}
    return [LM_HEAD_KEY]


def new_dynamic_cache(config: Any) -> DynamicCache:
    """A growing KV cache, built the way this transformers version builds one for ``generate``."""
    if TRANSFORMERS_MAJOR >= 5:
        return DynamicCache(config=config)
    return DynamicCache()


def checkpoint_tensor_names(path: str | os.PathLike, subfolder: str = "") -> set[str] | None:
    """Tensor names stored in a local checkpoint folder, or None when they cannot be read cheaply.

    Only index files and safetensors headers are read, never tensor data, so this is instant even
    for the 130B checkpoint. A hub id (not a local folder) gives None: the caller then keeps what
    the config says.
    """
    folder = Path(path) / subfolder
    if not folder.is_dir():
        return None
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return set(handle.keys())
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        import torch

        state = torch.load(str(legacy), map_location="meta", weights_only=True, mmap=True)
        return set(state)
    return None
