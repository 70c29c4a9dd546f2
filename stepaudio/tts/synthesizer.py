"""Streaming speech synthesis: reply text (whole, or deltas as the LLM writes them) → 22.05 kHz
float32 PCM chunks, cancellable between chunks.

Shape of one reply (a :class:`SpeechStream`)::

    text deltas → ClauseSplitter → clause → TTS-3B (engine) → <audio_N> ids → flow tokens
        → StreamingToken2Wav (flow windows, HiFT) → AudioChunk, AudioChunk, …

Clauses are spoken one after another, each its own TTS-3B request, so the first clause's audio
starts while the LLM is still writing the second. Heavy work runs off the event loop: TTS-3B in
its engine's worker, flow and HiFT in one model thread shared by all streams of a synthesizer
(one model, one device: running two chunks at once would only make both late). A cancelled stream
computes no further chunk: the flag is checked before every chunk, the TTS request is cancelled,
and a chunk already being computed is dropped.

Usage (server)::

    stream = synth.open(synth.voice("Tingting"))
    for delta in llm_deltas: stream.push_text(delta)
    stream.end_text()
    async for chunk in stream: send(chunk.pcm)        # or stream.cancel() on barge-in
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepaudio.errors import StepAudioError
from stepaudio.llm.engine import Engine, EngineError, FinishReason
from stepaudio.tts.prompt import (
    VOCODER_FOLDER,
    SpeakerRegistry,
    TTSPromptError,
    UnknownSpeakerError,
    build_tts_prompt_ids,
    is_music,
    speaker_entry_id,
    vocoder_folder,
)
from stepaudio.tts.sampling import AudioTokenFilter, max_new_tokens_for, tts_sampling_params
from stepaudio.tts.speakers import (
    SpeakerCache,
    SpeakerFeatures,
    audio_key,
    check_prompt_audio,
    compute_features,
)
from stepaudio.tts.streaming import ChunkStats, StreamingToken2Wav, StreamOptions
from stepaudio.tts.text import ClauseSplitter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Voice:
    """Who speaks: a registered speaker id, or a clone from a prompt wav and its transcript."""

    speaker: str | None = None
    prompt_wav: np.ndarray | None = field(default=None, repr=False, compare=False)
    prompt_sr: int = 0
    prompt_text: str = ""
    key: str = ""

    @property
    def is_clone(self) -> bool:
        return self.prompt_wav is not None


class SynthesisError(StepAudioError):
    """Speech for a reply could not be produced (the TTS engine failed); ends that reply only."""


@dataclass(frozen=True)
class AudioChunk:
    """PCM for playback, in order; ``clause``/``text`` say which clause it speaks (captions)."""

    pcm: np.ndarray
    sample_rate: int
    clause: int
    text: str

    @property
    def seconds(self) -> float:
        return len(self.pcm) / float(self.sample_rate)


@dataclass
class SynthesisReport:
    """What a stream did, for logs, tests and benchmarks."""

    clauses: list[str] = field(default_factory=list)
    flow_tokens: int = 0
    skipped_ids: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    first_chunk_s: float | None = None
    audio_s: float = 0.0
    chunks: list[ChunkStats] = field(default_factory=list)
    cancelled: bool = False


@dataclass(frozen=True)
class SynthOptions:
    """Per-synthesizer settings (see :class:`StreamOptions` for the chunking)."""

    stream: StreamOptions = field(default_factory=StreamOptions)
    first_min_chars: int = 4
    soft_min_chars: int = 24
    max_clause_chars: int = 160
    speaker_cache_size: int = 32
    #: On CUDA: replay captured graphs for the flow's standard windows and HiFT (see cuda_graphs).
    cuda_graphs: bool = True


_END = object()


class Synthesizer:
    """Shared by every reply: the TTS-3B engine, the vocoder folders, voices and their features.

    ``cosyvoice(folder)`` and ``tokenizer()`` are factories so folders and the audio tokenizer are
    loaded on first use (the music folder only if a reply raps or hums; the tokenizer only when a
    voice is first described).
    """

    def __init__(self, engine: Engine, cosyvoice: Callable[[str], Any],
                 speakers: SpeakerRegistry, tokenizer: Callable[[], Any] | None = None,
                 options: SynthOptions | None = None, owns_engine: bool = False) -> None:
        self.engine = engine
        self.owns_engine = owns_engine  # close it with the synthesizer (we built it)
        self.speakers = speakers
        self.options = options or SynthOptions()
        self._make_cosyvoice = cosyvoice
        self._make_tokenizer = tokenizer
        self._models: dict[str, Any] = {}
        self._graphs: dict[str, tuple[Any, Any, Any]] = {}
        self._warmed: set[tuple[str, int]] = set()
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self.cache = SpeakerCache(self.options.speaker_cache_size)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepaudio-tts")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_model_root(cls, root: str | Path, *, device: str = "cpu", lm_dtype: str = "float32",
                        flow_dtype: torch.dtype | None = None, engine: Engine | None = None,
                        speakers_dir: str | Path | None = None,
                        options: SynthOptions | None = None) -> Synthesizer:
        """Everything from a model root (real or tiny): TTS-3B in process unless ``engine`` is
        given, both vocoder folders, the root's speakers (else the packaged ones)."""
        from stepaudio.models import model_paths
        from stepaudio.tts.cosyvoice import CosyVoice
        from stepaudio.tts.prompt import default_speakers_dir

        paths = model_paths(root)
        owns = engine is None
        if engine is None:
            from stepaudio.llm.engine_transformers import TransformersEngine

            engine = TransformersEngine.from_pretrained(paths.tts, device=device, dtype=lm_dtype)
        if flow_dtype is None:
            flow_dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        folder = Path(speakers_dir) if speakers_dir else (
            paths.speakers if (paths.speakers / "speakers_info.json").is_file()
            else default_speakers_dir())

        def load_cosyvoice(name: str) -> CosyVoice:
            return CosyVoice(paths.tts / name, flow_dtype=flow_dtype, device=device)

        def load_tokenizer() -> Any:
            from stepaudio.tokenizer import StepAudioTokenizer

            return StepAudioTokenizer(paths.tokenizer)

        return cls(engine, load_cosyvoice, SpeakerRegistry.from_dir(folder), load_tokenizer,
                   options, owns_engine=owns)

    def cosyvoice(self, folder: str) -> Any:
        with self._load_lock:
            if folder not in self._models:
                self._models[folder] = self._make_cosyvoice(folder)
            return self._models[folder]

    def accelerators(self, folder: str, feats: SpeakerFeatures) -> tuple[Any, Any, Any]:
        """(solver, decode, encode) for a stream on ``folder``: CUDA graphs warmed for this
        prompt length, or Nones for the eager path. Call on the model thread (captures must not
        race other work on the device)."""
        model = self.cosyvoice(folder)
        if not self.options.cuda_graphs or getattr(model, "device", torch.device("cpu")).type != "cuda":
            return None, None, None
        from stepaudio.tts.cuda_graphs import GraphedDecode, GraphedEncoder, GraphedSolver

        if folder not in self._graphs:
            self._graphs[folder] = (GraphedSolver(model.flow, self.options.stream.n_timesteps),
                                    GraphedDecode(model.hift), GraphedEncoder(model.flow))
        solver, decode, encode = self._graphs[folder]
        prompt = int(feats.prompt_feat.shape[1])
        if (folder, prompt) not in self._warmed:
            shapes = self.options.stream.schedule()
            solver.warm(prompt, [f for f, _ in shapes] + [self.options.stream.window_frames])
            decode.warm(h for _, h in shapes)
            self._warmed.add((folder, prompt))
        return solver, decode, encode

    async def warm(self, voice: Voice, text: str = "") -> None:
        """Describe a voice and capture its graphs ahead of the first reply (server start-up)."""
        feats = await asyncio.to_thread(self.features, voice, text)
        await self.run_model(lambda: self.accelerators(vocoder_folder(text), feats))

    def tokenizer(self) -> Any:
        with self._load_lock:
            if self._tokenizer is None:
                if self._make_tokenizer is None:
                    raise StepAudioError("this synthesizer has no audio tokenizer for new voices")
                self._tokenizer = self._make_tokenizer()
            return self._tokenizer

    @property
    def sample_rate(self) -> int:
        return int(self.cosyvoice(VOCODER_FOLDER).sample_rate)

    # -- voices --------------------------------------------------------------------------------
    def voice(self, speaker: str | None = None, *, prompt_wav: np.ndarray | None = None,
              prompt_sr: int = 0, prompt_text: str | None = None) -> Voice:
        """Check a voice request now, so a bad one fails before any reply is spoken."""
        if prompt_wav is not None:
            if not prompt_text or not prompt_text.strip():
                raise TTSPromptError("cloning needs the transcript of the prompt wav (prompt text)")
            wav = check_prompt_audio(prompt_wav, prompt_sr)
            return Voice(None, wav, int(prompt_sr), prompt_text.strip(),
                         audio_key(wav, prompt_sr, prompt_text.strip()))
        if speaker is None:
            raise TTSPromptError("give a speaker id or a prompt wav with its transcript")
        self.speakers.get(speaker)  # UnknownSpeakerError names the known ones
        return Voice(speaker, key=f"speaker:{speaker}")

    def features(self, voice: Voice, text: str) -> SpeakerFeatures:
        """The (cached) prompt features that condition ``text`` in this voice."""
        if voice.is_clone:
            assert voice.prompt_wav is not None
            return self.cache.get(voice.key, lambda: compute_features(
                voice.key, voice.prompt_wav, voice.prompt_sr, voice.prompt_text, "",
                self.tokenizer(), self.cosyvoice(VOCODER_FOLDER)))
        assert voice.speaker is not None
        entry_id = speaker_entry_id(voice.speaker, text)
        if entry_id not in self.speakers:
            log.warning("tts: speaker %r has no %r entry; using its normal prompt", voice.speaker,
                        entry_id)
            entry_id = voice.speaker
        entry = self.speakers.get(entry_id)

        def compute() -> SpeakerFeatures:
            from stepaudio.audio import load_audio

            wav, sr = load_audio(entry.prompt_wav)
            return compute_features(f"speaker:{entry_id}", wav, sr, entry.prompt_text,
                                    voice.speaker or "", self.tokenizer(),
                                    self.cosyvoice(VOCODER_FOLDER))

        return self.cache.get(f"speaker:{entry_id}", compute)

    # -- streams -------------------------------------------------------------------------------
    def open(self, voice: Voice, seed: int | None = None) -> SpeechStream:
        """Start one reply's stream (call from the event loop that will read it)."""
        return SpeechStream(self, voice, seed)

    async def synthesize(self, text: str, voice: Voice, seed: int | None = None
                         ) -> tuple[np.ndarray, SynthesisReport]:
        """A whole text → one waveform (the same streaming path, chunks joined)."""
        stream = self.open(voice, seed)
        stream.push_text(text)
        stream.end_text()
        chunks = [c.pcm async for c in stream]
        if not stream.report.clauses:
            raise TTSPromptError("nothing to synthesise: the text has no words to speak")
        wav = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return wav, stream.report

    async def run_model(self, fn: Callable[[], Any]) -> Any:
        """Run flow/HiFT work on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def aclose(self) -> None:
        """Stop the model thread; close the TTS engine only if this synthesizer built it."""
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        if self.owns_engine:
            await self.engine.aclose()


class SpeechStream:
    """One reply: ``push_text``/``end_text`` in, :class:`AudioChunk` out by async iteration;
    ``cancel()`` (sync, idempotent) or ``aclose()`` (waits until nothing runs for it)."""

    def __init__(self, synth: Synthesizer, voice: Voice, seed: int | None) -> None:
        self.synth = synth
        self.voice = voice
        self.seed = int(seed) if seed is not None else secrets.randbits(31)
        opts = synth.options
        self._splitter = ClauseSplitter(opts.first_min_chars, opts.soft_min_chars,
                                        opts.max_clause_chars)
        self.report = SynthesisReport(warnings=self._splitter.warnings)
        self._clauses: asyncio.Queue[str | None] = asyncio.Queue()
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._cancel = threading.Event()
        self._ended = False
        self._started = time.perf_counter()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._finished = False

    # -- input ---------------------------------------------------------------------------------
    def push_text(self, delta: str) -> None:
        if self._ended:
            raise StepAudioError("push_text after end_text")
        for clause in self._splitter.feed(delta):
            self._clauses.put_nowait(clause)

    def end_text(self) -> None:
        if self._ended:
            return
        self._ended = True
        for clause in self._splitter.finish():
            self._clauses.put_nowait(clause)
        self._clauses.put_nowait(None)

    # -- control -------------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        if not self._cancel.is_set():
            self._cancel.set()
            self.report.cancelled = True
            self._task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, StepAudioError):
            pass
        self._finished = True

    # -- output --------------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[AudioChunk]:
        return self

    async def __anext__(self) -> AudioChunk:
        if self._finished or self._cancel.is_set():  # after a barge-in nothing more is played
            self._finished = True
            raise StopAsyncIteration
        try:
            item = await self._out.get()
        except asyncio.CancelledError:  # the reader was cancelled: so is its speech
            self.cancel()
            raise
        if item is _END or self._cancel.is_set():
            self._finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    def __del__(self) -> None:
        # An abandoned stream must not keep the TTS model and the vocoder busy.
        with contextlib.suppress(Exception):
            if not self._task.done():
                self._cancel.set()
                self._task.cancel()

    # -- work ----------------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            index = 0
            while True:
                clause = await self._clauses.get()
                if clause is None:
                    break
                await self._speak(index, clause)
                index += 1
        except asyncio.CancelledError:
            pass
        except StepAudioError as err:
            self._out.put_nowait(err)
            return
        except Exception as err:  # a bug must end this reply, never the server
            log.exception("tts stream failed")
            self._out.put_nowait(StepAudioError(f"speech synthesis failed: {type(err).__name__}: {err}"))
            return
        self._out.put_nowait(_END)

    async def _speak(self, index: int, clause: str) -> None:
        synth, report = self.synth, self.report
        report.clauses.append(clause)
        feats = await asyncio.to_thread(synth.features, self.voice, clause)
        folder = vocoder_folder(clause)
        model = await asyncio.to_thread(synth.cosyvoice, folder)
        solver, decode, encode = await synth.run_model(lambda: synth.accelerators(folder, feats))
        engine = synth.engine
        prompt = build_tts_prompt_ids(engine.tokenizer, clause, feats.prompt_text,
                                      feats.prompt_speaker, feats.prompt_code)
        limit = max_new_tokens_for(clause, model.config.input_frame_rate, len(prompt),
                                   engine.max_model_len, music=is_music(clause))
        if limit <= 1:
            raise TTSPromptError(f"clause too long for the TTS context ({len(prompt)} tokens)")
        params = tts_sampling_params(limit, seed=self.seed + index,
                                     repetition_rule=getattr(engine, "repetition_rule", True))
        st = StreamingToken2Wav(model, feats, synth.options.stream, seed=self.seed + index,
                                solver=solver, decode=decode, encode=encode)
        filt = AudioTokenFilter()
        sr = int(model.sample_rate)
        try:
            gen = engine.generate(prompt, params)
        except EngineError as err:
            raise SynthesisError(f"TTS-3B refused clause {index}: {err}") from None
        try:
            async for delta in gen:
                st.push(filt(delta.token_ids))
                while st.ready():
                    self._emit(await self._chunk(st), sr, index, clause)
            if gen.finish_reason is FinishReason.LENGTH:
                report.warnings.append(f"clause {index} reached its {limit}-token cap without "
                                       "<|EOT|>")
            report.finish_reasons.append(gen.finish_reason.value if gen.finish_reason else "?")
            st.finish()
            while st.ready():
                self._emit(await self._chunk(st), sr, index, clause)
        except EngineError as err:
            raise SynthesisError(f"TTS-3B failed on clause {index}: {err}") from None
        finally:
            await gen.aclose()
            report.flow_tokens += filt.kept
            report.skipped_ids += filt.skipped
            if filt.skipped:
                log.info("tts: clause %d: %d non-audio ids skipped (e.g. %s)", index, filt.skipped,
                         filt.skipped_ids[:4])

    async def _chunk(self, st: StreamingToken2Wav) -> np.ndarray:
        if self._cancel.is_set():
            raise asyncio.CancelledError
        wav = await self.synth.run_model(st.next_chunk)
        self.report.chunks.append(st.stats[-1])
        if self._cancel.is_set():
            raise asyncio.CancelledError
        return wav

    def _emit(self, pcm: np.ndarray, sr: int, index: int, clause: str) -> None:
        if pcm.size == 0:
            return
        chunk = AudioChunk(pcm, sr, index, clause)
        if self.report.first_chunk_s is None:
            self.report.first_chunk_s = time.perf_counter() - self._started
        self.report.audio_s += chunk.seconds
        self._out.put_nowait(chunk)


__all__ = [
    "AudioChunk",
    "SpeechStream",
    "SynthOptions",
    "SynthesisError",
    "SynthesisReport",
    "Synthesizer",
    "UnknownSpeakerError",
    "Voice",
]
