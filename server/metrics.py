"""Prometheus metrics of one server, in a registry of its own.

A registry per server (not the library's global one) lets several servers live in one process
(tests, the benchmark) without name clashes, and makes ``/metrics`` show exactly this server.

Load signals for a balancer or an autoscaler: ``stepaudio_sessions_active`` against
``stepaudio_sessions_capacity`` (``server.max_sessions``), ``stepaudio_draining`` (1 from SIGTERM
until the process exits) and ``stepaudio_ready``; per model endpoint of a pool,
``stepaudio_backend_up`` and the requests it carries.

Latency buckets are fine-grained below 20 ms because the server's own overhead is measured in
single milliseconds; the end-of-speech histogram spans the deliberate silence wait (0.75 s by
default) up to several seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

FAST_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2,
    0.5, 1.0, 2.0, 5.0,
)
TURN_BUCKETS = (
    0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0,
    5.0, 10.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class BackendCollector:
    """The endpoints of the model pools, read when ``/metrics`` is scraped (the pools keep the
    counts; copying them into gauges on every change would cost the request path)."""

    def __init__(self) -> None:
        #: pool name (chat, tts) -> its endpoints (objects with url, up, in_flight, requests)
        self.pools: dict[str, Iterable[Any]] = {}

    def collect(self) -> Iterator[Metric]:
        labels = ["pool", "endpoint"]
        up = GaugeMetricFamily("stepaudio_backend_up", "1 while a model endpoint is in service "
                               "(0: taken out after a failure, until its health check passes).",
                               labels=labels)
        busy = GaugeMetricFamily("stepaudio_backend_in_flight",
                                 "Requests streaming from a model endpoint now.", labels=labels)
        sent = CounterMetricFamily("stepaudio_backend_requests",
                                   "Requests a model endpoint accepted.", labels=labels)
        prompt = CounterMetricFamily("stepaudio_backend_prompt_tokens",
                                     "Prompt tokens of the requests a model endpoint finished.",
                                     labels=labels)
        cached = CounterMetricFamily(
            "stepaudio_backend_cached_prompt_tokens",
            "Of those, tokens its prefix cache served, as it reported them (vLLM: with "
            "--enable-prompt-tokens-details; 0 from servers that do not say).", labels=labels)
        for name, endpoints in self.pools.items():
            for ep in endpoints:
                key = [name, ep.url]
                up.add_metric(key, 1.0 if ep.up else 0.0)
                busy.add_metric(key, float(ep.in_flight))
                sent.add_metric(key, float(ep.requests))
                prompt.add_metric(key, float(ep.prompt_tokens))
                cached.add_metric(key, float(ep.cached_tokens))
        yield from (up, busy, sent, prompt, cached)


class Metrics:
    """Every metric the server exports; created once per server."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.ready = Gauge("stepaudio_ready", "1 once the models are loaded and warmed up.",
                           registry=r)
        self.sessions_active = Gauge("stepaudio_sessions_active", "Open realtime sessions.",
                                     registry=r)
        self.sessions_capacity = Gauge(
            "stepaudio_sessions_capacity", "Sessions this server admits (server.max_sessions); "
            "past it connections get HTTP 503 and /readyz turns 503.", registry=r)
        self.draining = Gauge(
            "stepaudio_draining", "1 while shutting down: no new sessions, the turns in flight "
            "finish (up to server.shutdown_grace_s), then sessions close with 1001.", registry=r)
        self.sessions = Counter("stepaudio_sessions", "Realtime sessions opened.", registry=r)
        self.sessions_closed = Counter(
            "stepaudio_sessions_closed", "Sessions closed, by WebSocket close code.", ["code"],
            registry=r)
        self.turns = Counter("stepaudio_turns", "User turns committed, by how.", ["mode"],
                             registry=r)
        self.speculations = Counter(
            "stepaudio_speculations", "Speculative replies, by outcome.", ["outcome"], registry=r)
        self.responses = Counter("stepaudio_responses", "Responses finished, by status.",
                                 ["status"], registry=r)
        self.stage_seconds = Histogram(
            "stepaudio_stage_seconds", "Time in one model stage call (VAD cycle, tokenizer, "
            "prompt, LLM first token, TTS first audio, encode...).", ["stage"],
            buckets=FAST_BUCKETS, registry=r)
        self.first_audio = Histogram(
            "stepaudio_end_of_speech_to_first_audio_seconds",
            "End of the user's speech (VAD) to the reply's first audio written to the socket.",
            ["speculative"], buckets=TURN_BUCKETS, registry=r)
        self.overhead = Histogram(
            "stepaudio_server_overhead_seconds",
            "End of turn to first audio sent, minus model compute on that path.",
            buckets=FAST_BUCKETS, registry=r)
        self.loop_lag = Histogram(
            "stepaudio_event_loop_lag_seconds",
            "How late the event loop woke a 10 ms timer (time it spent busy elsewhere).",
            buckets=FAST_BUCKETS, registry=r)
        self.loop_lag_max = Gauge(
            "stepaudio_event_loop_lag_max_seconds", "Largest event-loop lag since start.",
            registry=r)
        self.vad_batch = Histogram(
            "stepaudio_vad_batch_sessions", "Sessions in one VAD pump cycle.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.vocoder_rows = Histogram(
            "stepaudio_vocoder_rows", "Sessions' windows in one batched flow call.",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.vocoder_batch_seconds = Counter(
            "stepaudio_vocoder_batch_seconds", "Time in the batched vocoder's model calls.",
            registry=r)
        self.vocoder_round = Histogram(
            "stepaudio_vocoder_round_seconds",
            "One round of the batched vocoder (every stage once, all sessions).",
            buckets=FAST_BUCKETS, registry=r)
        self.errors = Counter("stepaudio_errors", "error events sent, by code.", ["code"],
                              registry=r)
        self.send_queue_bytes = Gauge(
            "stepaudio_send_queue_bytes", "Bytes queued for clients, all sessions.", registry=r)
        self.input_paused = Counter(
            "stepaudio_input_paused", "Times a socket's reading paused for the input backlog.",
            registry=r)
        self.backends = BackendCollector()
        r.register(self.backends)
        self.lag_samples: deque[float] = deque(maxlen=200_000)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe_reply(self, timings_ms: dict[str, float], speculative: bool) -> None:
        """One reply's ``stepaudio.timings`` into the latency histograms."""
        if "end_of_speech_to_first_audio" in timings_ms:
            self.first_audio.labels(str(speculative).lower()).observe(
                timings_ms["end_of_speech_to_first_audio"] / 1000.0)
        if "server_overhead" in timings_ms:
            self.overhead.observe(timings_ms["server_overhead"] / 1000.0)
        for name in ("llm_first_token", "tts_first_audio"):
            if name in timings_ms:
                self.stage_seconds.labels(name).observe(timings_ms[name] / 1000.0)


class LoopLagMonitor:
    """Measures event-loop lag: a 10 ms sleep that wakes late shows the loop was busy.

    This is the number that says whether the loop ever waited on a model: with every stage in a
    worker it stays near zero under load.
    """

    def __init__(self, metrics: Metrics, interval_s: float = 0.01) -> None:
        self.metrics = metrics
        self.interval_s = interval_s
        self.max_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - t0 - self.interval_s)
            self.metrics.loop_lag.observe(lag)
            self.metrics.lag_samples.append(lag)
            if lag > self.max_s:
                self.max_s = lag
                self.metrics.loop_lag_max.set(lag)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
