"""Reply text → clauses for TTS-3B: cut as the LLM streams, at Chinese and English punctuation.

Why cut at all: TTS-3B reads a whole text before its first audio token, so the first clause sets
the first-audio latency, and every clause must fit the TTS context. Why not cut at every comma:
each clause is a separate TTS request, and prosody suffers when the model sees only a few words.
So the first clause is cut at the first comma once it has a few characters; later ones only at
sentence ends, or at a comma once they are long; anything longer than ``max_chars`` is cut at a
space (or hard) so it always fits.

Instruction tags: the reference reads tags only at the start of its one text. A reply that starts
``(粤语)…`` or ``(RAP)…`` means the whole reply, so the leading tags are repeated in front of every
clause (a RAP tag also picks the music vocoder and speaker entry for each clause). A bracketed
word that is not a known tag is left in the text, as the reference would read it, and reported
once per reply.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from stepaudio.tts.prompt import INSTRUCTION_TAGS

log = logging.getLogger(__name__)

KNOWN_TAGS = frozenset(t for tags in INSTRUCTION_TAGS.values() for t in tags)
#: Sentence ends; "." only counts when followed by whitespace (not "3.14", "e.g.x").
HARD_PUNCT = set("。！？!?；;…\n")
SOFT_PUNCT = set("，,、：:")
CLOSERS = set("\"'”’」』）)】》")
_LEADING_TAG = re.compile(r"\s*([（(])([^()（）]*)([）)])")
_SPEAKABLE = re.compile(r"\w", re.UNICODE)


def split_leading_tags(text: str) -> tuple[list[str], str]:
    """Leading ``(tag)``/``（tag）`` groups → (known tags as written, the rest of the text).

    Scanning stops at the first unknown tag, which stays in the text (the reference would read it).
    """
    tags: list[str] = []
    pos = 0
    while True:
        m = _LEADING_TAG.match(text, pos)
        if not m or m.group(2).strip() not in KNOWN_TAGS:
            break
        tags.append(m.group(0).strip())
        pos = m.end()
    return tags, text[pos:]


def unknown_tags(text: str) -> list[str]:
    """Bracketed words anywhere in ``text`` that look like tags but are not ones the model knows
    (short, no spaces, no sentence punctuation inside)."""
    out = []
    for m in re.finditer(r"[（(]([^()（）\s，。,.!?！？]{1,12})[）)]", text):
        if m.group(1) not in KNOWN_TAGS:
            out.append(m.group(0))
    return out


def is_speakable(text: str) -> bool:
    """True when there is a letter, digit or CJK character (not only punctuation or tags)."""
    _, body = split_leading_tags(text)
    return bool(_SPEAKABLE.search(re.sub(r"[（(][^()（）]*[）)]", "", body)))


@dataclass
class ClauseSplitter:
    """Feed text deltas, get clauses as soon as they are complete.

    ``first_min_chars``: the first clause may end at a soft mark once it has this many
    characters (low first-audio latency); ``soft_min_chars``: later clauses need this many to end
    at a soft mark; ``max_chars``: a clause is cut here whatever the punctuation (context limit).
    """

    first_min_chars: int = 4
    soft_min_chars: int = 24
    max_chars: int = 160
    _buf: str = ""
    _emitted: int = 0
    _prefix: str | None = None  # leading tags of the reply, once known
    _reported: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)

    def feed(self, delta: str) -> list[str]:
        """Add text; return the clauses it completed (each with the reply's leading tags)."""
        self._buf += delta
        if self._prefix is None and not self._settle_prefix(final=False):
            return []
        return self._drain(final=False)

    def finish(self) -> list[str]:
        """End of the reply: whatever is left is the last clause."""
        if self._prefix is None:
            self._settle_prefix(final=True)
        return self._drain(final=True)

    # -- internals ---------------------------------------------------------------------------
    def _settle_prefix(self, final: bool) -> bool:
        """Read the reply's leading tags once the text has moved past them."""
        tags, rest = split_leading_tags(self._buf)
        head = rest.lstrip()
        if not final and (not head or (head[0] in "(（" and not re.search(r"[)）]", head))):
            return False  # nothing after the tags yet, or a tag still arriving
        self._prefix = "".join(tags)
        self._buf = rest
        return True

    def _report(self, clause: str) -> None:
        for tag in unknown_tags(clause):
            if tag not in self._reported:
                self._reported.add(tag)
                msg = f"unknown instruction tag {tag} kept as text"
                self.warnings.append(msg)
                log.info("tts: %s", msg)

    def _drain(self, final: bool) -> list[str]:
        out = []
        while True:
            cut = self._find_cut(final)
            if cut is None:
                break
            piece, self._buf = self._buf[:cut], self._buf[cut:]
            self._emit(piece, out)
        if final:
            self._emit(self._buf, out)
            self._buf = ""
        return out

    def _emit(self, piece: str, out: list[str]) -> None:
        piece = piece.strip()
        if not piece:
            return
        self._report(piece)
        if not is_speakable(piece):
            if out:  # trailing punctuation or a stray tag: keep it with the clause before
                out[-1] = out[-1] + piece
            return
        out.append((self._prefix or "") + piece)
        self._emitted += 1

    def _find_cut(self, final: bool) -> int | None:
        """Index just past the end of the next complete clause in the buffer, or None."""
        buf = self._buf
        soft_min = self.first_min_chars if self._emitted == 0 else self.soft_min_chars
        depth = 0
        for i, ch in enumerate(buf):
            if ch in "(（":
                depth += 1
            elif ch in ")）":
                depth = max(0, depth - 1)
            if depth:
                continue
            hard = ch in HARD_PUNCT or (ch == "." and i + 1 < len(buf) and buf[i + 1].isspace())
            soft = ch in SOFT_PUNCT and _visible_len(buf[: i + 1]) >= soft_min
            if ch == "." and i + 1 == len(buf) and not final:
                return None  # "3." or "Mr." may go on; wait for the next character
            if hard or soft:
                end = i + 1
                while end < len(buf) and (buf[end] in CLOSERS or buf[end] in HARD_PUNCT):
                    end += 1
                if end == len(buf) and not final:
                    return None  # closing quotes or "?!" may still be arriving
                if _visible_len(buf[:end]) and is_speakable(buf[:end]):
                    return end
            if _visible_len(buf[: i + 1]) >= self.max_chars:
                return _long_cut(buf, i + 1)
        return None


def _visible_len(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace())


def _long_cut(buf: str, limit: int) -> int:
    """Cut an over-long clause at its last space before ``limit`` (else right at it)."""
    space = buf.rfind(" ", 0, limit)
    return space + 1 if space > limit // 2 else limit


def split_text(text: str, **kwargs: int) -> tuple[list[str], list[str]]:
    """A whole reply → (clauses, warnings): the offline path through the same splitter."""
    splitter = ClauseSplitter(**kwargs)
    clauses = splitter.feed(text) + splitter.finish()
    return clauses, splitter.warnings


def join_deltas(deltas: Iterable[str], **kwargs: int) -> list[str]:
    """Clauses for a reply arriving in pieces (tests, benchmarks)."""
    splitter = ClauseSplitter(**kwargs)
    out = []
    for d in deltas:
        out += splitter.feed(d)
    return out + splitter.finish()
