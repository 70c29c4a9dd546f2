"""A session with no models and no real time: scripted stand-in stages, a fake socket, virtual time.

Why: the end-to-end tests run a real server on the tiny checkpoints in real time, so they take
seconds per turn and cannot say exactly when anything happened. Here the session under test is
the real one (controller, conversation, replies, outbox, the pump's own cycle and the real VAD
segmenter), and only what is slow or random is replaced:

- time: :class:`VirtualTime` is the session's wall clock (turn clock, outbox, timings), and every
  stand-in model waits on it; the harness moves it in 20 ms steps, as a microphone would;
- the VAD model: :class:`EnergyVAD` calls a frame speech when it is loud (the segmenter that turns
  frames into events is the real one, with its real minimum durations);
- the models: :class:`ScriptedChat` answers with a fixed text at a fixed pace (and records its
  prompts), :class:`ScriptedSynth` speaks each clause at 200 ms of audio per character, produced
  four times faster than real time; the audio tokenizer is the zero-cost instrument's (its ids
  count samples);
- the socket: :class:`FakeSocket` records what was sent and when, and can disconnect.

The stages' thread pools are replaced by an executor that runs each job at once on the loop's
thread, so a step of the harness is deterministic: the same script gives the same events.
(LiveKit's agents test their voice pipeline with fakes and a fake clock in the same spirit.)
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import heapq
import itertools
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosedError

from server.instruments.zero_cost import ZeroCostTokenStream
from server.metrics import Metrics
from server.protocol import default_session_config
from server.session import Session, SessionEnv
from server.workers import ChatStage, InputPump, SpeechStage, Stages, TokenizerStage
from stepaudio.config import Config
from stepaudio.llm.engine import (
    Delta,
    EngineError,
    FinishReason,
    SamplingParams,
    StreamedGeneration,
    Usage,
    check_prompt,
)
from stepaudio.llm.prompt import ASR_SYSTEM_PROMPT

RATE = 24000  # the wire's pcm16 rate, and the scripted synthesizer's
STEP_MS = 20
ASR_PROMPT = ASR_SYSTEM_PROMPT


class VirtualTime:
    """A wall clock (seconds) that moves only when told; stand-ins sleep on it."""

    def __init__(self) -> None:
        self.s = 0.0
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.s

    @property
    def ms(self) -> float:
        return self.s * 1000.0

    async def sleep(self, seconds: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.s + max(0.0, seconds), next(self._seq), fut))
        await fut

    def advance(self, seconds: float) -> None:
        """Move on; every sleeper that is due wakes (in order)."""
        self.s += seconds
        while self._timers and self._timers[0][0] <= self.s + 1e-9:
            _, _, fut = heapq.heappop(self._timers)
            if not fut.done():
                fut.set_result(None)


class InlineExecutor(concurrent.futures.Executor):
    """Runs each job at once, on the caller's thread: the stages' hops stay, their timing goes."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
               ) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as err:  # noqa: BLE001 - handed to the awaiting side
            fut.set_exception(err)
        return fut


# -- the socket ------------------------------------------------------------------------------------


class FakeSocket:
    """What a session uses of a WebSocket: messages in (``push``), messages out with their virtual
    send time, close, and a client that goes away (``disconnect``)."""

    def __init__(self, time: VirtualTime) -> None:
        self.time = time
        self.sent: list[tuple[float, dict[str, Any]]] = []  # (virtual ms, event)
        self.closed_with: tuple[int, str] | None = None
        self._in: asyncio.Queue[str | None] = asyncio.Queue()
        self.gone = False

    async def send(self, message: str) -> None:
        if self.gone or self.closed_with is not None:
            raise ConnectionClosedError(None, None)
        self.sent.append((self.time.ms, json.loads(message)))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)
        self._in.put_nowait(None)

    def push(self, event: dict[str, Any]) -> None:
        self._in.put_nowait(json.dumps(event))

    def disconnect(self) -> None:
        self.gone = True
        self._in.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[str]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str]:
        while True:
            message = await self._in.get()
            if message is None:
                if self.gone:
                    raise ConnectionClosedError(None, None)
                return
            yield message


# -- stand-in models ----------------------------------------------------------------------------


class EnergyVAD:
    """Silero's batch interface: a frame is speech when its RMS is over 0.01."""

    backend = "energy (scripted)"

    def step_batch(self, states: Sequence[Any], frames: np.ndarray) -> np.ndarray:
        rms = np.sqrt(np.mean(np.square(frames, dtype=np.float64), axis=1))
        return (rms > 0.01).astype(np.float32)


class CharTokenizer:
    """A text tokenizer with one id per character (prompt fitting counts with it)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], **_: Any) -> str:
        return "".join(chr(i) for i in ids)


class _Typing(StreamedGeneration):
    def __init__(self, chat: ScriptedChat, text: str, params: SamplingParams, prompt_len: int
                 ) -> None:
        self.chat, self.text, self.params, self.prompt_len = chat, text, params, prompt_len
        super().__init__(f"scripted-{len(chat.prompts)}")

    def cancel(self) -> None:
        self._cancelled = True
        self.chat.cancelled += 1

    async def aclose(self) -> None:
        self.cancel()
        await self._close_iter()

    async def _run(self) -> AsyncIterator[Delta]:
        t = self.chat.time
        await t.sleep(self.chat.first_token_ms / 1000.0)
        limit = min(len(self.text), self.params.max_new_tokens)
        for n, ch in enumerate(self.text[:limit], start=1):
            if self._cancelled:
                yield Delta(finish_reason=FinishReason.CANCELLED, usage=Usage(self.prompt_len, n))
                return
            if self.chat.fail_after is not None and n > self.chat.fail_after:
                raise EngineError("the scripted chat model went away")
            yield Delta(text=ch, token_ids=(ord(ch),))
            if n < limit:
                await t.sleep(self.chat.ms_per_token / 1000.0)
        reason = FinishReason.STOP if limit == len(self.text) else FinishReason.LENGTH
        yield Delta(finish_reason=reason, usage=Usage(self.prompt_len, limit))


class ScriptedChat:
    """The engine interface: every reply is :attr:`reply`, typed a character at a time; the ASR
    prompt gets :attr:`transcript`. Every prompt is kept (as text) for the tests to read."""

    name = "scripted"
    max_model_len = 8192

    def __init__(self, time: VirtualTime, reply: str = "好的，我明白了。今天天气不错。",
                 transcript: str = "你好", first_token_ms: float = 100.0,
                 ms_per_token: float = 20.0) -> None:
        self.time = time
        self.reply = reply
        self.transcript = transcript
        self.first_token_ms = first_token_ms
        self.ms_per_token = ms_per_token
        self.tokenizer = CharTokenizer()
        self.prompts: list[str] = []
        self.cancelled = 0
        self.fail_after: int | None = None

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                 request_id: str | None = None) -> StreamedGeneration:
        p = check_prompt(prompt)
        text = p if isinstance(p, str) else self.tokenizer.decode(p)
        self.prompts.append(text)
        answer = self.transcript if ASR_PROMPT in text else self.reply
        return _Typing(self, answer, params or SamplingParams(), len(p))

    async def aclose(self) -> None:
        return None

    def reply_prompts(self) -> list[str]:
        return [p for p in self.prompts if ASR_PROMPT not in p]


@dataclass(frozen=True)
class Chunk:
    pcm: np.ndarray
    sample_rate: int
    clause: int
    text: str


CLAUSE_END = "，。！？,.!?"


class _Speaking:
    """One reply's synthesis: each clause as soon as its text is complete, in chunks."""

    def __init__(self, synth: ScriptedSynth) -> None:
        self.synth = synth
        self.text = ""
        self.clauses: list[str] = []
        self.ended = False
        self.cancelled = False
        self.closed = False
        self._more = asyncio.Event()

    def push_text(self, delta: str) -> None:
        self.text += delta
        while True:
            cut = next((i for i, c in enumerate(self.text) if c in CLAUSE_END), None)
            if cut is None:
                break
            self.clauses.append(self.text[: cut + 1])
            self.text = self.text[cut + 1:]
        self._more.set()

    def end_text(self) -> None:
        if self.text.strip():
            self.clauses.append(self.text)
        self.text = ""
        self.ended = True
        self._more.set()

    def cancel(self) -> None:
        self.cancelled = True
        self._more.set()

    async def aclose(self) -> None:
        self.cancel()
        self.closed = True

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[Chunk]:
        s = self.synth
        k = 0
        while not self.cancelled:
            if k >= len(self.clauses):
                if self.ended:
                    return
                self._more.clear()
                await self._more.wait()
                continue
            clause = self.clauses[k]
            total = int(RATE * s.ms_per_char * len(clause) / 1000)
            step = int(RATE * s.chunk_ms / 1000)
            for i in range(0, total, step):
                await s.time.sleep(s.chunk_ms * s.rtf / 1000.0)
                if self.cancelled:
                    return
                n = min(step, total - i)
                yield Chunk(s.tone[:n], RATE, k, clause)
            k += 1


class ScriptedSynth:
    """The synthesizer's interface (``voice``, ``open``): a quiet tone for every clause."""

    def __init__(self, time: VirtualTime, ms_per_char: float = 200.0, chunk_ms: float = 240.0,
                 rtf: float = 0.25) -> None:
        self.time = time
        self.ms_per_char = ms_per_char
        self.chunk_ms = chunk_ms
        self.rtf = rtf
        n = int(RATE * chunk_ms / 1000)
        self.tone = (0.05 * np.sin(2 * np.pi * 220.0 * np.arange(n) / RATE)).astype(np.float32)
        self.streams: list[_Speaking] = []

    def voice(self, speaker: str | None = None, **_: Any) -> str:
        if speaker not in ("Tingting", None):
            raise ValueError(f"unknown speaker {speaker!r}; known: Tingting")
        return speaker or "Tingting"

    def open(self, voice: Any, seed: int | None = None) -> _Speaking:
        s = _Speaking(self)
        self.streams.append(s)
        return s


# -- the harness ------------------------------------------------------------------------------------


class SteppedPump(InputPump):
    """The real pump's cycle (resampling, the VAD over every client, delivery, session ticks), run
    when the harness says instead of on a task and a thread."""

    def start(self) -> None:
        return None

    def cycle(self) -> None:
        jobs = [(c, c.take()) for c in list(self.clients) if c.pending]
        for (c, _), res in zip(jobs, self._cycle(jobs), strict=True):
            c.in_flight_ms = 0.0
            if c in self.clients:
                c.deliver(res)
        for tick in list(self.tickers):
            tick()


def harness_config() -> Config:
    cfg = Config()
    cfg.server.api_key_env = None
    cfg.session.max_transcript_tokens = 8
    return cfg


class SessionHarness:
    """One session under test; the script speaks, stays silent, sends events and moves time."""

    def __init__(self, cfg: Config | None = None, dialect: str = "ga") -> None:
        self.cfg = cfg or harness_config()
        self.time = VirtualTime()
        self.metrics = Metrics()
        self.chat = ScriptedChat(self.time)
        self.synth = ScriptedSynth(self.time)
        self.pump = SteppedPump(EnergyVAD(), self.metrics)  # type: ignore[arg-type]
        tokenizer = TokenizerStage(ZeroCostTokenStream, self.metrics, 1, name="counting")
        chat = ChatStage(self.chat, self.metrics, budget=4096, send_text=False,
                         base_params=SamplingParams(max_new_tokens=256),
                         max_transcript_tokens=self.cfg.session.max_transcript_tokens)
        speech = SpeechStage(self.synth, self.metrics, name="scripted")
        for stage, pool in ((tokenizer, "_pool"), (chat, "_pool"), (speech, "_encoder")):
            getattr(stage, pool).shutdown(wait=False)
            setattr(stage, pool, InlineExecutor())
        self.stages = Stages(self.pump, tokenizer, chat, speech, "tiny", "scripted stand-ins",
                             {"vad": "energy", "tokenizer": "counting", "chat": "scripted",
                              "tts": "scripted"})
        self.env = SessionEnv(self.cfg, self.stages, self.metrics,
                              default_session_config(self.cfg.session), wall=self.time)
        self.ws = FakeSocket(self.time)
        self.dialect = dialect
        self.session: Session | None = None
        self.task: asyncio.Task[None] | None = None
        self._noise = np.random.default_rng(0)

    async def __aenter__(self) -> SessionHarness:
        self.session = Session(self.ws, self.env, self.dialect)  # type: ignore[arg-type]
        self.task = asyncio.get_running_loop().create_task(self.session.run())
        await self.settle()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None and not self.task.done():
            self.ws.disconnect()
            await self.settle()
            await asyncio.wait_for(self.task, 5.0)
        await self.stages.aclose()

    # -- driving ---------------------------------------------------------------------------------

    async def settle(self) -> None:
        """Let everything runnable run (no stand-in waits on real time): until the loop has had
        nothing else to do twice in a row (asyncio's ready queue; 200 rounds where it has none)."""
        ready = getattr(asyncio.get_running_loop(), "_ready", None)
        quiet = 0
        for _ in range(2000 if ready is not None else 200):
            await asyncio.sleep(0)
            quiet = quiet + 1 if ready is not None and not ready else 0
            if quiet >= 2:
                return

    def send(self, event: dict[str, Any]) -> None:
        self.ws.push(event)

    async def step(self, pcm: np.ndarray | None, ms: int = STEP_MS) -> None:
        """``ms`` of virtual time pass; ``pcm`` (float, 24 kHz) arrives at the end of them."""
        self.time.advance(ms / 1000.0)
        await self.settle()
        if pcm is not None:
            raw = (np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()
            self.send({"type": "input_audio_buffer.append",
                       "audio": base64.b64encode(raw).decode("ascii")})
            await self.settle()
        self.pump.cycle()
        await self.settle()

    def _chunk(self, speech: bool) -> np.ndarray:
        n = RATE * STEP_MS // 1000
        if not speech:
            return np.zeros(n, dtype=np.float32)
        return (0.1 * self._noise.standard_normal(n)).astype(np.float32)

    async def speak(self, ms: int) -> None:
        for _ in range(ms // STEP_MS):
            await self.step(self._chunk(True))

    async def silence(self, ms: int) -> None:
        for _ in range(ms // STEP_MS):
            await self.step(self._chunk(False))

    async def idle(self, ms: int) -> None:
        """Time passes with no audio at all (push-to-talk released, a manual-turn client)."""
        for _ in range(ms // STEP_MS):
            await self.step(None)

    async def until(self, etype: str, pred: Callable[[dict[str, Any]], bool] | None = None, *,
                    within_ms: int = 10000, audio: bool = True, after: int = 0
                    ) -> dict[str, Any]:
        """Silence (or no audio) until an event of ``etype`` has been sent."""
        for _ in range(within_ms // STEP_MS + 1):
            hit = self.find(etype, pred, after)
            if hit is not None:
                return hit
            await (self.step(self._chunk(False)) if audio else self.step(None))
        raise AssertionError(f"no {etype} within {within_ms} ms; got {self.types()[-40:]}")

    # -- what the client got ---------------------------------------------------------------------

    @property
    def events(self) -> list[dict[str, Any]]:
        return [e for _, e in self.ws.sent]

    def types(self, after: int = 0) -> list[str]:
        return [e["type"] for e in self.events[after:]]

    def of(self, etype: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == etype]

    def find(self, etype: str, pred: Callable[[dict[str, Any]], bool] | None = None,
             after: int = 0) -> dict[str, Any] | None:
        return next((e for e in self.events[after:] if e["type"] == etype
                     and (pred is None or pred(e))), None)

    def sent_at(self, event: dict[str, Any]) -> float:
        """Virtual ms at which the socket took ``event``."""
        return next(t for t, e in self.ws.sent if e is event)
