"""Speaker prompt features: computed once per voice, then reused by every reply in that voice.

A voice costs three model runs to describe (audio tokenizer for the LM prompt and the flow's
prompt tokens, CAM++ for the x-vector, the mel extractor for the flow's condition): far too slow
to repeat per clause. They are cached in an LRU keyed by speaker id, or for cloning by the hash of
the prompt audio and its transcript, so two requests with the same uploaded wav share one entry.

As in the reference, the features come from the untrimmed prompt (mel at 22.05 kHz, CAM++ at
16 kHz) except the tokens, which come from the trimmed prompt; they are the same for the normal and
the music vocoder folders (the reference computes them with the normal folder's frontend).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from stepaudio.errors import AudioError
from stepaudio.llm.tokens import AUDIO_TOKEN_OFFSET
from stepaudio.tts.sampling import FLOW_VOCAB

#: Shorter prompts give CAM++ and the flow too little of the voice to copy.
MIN_PROMPT_SECONDS = 1.0
#: The prompt's mel is part of every flow call (cost grows with it) and its tokens part of every
#: TTS prompt; the shipped prompts are 4-13 s, the reference's clone examples 3-8 s.
MAX_PROMPT_SECONDS = 30.0


class PromptAudioError(AudioError):
    """A speaker prompt wav that cannot describe a voice (too short, too long, silent)."""


class PromptTokenizer(Protocol):
    """What is needed of :class:`stepaudio.tokenizer.StepAudioTokenizer`."""

    def tokenize(self, wav: np.ndarray, sr: int, trim: bool = False): ...  # noqa: ANN201


class PromptFrontend(Protocol):
    """What is needed of :class:`stepaudio.tts.cosyvoice.CosyVoice`."""

    sample_rate: int

    def speech_feat(self, wav: np.ndarray) -> torch.Tensor: ...

    def embedding(self, wav16k: np.ndarray) -> torch.Tensor: ...


@dataclass(frozen=True)
class SpeakerFeatures:
    """Everything a voice contributes to one TTS request.

    ``prompt_code``: LLM ids (65536 + code) of the trimmed prompt, for the TTS-3B prompt;
    ``prompt_token``: the same minus 65536, (1, T1) int64, for the flow;
    ``prompt_feat``: (1, frames, 80) float32 mel; ``embedding``: (1, 192) float32.
    ``prompt_speaker`` is the name the system prompt uses ("" when cloning).
    """

    key: str
    prompt_text: str
    prompt_speaker: str
    prompt_code: tuple[int, ...]
    prompt_token: torch.Tensor
    prompt_feat: torch.Tensor
    embedding: torch.Tensor
    seconds: float


def check_prompt_audio(wav: np.ndarray, sr: int, what: str = "speaker prompt") -> np.ndarray:
    """Mono float32, within the length limits and not silent; else a PromptAudioError."""
    from stepaudio.audio import to_mono_float32  # soundfile: not needed by streaming alone

    wav = to_mono_float32(wav, what=what)
    seconds = wav.size / float(sr)
    if seconds < MIN_PROMPT_SECONDS:
        raise PromptAudioError(f"{what} is {seconds:.2f} s long; at least {MIN_PROMPT_SECONDS:g} s "
                               "of speech is needed to copy a voice")
    if seconds > MAX_PROMPT_SECONDS:
        raise PromptAudioError(f"{what} is {seconds:.1f} s long; at most {MAX_PROMPT_SECONDS:g} s "
                               "(cut it to a few sentences and give their transcript)")
    if float(np.max(np.abs(wav))) < 1e-4:
        raise PromptAudioError(f"{what} is silent")
    return wav


def audio_key(wav: np.ndarray, sr: int, prompt_text: str) -> str:
    """Cache key of a cloning prompt: what was said and how it sounds, not the file name."""
    h = hashlib.sha256()
    h.update(str(int(sr)).encode())
    h.update(np.ascontiguousarray(wav, dtype=np.float32).tobytes())
    h.update(prompt_text.encode("utf-8"))
    return "wav:" + h.hexdigest()[:32]


def compute_features(key: str, wav: np.ndarray, sr: int, prompt_text: str, prompt_speaker: str,
                     tokenizer: PromptTokenizer, frontend: PromptFrontend) -> SpeakerFeatures:
    """Run the three extractors on one prompt (the reference's ``preprocess_prompt_wav``)."""
    from stepaudio.audio import resample

    wav = check_prompt_audio(wav, sr)
    ids = [int(i) for i in tokenizer.tokenize(wav, sr, trim=True).ids]
    codes = [i - AUDIO_TOKEN_OFFSET for i in ids]
    if not codes or min(codes) < 0 or max(codes) >= FLOW_VOCAB:
        raise PromptAudioError("speaker prompt: the audio tokenizer returned no usable tokens")
    wav22 = resample(wav, sr, frontend.sample_rate)
    wav16 = resample(wav, sr, 16000)
    feat = frontend.speech_feat(wav22).float()
    emb = frontend.embedding(wav16).float()
    return SpeakerFeatures(
        key=key,
        prompt_text=prompt_text,
        prompt_speaker=prompt_speaker,
        prompt_code=tuple(ids),
        prompt_token=torch.tensor([codes], dtype=torch.long),
        prompt_feat=feat,
        embedding=emb,
        seconds=wav.size / float(sr),
    )


class SpeakerCache:
    """Thread-safe LRU of :class:`SpeakerFeatures`; a miss computes outside the lock, so a slow
    new voice never blocks replies in voices already cached."""

    def __init__(self, max_entries: int = 32) -> None:
        self.max_entries = max(1, int(max_entries))
        self._items: OrderedDict[str, SpeakerFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str, compute: Callable[[], SpeakerFeatures]) -> SpeakerFeatures:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
                self.hits += 1
                return item
            self.misses += 1
        item = compute()
        with self._lock:
            self._items[key] = item
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        return item

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items
