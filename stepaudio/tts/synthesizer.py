"""Streaming speech synthesis: reply text (whole, or deltas as the LLM writes them) → 22.05 kHz
float32 PCM chunks, cancellable between chunks.

Shape of one reply (a :class:`SpeechStream`)::

    text deltas → ClauseSplitter → clause → TTS-3B (engine) → <audio_N> ids → flow tokens
        → streaming token → wav (stream_modes: CosyVoice's recipe or the low-latency windows;
          flow, HiFT) → AudioChunk, AudioChunk, …

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
from dataclasses import dataclass, field, replace
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
from stepaudio.tts.stream_modes import Token2WavStream, open_token2wav, resolve_mode, window_shapes
from stepaudio.tts.streaming import ChunkStats, StreamOptions
from stepaudio.tts.streaming_cosyvoice import CosyVoiceStreamOptions
from stepaudio.tts.text import ClauseSplitter
from stepaudio.tts.vocoder_batch import BatchRunner
from stepaudio.tts.vocoder_scheduler import ChunkCancelled, RoundStats, VocoderScheduler

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
    #: perf_counter times: the first clause's TTS-3B request, and the first chunk handed out (so
    #: "request to first audio" is what the speech side alone costs a reply).
    first_request_at: float | None = None
    first_chunk_at: float | None = None
    audio_s: float = 0.0
    chunks: list[ChunkStats] = field(default_factory=list)
    cancelled: bool = False


@dataclass(frozen=True)
class SynthOptions:
    """Per-synthesizer settings. ``streaming``: ``cosyvoice``, ``low-latency`` or ``auto``
    (see :mod:`stepaudio.tts.stream_modes`); ``stream`` and ``cosyvoice`` are the two modes'
    chunking."""

    streaming: str = "auto"
    stream: StreamOptions = field(default_factory=StreamOptions)
    cosyvoice: CosyVoiceStreamOptions = field(default_factory=CosyVoiceStreamOptions)
    #: Chunking when batched (a GPU serving many sessions): a 0.37 s first chunk, so the second
    #: arrives before it has played even behind a whole round of other sessions' work, and
    #: 2.2 s steady chunks (half the flow windows per second of speech).
    batched_stream: StreamOptions = field(
        default_factory=lambda: StreamOptions(first_frames=32, max_hop_frames=192))
    #: A later clause starts with a full hop only when the listener has this much audio ahead.
    full_hop_lead_s: float = 2.0
    first_min_chars: int = 4
    soft_min_chars: int = 24
    max_clause_chars: int = 160
    speaker_cache_size: int = 32
    #: On CUDA: replay captured graphs for the flow's standard windows and HiFT (see cuda_graphs).
    cuda_graphs: bool = True
    #: Run every stream's flow and HiFT work through one scheduler that batches it across
    #: streams, deadline first (:mod:`~stepaudio.tts.vocoder_scheduler`). None: on CUDA only,
    #: where a flow call costs about the same for one window as for many.
    batching: bool | None = None
    #: Batched: at most this many windows in one flow or HiFT call (a longer call makes a new
    #: reply's first chunk wait longer behind it).
    max_batch_rows: int = 16
    #: Speech tokens a clause may take, in place of the reference's ceiling (the random-weight
    #: profile, whose TTS-3B never ends a clause by itself, sets what a real voice would take).
    clause_tokens: Callable[[str], int] | None = None


_END = object()

#: HiFT windows at least this long get a captured graph of their own length when batching on
#: CUDA (shorter ones, a clause of a syllable or two, run eagerly).
MIN_GRAPHED_HIFT_FRAMES = 8


def model_frames_per_token(flow: Any) -> float:
    """Mel frames per flow token, as the flow's own length rule computes them."""
    conf = flow.mel_feat_conf
    return float(conf["sampling_rate"]) / float(conf["hop_size"]) / flow.input_frame_rate


def later_clause_options(opts: StreamOptions, lead_s: float | None = None,
                         full_hop_lead_s: float = 0.0) -> StreamOptions:
    """Chunking of a reply's second and later clauses: their first chunk is a full hop (fewer,
    longer chunks) when the listener has at least ``full_hop_lead_s`` of the earlier clauses'
    audio still to play (``lead_s``); with less, a normal hop, then growing as usual. Measured on
    an H200 at 16-24 sessions: after a one-second first clause, a full-hop first chunk (about
    60 speech tokens before any audio) came 40-1300 ms late in 17-26 % of replies."""
    if lead_s is not None and lead_s < full_hop_lead_s:
        return replace(opts, first_frames=max(opts.first_frames, opts.hop_frames))
    return replace(opts, first_frames=max(opts.first_frames, opts.max_hop_frames))


@dataclass
class _Clause:
    """One clause of a reply between its TTS-3B request and its last chunk."""

    index: int
    text: str
    folder: str
    feats: SpeakerFeatures
    model: Any
    st: Token2WavStream
    generating: bool = True  # speech tokens are still coming
    wake: asyncio.Event = field(default_factory=asyncio.Event)  # tokens came, or the end


class Synthesizer:
    """Shared by every reply: the TTS-3B engine, the vocoder folders, voices and their features.

    ``cosyvoice(folder)`` and ``tokenizer()`` are factories so folders and the audio tokenizer are
    loaded on first use (the music folder only if a reply raps or hums; the tokenizer only when a
    voice is first described).
    """

    def __init__(self, engine: Engine, cosyvoice: Callable[[str], Any],
                 speakers: SpeakerRegistry, tokenizer: Callable[[], Any] | None = None,
                 options: SynthOptions | None = None, owns_engine: bool = False,
                 model_root: Path | None = None) -> None:
        self.engine = engine
        self.owns_engine = owns_engine  # close it with the synthesizer (we built it)
        self.speakers = speakers
        self.options = options or SynthOptions()
        self.streaming = resolve_mode(self.options.streaming, model_root)
        self._make_cosyvoice = cosyvoice
        self._make_tokenizer = tokenizer
        self._models: dict[str, Any] = {}
        self._graphs: dict[str, tuple[Any, Any, Any]] = {}
        self._warmed: set[tuple[str, int]] = set()
        self._tokenizer: Any = None
        self._load_lock = threading.Lock()
        self.cache = SpeakerCache(self.options.speaker_cache_size)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepaudio-tts")
        self._scheduler: VocoderScheduler | None = None
        self._runners: dict[str, BatchRunner] = {}
        #: Called with each batched round's stats (metrics); set by whoever owns the synthesizer.
        self.on_round: Callable[[RoundStats], None] | None = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_model_root(cls, root: str | Path, *, device: str = "cpu", lm_dtype: str = "float32",
                        flow_dtype: torch.dtype | None = None, engine: Engine | None = None,
                        speakers_dir: str | Path | None = None,
                        options: SynthOptions | None = None,
                        engine_options: dict[str, Any] | None = None) -> Synthesizer:
        """Everything from a model root (real or tiny): TTS-3B in process unless ``engine`` is
        given (``engine_options``: the in-process engine's keyword arguments), both vocoder
        folders, the root's speakers (else the packaged ones)."""
        from stepaudio.models import model_paths
        from stepaudio.tts.cosyvoice import CosyVoice
        from stepaudio.tts.prompt import default_speakers_dir

        paths = model_paths(root)
        owns = engine is None
        if engine is None:
            from stepaudio.llm.engine_transformers import TransformersEngine

            engine = TransformersEngine.from_pretrained(paths.tts, device=device, dtype=lm_dtype,
                                                        **(engine_options or {}))
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
                   options, owns_engine=owns, model_root=Path(root))

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
            flow_frames, hift_frames, _ = self.window_shapes(model)
            solver.warm(prompt, flow_frames)
            decode.warm(hift_frames)
            self._warmed.add((folder, prompt))
        return solver, decode, encode

    @property
    def batching(self) -> bool:
        """Whether chunks go through the cross-stream scheduler (see ``SynthOptions.batching``)."""
        if self.options.batching is not None:
            return self.options.batching
        device = getattr(self.cosyvoice(VOCODER_FOLDER), "device", torch.device("cpu"))
        return torch.device(device).type == "cuda"

    @property
    def scheduler(self) -> VocoderScheduler:
        with self._load_lock:
            if self._scheduler is None:
                device = getattr(self._models.get(VOCODER_FOLDER), "device", None)
                self._scheduler = VocoderScheduler(self.options.max_batch_rows,
                                                   on_round=self._round_done, device=device)
            return self._scheduler

    def _round_done(self, stats: RoundStats) -> None:
        if self.on_round is not None:
            self.on_round(stats)

    def stream_options(self) -> StreamOptions:
        """How a clause is chunked: ``batched_stream`` when batching, else ``stream``."""
        return self.options.batched_stream if self.batching else self.options.stream

    def runner(self, folder: str) -> BatchRunner:
        """The batch runner of one vocoder folder (CUDA graphs per batch shape on a GPU)."""
        with self._load_lock:
            runner = self._runners.get(folder)
        if runner is not None:
            return runner
        model = self.cosyvoice(folder)
        runner = BatchRunner(model.flow, model.hift, self.options.stream.n_timesteps)
        if self.options.cuda_graphs and torch.device(model.device).type == "cuda":
            from stepaudio.tts.cuda_graphs import (
                GraphedBatchDecode,
                GraphedBatchEncoder,
                GraphedBatchSolver,
            )

            rows = self.options.max_batch_rows
            runner.solver = GraphedBatchSolver(runner, rows)
            runner.decoder = GraphedBatchDecode(model.hift, rows)
            runner.encoder = GraphedBatchEncoder(runner, rows)
        with self._load_lock:
            return self._runners.setdefault(folder, runner)

    def warm_batched(self, folder: str, feats: SpeakerFeatures) -> int:
        """Capture the batched graphs a voice's windows need (on the vocoder thread, before its
        first reply): the masked flow graph of every row bucket and every length bucket its
        windows fall in (an unpadded batch replays the masked graph of its bucket too: with the
        fused masked GroupNorm it costs the same, and one set of graphs is half the start-up),
        and HiFT's for the standard windows. Returns how many were captured (0 off CUDA)."""
        runner = self.runner(folder)
        prompt = int(feats.prompt_feat.shape[1])
        if (folder, prompt) in self._warmed or not hasattr(runner.solver, "warm"):
            return 0
        flow_frames, hift_frames, most = self.window_shapes(self.cosyvoice(folder))
        top = self.options.max_batch_rows
        rows = [1 << i for i in range(top.bit_length()) if 1 << i <= top]
        padded = {runner.bucket(prompt + n) for n in range(1, max(flow_frames) + 1)}
        solver, decoder = runner.solver, runner.decoder
        n = solver.warm(rows, padded, padded=True)  # type: ignore[attr-defined]
        n += decoder.warm(rows, set(hift_frames))  # type: ignore[attr-defined]
        # a clause's last window is as long as what is left of it: one-row graphs for each length
        n += decoder.warm_lengths(  # type: ignore[attr-defined]
            range(MIN_GRAPHED_HIFT_FRAMES, max(hift_frames) + 1))
        tokens = int(feats.prompt_token.shape[1])
        n += runner.encoder.warm(rows, range(tokens + 1, tokens + most + 1))  # type: ignore[attr-defined]
        self._warmed.add((folder, prompt))
        log.info("tts: %d batched vocoder graphs captured for a %d-frame prompt", n, prompt)
        return n

    def window_shapes(self, model: Any) -> tuple[list[int], list[int], int]:
        """(flow target frames, HiFT frames, most target tokens a window encodes) of this
        synthesizer's streaming windows, first and later clauses' (:func:`later_clause_options`)."""
        opt = self.stream_options()
        later = (later_clause_options(opt), later_clause_options(opt, 0.0, 1.0))
        return window_shapes(self.streaming, model, low_latency=(opt, *later),
                             cosyvoice=self.options.cosyvoice)

    def prepare(self, folder: str, feats: SpeakerFeatures) -> tuple[Any, Any, Any]:
        """Whatever a stream on ``folder`` in this voice needs before its first chunk (call on
        the model thread): batched, the scheduler's graphs; alone, the stream's own callables."""
        if self.batching:
            if folder == VOCODER_FOLDER:  # others (the music vocoder) capture on first use
                self.warm_batched(folder, feats)
            return None, None, None
        return self.accelerators(folder, feats)

    async def warm(self, voice: Voice, text: str = "") -> None:
        """Describe a voice and capture its graphs ahead of the first reply (server start-up)."""
        feats = await asyncio.to_thread(self.features, voice, text)
        await self.run_model(lambda: self.prepare(vocoder_folder(text), feats))

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
        """Run flow/HiFT work on the model thread (the scheduler's, when batching)."""
        if self.batching:
            return await asyncio.wrap_future(self.scheduler.call(fn))
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def vocode(self, st: Token2WavStream, folder: str, *, deadline: float, first: bool,
                     cancelled: Callable[[], bool],
                     then: Callable[[np.ndarray], None] | None = None) -> np.ndarray:
        """The stream's next chunk: batched with other streams' through the scheduler, or
        alone on the model thread. Raises CancelledError if the stream was cancelled first.
        ``then``: see :meth:`VocoderScheduler.submit` (batched only)."""
        if not self.batching:
            return await self.run_model(st.next_chunk)
        return await self.chunk_result(self.submit_chunk(st, folder, deadline=deadline,
                                                         first=first, cancelled=cancelled,
                                                         then=then))

    def submit_chunk(self, st: Token2WavStream, folder: str, *, deadline: float, first: bool,
                     cancelled: Callable[[], bool],
                     then: Callable[[np.ndarray], None] | None = None
                     ) -> concurrent.futures.Future[np.ndarray]:
        """Queue the stream's next chunk with the scheduler (any thread)."""
        return self.scheduler.submit(self.runner(folder), st.chunk_work(), deadline=deadline,
                                     first=first, cancelled=cancelled, then=then)

    @staticmethod
    async def chunk_result(fut: concurrent.futures.Future[np.ndarray]) -> np.ndarray:
        try:
            return await asyncio.wrap_future(fut)
        except ChunkCancelled:
            raise asyncio.CancelledError from None

    async def aclose(self) -> None:
        """Stop the model threads; close the TTS engine only if this synthesizer built it."""
        await asyncio.to_thread(self._executor.shutdown, True, cancel_futures=True)
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.close)
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
        #: When the first chunk went out: the listener's playback clock, from which each later
        #: chunk's deadline (the moment their audio would run out) follows.
        self._play_start: float | None = None
        #: The next chunk, already queued on the vocoder thread by the one before it.
        self._ahead: tuple[Token2WavStream, concurrent.futures.Future[np.ndarray]] | None = None
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
        """Clauses in order, the next one's speech tokens written while earlier ones are still
        vocoded, so a clause boundary costs no TTS-3B prefill and no first tokens on the
        listener's clock."""
        queue: asyncio.Queue[_Clause | None] = asyncio.Queue()
        speaker = asyncio.get_running_loop().create_task(self._speak_all(queue))
        previous: _Clause | None = None
        try:
            index = 0
            while not speaker.done():  # a failed vocoder ends the reply: no more clauses
                clause = await self._clauses.get()
                if clause is None:
                    break
                job = await self._prepare(index, clause, previous)
                previous = job
                queue.put_nowait(job)
                await self._generate(job)
                index += 1
            queue.put_nowait(None)
            await speaker
        except asyncio.CancelledError:
            pass
        except StepAudioError as err:
            self._out.put_nowait(err)
            return
        except Exception as err:  # a bug must end this reply, never the server
            log.exception("tts stream failed")
            self._out.put_nowait(StepAudioError(f"speech synthesis failed: {type(err).__name__}: {err}"))
            return
        finally:
            if not speaker.done():
                speaker.cancel()
                with contextlib.suppress(BaseException):
                    await speaker
        self._out.put_nowait(_END)

    def _lead_s(self, previous: _Clause | None) -> float:
        """Seconds of speech the listener has ahead of now: sent and not yet played, plus the
        frames the clause before has tokens for but are not vocoded yet (all its tokens are
        there when the next clause starts)."""
        now = time.perf_counter()
        sent = 0.0 if self._play_start is None else self._play_start + self.report.audio_s - now
        if previous is None:
            return max(0.0, sent)
        st = previous.st
        frame_s = st.hift.samples_per_frame() / float(st.hift.sampling_rate)
        return max(0.0, sent) + max(0, st.total_frames - st.committed_frames) * frame_s

    async def _prepare(self, index: int, clause: str, previous: _Clause | None = None
                       ) -> _Clause:
        """Voice features, vocoder folder and the clause's token-to-wav stream."""
        synth = self.synth
        self.report.clauses.append(clause)
        feats = await asyncio.to_thread(synth.features, self.voice, clause)
        folder = vocoder_folder(clause)
        model = await asyncio.to_thread(synth.cosyvoice, folder)
        solver, decode, encode = await synth.run_model(lambda: synth.prepare(folder, feats))
        opts = synth.stream_options()
        if index > 0:  # the listener already has audio: later clauses start with a full hop
            opts = later_clause_options(opts, self._lead_s(previous),
                                        synth.options.full_hop_lead_s)
        st = open_token2wav(synth.streaming, model, feats, low_latency=opts,
                            cosyvoice=synth.options.cosyvoice, seed=self.seed + index,
                            solver=solver, decode=decode, encode=encode)
        return _Clause(index, clause, folder, feats, model, st)

    async def _generate(self, job: _Clause) -> None:
        """TTS-3B for one clause: its speech tokens go into the clause's stream as they come."""
        synth, report = self.synth, self.report
        engine, index, clause = synth.engine, job.index, job.text
        prompt = build_tts_prompt_ids(engine.tokenizer, clause, job.feats.prompt_text,
                                      job.feats.prompt_speaker, job.feats.prompt_code)
        limit = max_new_tokens_for(clause, job.model.config.input_frame_rate, len(prompt),
                                   engine.max_model_len, music=is_music(clause))
        planned = synth.options.clause_tokens is not None
        if planned:
            limit = min(limit, synth.options.clause_tokens(clause))
        if limit <= 1:
            raise TTSPromptError(f"clause too long for the TTS context ({len(prompt)} tokens)")
        params = tts_sampling_params(limit, seed=self.seed + index,
                                     repetition_rule=getattr(engine, "repetition_rule", True))
        filt = AudioTokenFilter()
        if report.first_request_at is None:
            report.first_request_at = time.perf_counter()
        try:
            gen = engine.generate(prompt, params)
        except EngineError as err:
            raise SynthesisError(f"TTS-3B refused clause {index}: {err}") from None
        try:
            async for delta in gen:
                job.st.push(filt(delta.token_ids))
                job.wake.set()
            if gen.finish_reason is FinishReason.LENGTH and not planned:
                report.warnings.append(f"clause {index} reached its {limit}-token cap without "
                                       "<|EOT|>")
            report.finish_reasons.append(gen.finish_reason.value if gen.finish_reason else "?")
        except EngineError as err:
            raise SynthesisError(f"TTS-3B failed on clause {index}: {err}") from None
        finally:
            await gen.aclose()
            job.st.finish()
            job.generating = False
            job.wake.set()
            report.flow_tokens += filt.kept
            report.skipped_ids += filt.skipped
            if filt.skipped:
                log.info("tts: clause %d: %d non-audio ids skipped (e.g. %s)", index, filt.skipped,
                         filt.skipped_ids[:4])

    async def _speak_all(self, queue: asyncio.Queue[_Clause | None]) -> None:
        """Vocode the clauses in order, each chunk as soon as its tokens are there."""
        while (job := await queue.get()) is not None:
            sr = int(job.model.sample_rate)
            while True:
                job.wake.clear()
                if job.st.ready():
                    self._emit(await self._chunk(job.st, job.folder), sr, job.index, job.text)
                elif job.generating:
                    await job.wake.wait()
                else:
                    break

    async def _chunk(self, st: Token2WavStream, folder: str) -> np.ndarray:
        if self._cancel.is_set():
            raise asyncio.CancelledError
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] is st:  # already queued by the chunk before it
            wav = await self.synth.chunk_result(ahead[1])
        else:
            first = self._play_start is None
            deadline = time.perf_counter() if first else self._play_start + self.report.audio_s
            wav = await self.synth.vocode(st, folder, deadline=deadline, first=first,
                                          cancelled=self._cancel.is_set,
                                          then=lambda pcm: self._queue_next(st, folder, pcm))
        self.report.chunks.append(st.stats[-1])
        if self._cancel.is_set():
            raise asyncio.CancelledError
        return wav

    def _queue_next(self, st: Token2WavStream, folder: str, pcm: np.ndarray) -> None:
        """On the vocoder thread, as a chunk is done: if the stream's next chunk has its tokens,
        queue it now for the next round (its deadline: when the audio so far runs out)."""
        if self._cancel.is_set() or not st.ready():
            return
        start = self._play_start or time.perf_counter()
        deadline = start + self.report.audio_s + len(pcm) / float(st.hift.sampling_rate)
        fut = self.synth.submit_chunk(st, folder, deadline=deadline, first=False,
                                      cancelled=self._cancel.is_set,
                                      then=lambda nxt: self._queue_next(st, folder, nxt))
        self._ahead = (st, fut)

    def _emit(self, pcm: np.ndarray, sr: int, index: int, clause: str) -> None:
        if pcm.size == 0:
            return
        chunk = AudioChunk(pcm, sr, index, clause)
        if self._play_start is None:
            self._play_start = self.report.first_chunk_at = time.perf_counter()
            self.report.first_chunk_s = self._play_start - self._started
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
