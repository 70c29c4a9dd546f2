"""The Step1 text tokenizer, loaded the way the reference loads it.

The reference calls ``AutoTokenizer.from_pretrained(dir)``, which turns the checkpoint's
``tokenizer.model`` + ``tokenizer_config.json`` (``LlamaTokenizer``, ``legacy: false``) into the
fast, tokenizers-backed Llama tokenizer. The slow SentencePiece class of transformers 4.x encodes
differently when text starts with ``<|BOT|>`` or ``<audio_N>`` (it inserts a ``▁`` piece), so
only the fast one reproduces the reference prompt ids. transformers 5.x has no slow class any
more: ``use_fast=False`` yields the same tokenizers backend, with the same ids as 4.48's fast one.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from stepaudio.errors import ModelError
from stepaudio.llm.tokens import AUDIO_TOKEN_OFFSET, BOS, BOS_ID, BOT, BOT_ID, EOT, EOT_ID

#: Pieces whose ids the prompt builders and the stop rule hard-code.
EXPECTED_IDS = {BOS: BOS_ID, EOT: EOT_ID, BOT: BOT_ID, "<audio_0>": AUDIO_TOKEN_OFFSET}


def load_text_tokenizer(
    path: str | os.PathLike, *, add_bos_token: bool | None = None, **kwargs: Any
) -> PreTrainedTokenizerBase:
    """Load a checkpoint folder's tokenizer and check the special ids.

    ``add_bos_token`` overrides the folder's setting (None keeps it); the TTS-3B prompt builder
    calls ``encode`` once per piece, so this flag decides whether each piece starts with id 1.
    """
    if add_bos_token is not None:
        kwargs["add_bos_token"] = add_bos_token
    # The folder's config.json names model_type step1 with an auto_map to remote code: unless
    # Step1 is registered, AutoTokenizer stops to ask whether to run that code.
    from stepaudio.llm import register_step1

    register_step1()
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the text tokenizer from {path}: {exc}") from exc
    check_special_ids(tokenizer)
    return tokenizer


def check_special_ids(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer whose special ids differ from the ones the prompts hard-code.

    A wrong folder (or a slow tokenizer) would otherwise produce prompts that look fine but
    condition the model on the wrong tokens.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(
            f"{type(tokenizer).__name__} is not the fast tokenizer; the reference prompt ids "
            "need the tokenizers-backed one (install `tokenizers`)"
        )
    vocab = tokenizer.get_vocab()
    for piece, expected in EXPECTED_IDS.items():
        got = vocab.get(piece)
        if got != expected:
            raise ModelError(f"tokenizer maps {piece!r} to {got}, expected {expected}")
