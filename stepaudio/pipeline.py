"""Offline glue between the stages: speak a reply text into a wav file.

Used by ``stepaudio tts`` and by ``stepaudio chat -o`` (which can pass the chat LLM's text deltas
straight in, so speech synthesis starts with the reply's first clause). The file is written chunk
by chunk as the synthesizer streams, into a temporary sibling that is renamed at the end: a failed
or interrupted run never leaves a truncated wav under the requested name.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stepaudio.errors import AudioError, StepAudioError
from stepaudio.tts.prompt import TTSPromptError
from stepaudio.tts.synthesizer import SynthesisReport, Synthesizer, Voice

DEFAULT_SPEAKER = "Tingting"


@dataclass(frozen=True)
class SpeakResult:
    path: Path
    seconds: float
    sample_rate: int
    wall_s: float
    report: SynthesisReport


def load_synthesizer(models: str | os.PathLike[str], *, device: str = "cpu",
                     lm_dtype: str | None = None) -> Synthesizer:
    """The TTS stage of a model root (real or tiny), in process on ``device``."""
    root = Path(models)
    if not root.is_dir():
        raise StepAudioError(f"{root}: model root not found")
    dtype = lm_dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return Synthesizer.from_model_root(root, device=device, lm_dtype=dtype)


def make_voice(synth: Synthesizer, speaker: str | None = None, prompt_wav: str | None = None,
               prompt_text: str | None = None) -> Voice:
    """A named speaker (default Tingting) or a clone from a prompt wav file and its transcript."""
    if prompt_wav and speaker:
        raise TTSPromptError("give a speaker or a prompt wav to clone, not both")
    if prompt_wav:
        from stepaudio.audio import load_audio

        wav, sr = load_audio(prompt_wav)
        return synth.voice(prompt_wav=wav, prompt_sr=sr, prompt_text=prompt_text)
    if prompt_text:
        raise TTSPromptError("--prompt-text is only used with --prompt-wav")
    return synth.voice(speaker or DEFAULT_SPEAKER)


async def speak_reply(synth: Synthesizer, text: str | AsyncIterable[str],
                      out: str | os.PathLike[str], voice: Voice, seed: int | None = None
                      ) -> SpeakResult:
    """Synthesise ``text`` (a string, or text deltas as an LLM writes them) into ``out``.

    Raises :class:`TTSPromptError` when there is nothing to speak (no file is written).
    """
    import soundfile as sf

    out = Path(out)
    if out.is_dir():
        raise AudioError(f"{out}: is a folder, expected a .wav file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    start = time.perf_counter()
    stream = synth.open(voice, seed)
    samples = 0
    sr = 0
    feeder = None
    try:
        if isinstance(text, str):
            stream.push_text(text)
            stream.end_text()
        else:
            import asyncio

            async def feed() -> None:
                try:
                    async for delta in text:  # type: ignore[union-attr]
                        stream.push_text(delta)
                finally:  # a failing source still ends the stream (its error is re-raised)
                    stream.end_text()

            feeder = asyncio.ensure_future(feed())
        writer = None
        try:
            async for chunk in stream:
                if writer is None:
                    sr = chunk.sample_rate
                    writer = sf.SoundFile(str(tmp), "w", samplerate=sr, channels=1,
                                          subtype="PCM_16", format="WAV")
                writer.write(np.asarray(chunk.pcm, dtype=np.float32))
                samples += len(chunk.pcm)
        finally:
            if writer is not None:
                writer.close()
        if feeder is not None:
            await feeder
        if not stream.report.clauses or samples == 0:
            raise TTSPromptError("nothing to synthesise: the text has no words to speak")
        os.replace(tmp, out)
    finally:
        if feeder is not None and not feeder.done():
            feeder.cancel()
        await stream.aclose()
        if tmp.exists():
            tmp.unlink()
    return SpeakResult(out, samples / float(sr), sr, time.perf_counter() - start, stream.report)


def speak_to_wav(models: str | os.PathLike[str], text: str, out: str | os.PathLike[str], *,
                 speaker: str | None = None, prompt_wav: str | None = None,
                 prompt_text: str | None = None, seed: int | None = None, device: str = "cpu"
                 ) -> SpeakResult:
    """One-shot: load the TTS stage of ``models``, speak ``text`` into ``out``, unload."""
    import asyncio

    if not text or not text.strip():
        raise TTSPromptError("nothing to synthesise: the text is empty")

    async def run() -> SpeakResult:
        synth = load_synthesizer(models, device=device)
        try:
            voice = make_voice(synth, speaker, prompt_wav, prompt_text)
            return await speak_reply(synth, text, out, voice, seed)
        finally:
            await synth.aclose()

    return asyncio.run(run())
