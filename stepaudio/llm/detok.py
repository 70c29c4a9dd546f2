"""Incremental detokenization: token ids in one at a time, text out as soon as it is final.

Decoding each new token on its own is wrong twice over with the Step1 (Llama-style SentencePiece)
tokenizer: the decoder strips the leading space of whatever it decodes first, so ``▁world`` alone
comes out as ``world``; and byte-fallback pieces (``<0xE4>``...) decode to U+FFFD until the rest
of their UTF-8 character arrives. The classic fix, used by TGI and vLLM, decodes a short window
that starts at the last emitted boundary: the window's own first-token artefacts cancel out
between the two decodes, and text is released only when it does not end in a partial character.

Invariant (tested): when the ids spell valid UTF-8, the concatenation of all deltas plus
``flush()`` equals ``tokenizer.decode(all_ids)`` with the same ``skip_special_tokens``. Invalid
byte runs (random-weight babble) come out as U+FFFD either way, though not always as many of them:
the byte-fallback decoder replaces a whole invalid run at once, and runs are split differently.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Text deltas for one output stream. Not thread-safe: one per request."""

    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self.ids: list[int] = []
        # Window bounds: [prefix, read) is text already emitted, [read, end) is held back.
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False
        )

    def add(self, token_id: int) -> str:
        """Append one id; return the text that became final (often '', never half a character)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self.ids)
            return delta
        return ""

    def add_many(self, token_ids: list[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character decodes to U+FFFD, as in decode)."""
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        if len(new_text) > len(prefix_text):
            return new_text[len(prefix_text) :]
        return ""
