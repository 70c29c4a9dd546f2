"""Every model stage behind a narrow interface, off the event loop.

The session never touches a model: it talks to the four stages here, and each stage decides where
its work runs.

- :class:`InputPump` (VAD): one task for the whole server. Sessions hand it raw wire audio; each
  cycle takes what every session has, and in one hop to the pump thread resamples it to 16 kHz
  (once: the same 16 kHz audio feeds the VAD and the tokenizer) and runs Silero over all sessions in
  one batch per frame position. Cycles start when audio arrives (no fixed polling delay), so under
  load they simply grow larger batches.
- :class:`TokenizerStage`: streaming audio tokenizer jobs in a small thread pool (one job at a time
  per stream; a stream's order matters, different streams run side by side).
- :class:`ChatStage`: Step-Audio-Chat through the async engines (which run their own worker thread
  or a remote server); prompt fitting, which encodes text, runs in a thread as well.
- :class:`SpeechStage`: the streaming synthesizer (TTS-3B in its engine, flow/HiFT in its model
  thread), cancellable between chunks; reply audio is resampled and encoded for the wire in the
  encoder thread.

A stage can move to another process or machine by reimplementing its class; the session only sees
these methods. The benchmark instruments (``server/instruments/``) implement the same interfaces
with stand-ins, and the app picks them where it is built: nothing here imports them.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from server.metrics import Metrics
from server.protocol import AudioFormat, encode_audio
from stepaudio.audio import StreamingResampler
from stepaudio.llm.budget import fit_chat_prompt
from stepaudio.llm.engine import Engine, FinishReason, Generation, SamplingParams
from stepaudio.llm.prompt import build_asr_prompt
from stepaudio.vad import SAMPLE_RATE, SileroVAD, StreamingVAD, VADEvent, VADParams, run_batch

if TYPE_CHECKING:
    from stepaudio.config import Config

log = logging.getLogger(__name__)

SR16K = SAMPLE_RATE


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


# --------------------------------------------------------------------------------------------------
# VAD: the input pump


@dataclass
class PumpResult:
    """What one pump cycle made of a session's audio (all positions in ms of 16 kHz audio)."""

    audio16k: np.ndarray
    events: list[VADEvent]
    analysed_ms: float  # the VAD has decided up to here
    settled_ms: float  # no pending VAD transition reaches back before here
    speaking: bool


class PumpClient:
    """One session's side of the pump: raw audio waits here until the next cycle takes it."""

    def __init__(self, vad: StreamingVAD, deliver: Callable[[PumpResult], None]) -> None:
        self.vad = vad
        self.deliver = deliver
        self.pending: list[tuple[int, np.ndarray]] = []  # (wire rate, samples)
        self.pending_ms = 0.0
        self.in_flight_ms = 0.0
        self._resampler: StreamingResampler | None = None

    @property
    def backlog_ms(self) -> float:
        """Audio received but not yet through the VAD (what backpressure looks at)."""
        return self.pending_ms + self.in_flight_ms

    def take(self) -> list[tuple[int, np.ndarray]]:
        out, self.pending = self.pending, []
        self.in_flight_ms, self.pending_ms = self.pending_ms, 0.0
        return out

    def process(self, chunks: list[tuple[int, np.ndarray]]) -> np.ndarray:
        """Pump thread: resample this session's chunks to 16 kHz (the one resampling) and queue
        them in its VAD; returns the 16 kHz audio for the tokenizer."""
        parts: list[np.ndarray] = []
        for rate, samples in chunks:
            rs = self._resampler
            if rs is None or rs.orig_sr != rate:  # the input format changed mid-session
                if rs is not None:
                    parts.append(rs.flush())
                rs = self._resampler = StreamingResampler(rate, SR16K)
            parts.append(rs.process(samples))
        y = np.concatenate(parts) if len(parts) > 1 else parts[0]
        y = y.astype(np.float32, copy=False)
        if len(y):
            self.vad.push(y)
        return y


class InputPump:
    """The VAD worker: one task, one thread, every session batched into each model call."""

    def __init__(self, model: SileroVAD, metrics: Metrics, tick_ms: int = 20,
                 min_cycle_ms: float = 8.0) -> None:
        """``min_cycle_ms``: cycles start at least this far apart. Sessions append at their own
        moments, so waking at every append would run one session per cycle (a thread hop, a
        VAD call and their overhead for each 20 ms of each session's audio); waiting a few ms
        lets one cycle take every session that appended meanwhile."""
        self.model = model
        self.metrics = metrics
        self.tick_s = tick_ms / 1000.0
        self.min_cycle_s = min_cycle_ms / 1000.0
        self._last_cycle = 0.0
        self.clients: set[PumpClient] = set()
        self.tickers: set[Callable[[], None]] = set()
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepaudio-vad")
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_tick = 0.0

    def client(self, params: VADParams, deliver: Callable[[PumpResult], None]) -> PumpClient:
        c = PumpClient(StreamingVAD(self.model, params, SR16K), deliver)
        self.clients.add(c)
        return c

    def remove(self, c: PumpClient) -> None:
        self.clients.discard(c)

    def put(self, c: PumpClient, rate: int, samples: np.ndarray) -> None:
        c.pending.append((rate, samples))
        c.pending_ms += 1000.0 * len(samples) / rate
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="input-pump")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._thread.shutdown(wait=True, cancel_futures=True)

    @staticmethod
    def _cycle(jobs: list[tuple[PumpClient, list[tuple[int, np.ndarray]]]]) -> list[PumpResult]:
        audio = [c.process(chunks) for c, chunks in jobs]
        events = run_batch([c.vad for c, _ in jobs])
        out = []
        for (c, _), y, ev in zip(jobs, audio, events, strict=True):
            seg = c.vad.segmenter
            out.append(PumpResult(y, ev, seg.now_ms, seg.settled_ms, seg.speaking))
        return out

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            except TimeoutError:
                pass
            wait = self.min_cycle_s - (time.perf_counter() - self._last_cycle)
            if wait > 0:
                await asyncio.sleep(wait)
            self._wake.clear()
            jobs = [(c, c.take()) for c in list(self.clients) if c.pending]
            if jobs:
                t0 = self._last_cycle = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self._thread, self._cycle, jobs)
                except Exception:  # a bug here must not stop every session's VAD
                    log.exception("VAD pump cycle failed")
                    results = []
                    for c, _ in jobs:
                        c.in_flight_ms = 0.0
                self.metrics.stage_seconds.labels("vad").observe(time.perf_counter() - t0)
                self.metrics.vad_batch.observe(len(jobs))
                for (c, _), res in zip(jobs, results, strict=False):
                    c.in_flight_ms = 0.0
                    if c in self.clients:
                        try:
                            c.deliver(res)
                        except Exception:
                            log.exception("session failed to take VAD results")
            now = time.perf_counter()
            if now - self._last_tick >= self.tick_s:
                self._last_tick = now
                for tick in list(self.tickers):
                    try:
                        tick()
                    except Exception:
                        log.exception("session tick failed")


# --------------------------------------------------------------------------------------------------
# Tokenizer


class TokenStream(Protocol):
    """One utterance's streaming tokenizer state (:class:`stepaudio.tokenizer.AudioTokenStream`)."""

    def feed(self, pcm: np.ndarray, sr: int) -> list[int]: ...

    def snapshot(self) -> list[int]: ...

    def finish(self) -> list[int]: ...


@dataclass(frozen=True)
class Tokens:
    ids: list[int]
    #: Model time of the call that produced them (for the critical-path accounting).
    compute_ms: float
    started: float  # perf_counter at the start of the compute
    ended: float


class TokenizerStage:
    """Streams over the shared tokenizer; every call runs in the pool, never on the loop."""

    def __init__(self, open_stream: Callable[[], TokenStream], metrics: Metrics, threads: int = 2,
                 name: str = "step-audio-tokenizer") -> None:
        self._open = open_stream
        self.metrics = metrics
        self.name = name
        self._pool = concurrent.futures.ThreadPoolExecutor(threads,
                                                           thread_name_prefix="stepaudio-tok")

    def open(self) -> TokenStream:
        return self._open()

    async def _run(self, stage: str, fn: Callable[[], list[int]]) -> Tokens:
        def timed() -> Tokens:
            t0 = time.perf_counter()
            ids = fn()
            t1 = time.perf_counter()
            return Tokens(list(ids), (t1 - t0) * 1000.0, t0, t1)

        out = await asyncio.get_running_loop().run_in_executor(self._pool, timed)
        self.metrics.stage_seconds.labels(stage).observe(out.compute_ms / 1000.0)
        return out

    async def feed(self, stream: TokenStream, pcm16k: np.ndarray) -> Tokens:
        return await self._run("tokenizer_feed", lambda: stream.feed(pcm16k, SR16K))

    async def snapshot(self, stream: TokenStream) -> Tokens:
        """The final ids of the utterance as if it ended now, leaving it open (the speculative
        reply reads the very ids the end of turn will)."""
        return await self._run("tokenizer_finish", stream.snapshot)

    async def finish(self, stream: TokenStream) -> Tokens:
        return await self._run("tokenizer_finish", stream.finish)

    async def tokenize(self, wav: np.ndarray, sr: int) -> Tokens:
        """A whole clip (``conversation.item.create`` with input audio)."""

        def run() -> list[int]:
            s = self._open()
            from stepaudio.audio import resample

            s.feed(resample(wav, sr, SR16K), SR16K)
            return s.finish()

        return await self._run("tokenizer_clip", run)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------------------------------
# Chat model


@dataclass(frozen=True)
class Transcript:
    text: str
    cut: bool  # the transcription hit its token limit: the text is only the start of the turn


@dataclass(frozen=True)
class Prompt:
    """A fitted chat prompt: what goes to the engine, and how big it is."""

    ids: list[int]
    text: str
    audio_tokens: int
    dropped_turns: int


class ChatStage:
    """Step-Audio-Chat for replies and for the background transcription of user turns."""

    def __init__(self, engine: Engine, metrics: Metrics, *, budget: int, send_text: bool,
                 base_params: SamplingParams, max_transcript_tokens: int = 256) -> None:
        self.engine = engine
        self.metrics = metrics
        self.budget = budget
        self.send_text = send_text
        self.base_params = base_params
        self.max_transcript_tokens = max_transcript_tokens
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepaudio-prompt")

    @property
    def name(self) -> str:
        return getattr(self.engine, "name", "engine")

    async def fit(self, system: str | None, history: Sequence[tuple[str, str]],
                  audio: Sequence[int] | None, text_prompt: str | None = None) -> Prompt:
        """Fit the prompt to the budget in a thread (it encodes the history with the tokenizer).

        ``audio`` is the newest user turn's ids; when the newest turn is text, ``text_prompt`` is
        the whole rendered prompt (already within the budget by the context's own count).
        """
        tok = self.engine.tokenizer

        def run() -> Prompt:
            if audio is None:
                assert text_prompt is not None
                ids = list(tok.encode(text_prompt))
                return Prompt(ids, text_prompt, 0, 0)
            fitted = fit_chat_prompt(tok, audio, history, system, budget=self.budget)
            return Prompt(fitted.ids, fitted.text, len(audio), fitted.dropped)

        t0 = time.perf_counter()
        out = await asyncio.get_running_loop().run_in_executor(self._pool, run)
        self.metrics.stage_seconds.labels("prompt").observe(time.perf_counter() - t0)
        return out

    def params(self, temperature: float | None, max_tokens: int | None) -> SamplingParams:
        p = self.base_params
        changes: dict[str, Any] = {}
        if temperature is not None:
            changes["temperature"] = temperature
        if max_tokens is not None:
            changes["max_new_tokens"] = max(1, min(p.max_new_tokens, max_tokens))
        return p.replace(**changes) if changes else p

    def generate(self, prompt: Prompt, params: SamplingParams) -> Generation:
        return self.engine.generate(prompt.text if self.send_text else prompt.ids, params)

    async def transcribe(self, audio_ids: Sequence[int]) -> Transcript:
        """The chat model in ASR mode (its system prompt asks it to write down what it heard);
        ``cut`` when it was still writing at ``max_transcript_tokens``."""
        t0 = time.perf_counter()
        prompt_text = build_asr_prompt(list(audio_ids))
        prompt: str | list[int]
        if self.send_text:
            prompt = prompt_text
        else:
            prompt = await asyncio.get_running_loop().run_in_executor(
                self._pool, lambda: list(self.engine.tokenizer.encode(prompt_text)))
        params = self.base_params.replace(temperature=0.0,
                                          max_new_tokens=self.max_transcript_tokens)
        gen = self.engine.generate(prompt, params)
        try:
            text, _ = await gen.collect()
        finally:
            await gen.aclose()
        self.metrics.stage_seconds.labels("transcription").observe(time.perf_counter() - t0)
        return Transcript(text.strip(), gen.finish_reason is FinishReason.LENGTH)

    async def aclose(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.engine.aclose()


# --------------------------------------------------------------------------------------------------
# Speech


class SpeechChunk(Protocol):
    pcm: np.ndarray
    sample_rate: int
    clause: int
    text: str


class SpeechStream(Protocol):
    """One reply's synthesis (:class:`stepaudio.tts.synthesizer.SpeechStream`)."""

    def push_text(self, delta: str) -> None: ...

    def end_text(self) -> None: ...

    def cancel(self) -> None: ...

    async def aclose(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[SpeechChunk]: ...


class SpeechStage:
    """The synthesizer, plus the wire encoding of its audio (resample + PCM/G.711 + base64)."""

    def __init__(self, synth: Any, metrics: Metrics, name: str = "step-audio-tts-3b") -> None:
        self.synth = synth
        self.metrics = metrics
        self.name = name
        self._encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stepaudio-enc")
        if hasattr(synth, "on_round"):  # the batched vocoder reports each round
            synth.on_round = self._round

    def _round(self, stats: Any) -> None:
        if "Solve" in stats.rows:
            self.metrics.vocoder_rows.observe(stats.rows["Solve"])
        self.metrics.vocoder_round.observe(stats.seconds)
        self.metrics.vocoder_batch_seconds.inc(stats.batch_seconds)

    def check_voice(self, speaker: str) -> str | None:
        """None if the speaker exists, else a message naming the known ones."""
        try:
            self.synth.voice(speaker)
        except Exception as err:  # the synthesizer's own UnknownSpeakerError names the choices
            return str(err)
        return None

    def open(self, speaker: str, seed: int | None = None) -> SpeechStream:
        return self.synth.open(self.synth.voice(speaker), seed)

    async def encode(self, resampler: StreamingResampler | None, pcm: np.ndarray,
                     fmt: AudioFormat, final: bool = False) -> tuple[str, int]:
        """TTS audio → base64 in the session's output format; returns (base64, samples)."""

        def run() -> tuple[str, int]:
            y = pcm
            if resampler is not None:
                y = resampler.process(pcm)
                if final:
                    y = np.concatenate([y, resampler.flush()])
            raw = encode_audio(y, fmt)
            return base64.b64encode(raw).decode("ascii"), len(y)

        t0 = time.perf_counter()
        out = await asyncio.get_running_loop().run_in_executor(self._encoder, run)
        self.metrics.stage_seconds.labels("encode").observe(time.perf_counter() - t0)
        return out

    async def aclose(self) -> None:
        self._encoder.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.synth, "aclose", None)
        if close is not None:
            await close()


# --------------------------------------------------------------------------------------------------
# All stages together: loading, warm-up, profile


@dataclass
class Stages:
    """What a server runs on: one of each stage, shared by every session."""

    pump: InputPump
    tokenizer: TokenizerStage
    chat: ChatStage
    speech: SpeechStage
    profile: str  # "tiny" | "real" | "zero-cost stages"
    note: str
    models: dict[str, str] = field(default_factory=dict)
    warm: bool = False

    async def warmup(self, wav: np.ndarray, sr: int, voice: str) -> dict[str, float]:
        """One real short turn through every stage, so the first user pays no compilation or
        first-call cost: VAD, streaming tokenizer (feed, snapshot, finish), prompt, chat reply,
        transcription, the first chunk of speech from each vocoder (more is no first-call cost,
        only start-up time), wire encoding in every format."""
        out: dict[str, float] = {}
        t0 = time.perf_counter()
        wav16 = StreamingResampler(sr, SR16K).process(wav) if sr != SR16K else wav
        client = self.pump.client(VADParams(), lambda r: None)
        try:
            client.process([(SR16K, wav16[: SR16K // 2])])
            run_batch([client.vad])
        finally:
            self.pump.remove(client)
        out["vad"] = _ms_since(t0)
        t0 = time.perf_counter()
        stream = self.tokenizer.open()
        await self.tokenizer.feed(stream, wav16)
        snap = await self.tokenizer.snapshot(stream)
        final = await self.tokenizer.finish(stream)
        out["tokenizer"] = _ms_since(t0)
        ids = final.ids or snap.ids
        t0 = time.perf_counter()
        if ids:
            prompt = await self.chat.fit(None, [], ids)
            gen = self.chat.generate(prompt, self.chat.params(None, 8))
            try:
                await gen.collect()
            finally:
                await gen.aclose()
            await self.chat.transcribe(ids[:60])
        out["chat"] = _ms_since(t0)
        t0 = time.perf_counter()
        for text in ("你好。", "(RAP)你好。"):  # the speech and the music vocoder
            s = self.speech.open(voice, seed=0)
            s.push_text(text)
            s.end_text()
            async for chunk in s:
                for kind in ("pcm16", "g711_ulaw"):
                    fmt = AudioFormat(kind=kind)
                    r = StreamingResampler(chunk.sample_rate, fmt.rate)
                    await self.speech.encode(r, chunk.pcm, fmt)
                break
            await s.aclose()
        out["tts"] = _ms_since(t0)
        self.warm = True
        return out

    async def aclose(self) -> None:
        await self.pump.aclose()
        self.tokenizer.close()
        await self.chat.aclose()
        await self.speech.aclose()


def warmup_audio() -> tuple[np.ndarray, int]:
    """Real speech for the warm-up: the packaged speaker prompt (ships with the wheel)."""
    from stepaudio.audio import load_audio
    from stepaudio.tts.prompt import default_speakers_dir

    folder = default_speakers_dir()
    wav, sr = load_audio(Path(folder) / "Tingting_prompt.wav")
    return wav[: sr * 3], sr


def load_stages(cfg: Config, root: Path, metrics: Metrics, *,
                chat_engine: Callable[[Path], Engine] | None = None) -> Stages:
    """Load every model named by the config (blocking: call it in a thread). ``chat_engine``
    builds the chat engine from the checkpoint folder instead of ``llm.engine`` (a benchmark's
    stand-in: ``server/instruments``)."""
    from stepaudio.llm.engine import make_engine
    from stepaudio.models import model_paths
    from stepaudio.tokenizer import StepAudioTokenizer

    paths = model_paths(root)
    tok = StepAudioTokenizer.from_config(paths.tokenizer, cfg.tokenizer)
    # No provisional ids: the models hear only the final (reference-exact) codes.
    tokenizer = TokenizerStage(lambda: tok.open_stream(provisional=False), metrics,
                               cfg.server.tokenizer_threads)
    engine = chat_engine(paths.chat) if chat_engine is not None else make_engine(cfg.llm,
                                                                                  paths.chat)
    chat = ChatStage(
        engine,
        metrics,
        budget=cfg.llm.budget(engine.max_model_len),
        send_text=cfg.llm.engine == "openai" and cfg.llm.dialect == "openai",
        base_params=SamplingParams.from_config(cfg.llm),
        max_transcript_tokens=cfg.session.max_transcript_tokens,
    )
    speech = SpeechStage(_load_synthesizer(cfg, root, tok), metrics)
    pump = InputPump(SileroVAD(), metrics, cfg.server.tick_ms)
    profile = cfg.models.profile
    note = ("tiny random-weight checkpoints: babble is expected" if profile == "tiny"
            else "the published Step-Audio checkpoints")
    models = {"vad": f"silero-vad ({pump.model.backend})", "tokenizer": paths.tokenizer.name,
              "chat": f"{paths.chat.name} ({cfg.llm.engine})",
              "tts": f"{paths.tts.name} ({cfg.tts.engine})"}
    return Stages(pump, tokenizer, chat, speech, profile, note, models)


def _load_synthesizer(cfg: Config, root: Path, tokenizer: Any) -> Any:
    from stepaudio.tts.synthesizer import Synthesizer

    device = cfg.tts.device
    lm_dtype = cfg.tts.lm_dtype
    if lm_dtype == "auto":
        lm_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    engine = None
    if cfg.tts.engine == "openai":
        from stepaudio.config import LLMConfig
        from stepaudio.llm.engine_openai import OpenAIEngine
        from stepaudio.models import model_paths

        remote = LLMConfig(engine="openai", base_url=cfg.tts.base_url,
                           served_model_name=cfg.tts.served_model_name,
                           api_key_env=cfg.tts.api_key_env, health_path=cfg.llm.health_path,
                           health_check_interval_s=cfg.llm.health_check_interval_s)
        engine = OpenAIEngine.from_config(remote, model_paths(root).tts)
        from stepaudio.tts.remote_rule import check_remote_rule

        engine.repetition_rule = check_remote_rule(engine, cfg.tts.repetition_rule)
    synth = Synthesizer.from_model_root(root, device=device, lm_dtype=lm_dtype, engine=engine,
                                        speakers_dir=cfg.tts.speakers_dir,
                                        options=synth_options(cfg.tts, cfg.models.profile),
                                        engine_options=tts_engine_options(cfg.tts))
    synth._tokenizer = tokenizer  # share the loaded audio tokenizer (voice cloning uses it)
    return synth


def synth_options(tts: Any, profile: str) -> Any:
    """The synthesizer's options from the ``tts`` config section (and the models profile, which
    picks the streaming mode ``auto`` stands for)."""
    from stepaudio.tts.synthesizer import SynthOptions

    batching = {"auto": None, "on": True, "off": False}[tts.batching]
    return SynthOptions(streaming=tts.streaming_mode(profile), batching=batching,
                        max_batch_rows=tts.max_batch_rows)


def tts_engine_options(tts: Any) -> dict[str, Any]:
    """In-process TTS-3B engine settings from the ``tts`` config section."""
    return {"max_batch": tts.max_batch, "max_len": tts.max_len, "prefix_slots": tts.prefix_slots,
            "stream_interval": tts.stream_interval, "cuda_priority": tts.cuda_priority}


def new_seed() -> int:
    return secrets.randbits(31)
