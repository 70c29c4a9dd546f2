"""One thread runs the vocoder work of every stream, batched across streams, deadline first.

Why: on a GPU one flow call costs about the same for one window as for a dozen (it is launch
bound, ~1000 small kernels per call), so N voices each running their own chunks one after another
cost N times what they could. Here every stream hands its next chunk in as a job
(:meth:`VocoderScheduler.submit`: the chunk's request generator from
:meth:`StreamingToken2Wav.chunk_work`, a deadline, and whether it is the first audio of a reply),
and one thread runs *rounds*. A round walks the stages in pipeline order (encode, regulate, solve,
F0, decode); at each stage it gathers the jobs whose next request is of that kind and runs them as
one batch (:class:`~stepaudio.tts.vocoder_batch.BatchRunner`), so a new job can pass every stage
in the round it joins.

Priorities: first chunks of replies go ahead of everything (someone is waiting in silence), then
the earliest deadline (when that stream's listener would run out of audio). A stage runs at most
``max_rows`` jobs; the rest keep their place for the next round. Jobs that arrive while a round
encodes are let in once more just before its flow step (their encoding is cheap), so a new first
chunk rarely waits a whole round. A job whose stream is cancelled
(barge-in) is dropped before its next stage. Results are identical to running each chunk alone
(the batch runner's masks), so scheduling changes when a chunk is computed, never what.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stepaudio.tts.vocoder_batch import BatchRunner
from stepaudio.tts.vocoder_work import (
    ChunkWork,
    Decode,
    Encode,
    PredictF0,
    Regulate,
    Request,
    Solve,
)

log = logging.getLogger(__name__)

#: Stages in the order a chunk needs them; a round visits each once.
STAGES: tuple[type, ...] = (Encode, Regulate, Solve, PredictF0, Decode)


class ChunkCancelled(Exception):
    """The stream was cancelled before its chunk was computed (the chunk is dropped)."""


@dataclass
class _Job:
    runner: BatchRunner
    work: ChunkWork
    deadline: float
    first: bool
    cancelled: Callable[[], bool]
    future: concurrent.futures.Future[np.ndarray]
    order: int
    then: Callable[[np.ndarray], None] | None = None
    request: Request | None = None
    submitted: float = field(default_factory=time.perf_counter)

    def key(self) -> tuple[bool, float, int]:
        return (not self.first, self.deadline, self.order)


@dataclass
class RoundStats:
    """What one round ran (for metrics and benchmarks). ``batch_seconds``: in the batched model
    calls (with ``STEPAUDIO_VOCODER_SYNC=1`` the device is synchronised after each, so this is
    device time and the rest of ``seconds`` host time: the streams' own work between calls)."""

    rows: dict[str, int]
    seconds: float
    waiting: int
    batch_seconds: float = 0.0


class VocoderScheduler:
    """The vocoder thread. ``submit`` from any thread; results arrive as futures."""

    def __init__(self, max_rows: int = 16, name: str = "stepaudio-vocoder",
                 on_round: Callable[[RoundStats], None] | None = None,
                 device: torch.device | str | None = None) -> None:
        """``device``: a CUDA device gets a stream of its own for the vocoder thread, so flow
        and HiFT overlap TTS-3B's decode steps (another thread, another stream) on the GPU
        instead of queueing behind them."""
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.max_rows = max_rows
        self.device = torch.device(device) if device is not None else None
        self.on_round = on_round
        self._cond = threading.Condition()
        self._queue: list[_Job] = []
        self._active: list[_Job] = []
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._closing = False
        self._order = itertools.count()
        self._name = name
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self._sync = os.environ.get("STEPAUDIO_VOCODER_SYNC") == "1"
        self._batch_s = 0.0
        self._profile: dict[str, float] = {}  # with _sync: seconds per stage and host

    # -- client side ---------------------------------------------------------------------------
    def submit(self, runner: BatchRunner, work: ChunkWork, *, deadline: float, first: bool,
               cancelled: Callable[[], bool],
               then: Callable[[np.ndarray], None] | None = None
               ) -> concurrent.futures.Future[np.ndarray]:
        """Queue one chunk. ``deadline``: perf_counter time by which it should be done;
        ``cancelled``: polled before each stage (the job is dropped once it says True);
        ``then(pcm)``: called on the vocoder thread as the chunk is done, before the future
        resolves, so the stream's next chunk can be queued for the very next round without a
        trip through the caller's event loop."""
        fut: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
        job = _Job(runner, work, deadline, first, cancelled, fut, next(self._order), then)
        with self._cond:
            if self._closing:
                raise RuntimeError("the vocoder scheduler is closed")
            self._queue.append(job)
            self._ensure_thread()
            self._cond.notify()
        return fut

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        """Run ``fn`` on the vocoder thread between rounds (graph captures, warm-up): work on
        the vocoder's models never races a batch."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise RuntimeError("the vocoder scheduler is closed")
            self._calls.append((fn, fut))
            self._ensure_thread()
            self._cond.notify()
        return fut

    def close(self) -> None:
        """Stop the thread; queued and running chunks end with :class:`ChunkCancelled`."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._active)

    # -- the thread ----------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.set_stream(torch.cuda.Stream(self.device))  # this thread's current stream
        while True:
            with self._cond:
                while not (self._queue or self._active or self._calls or self._closing):
                    self._cond.wait()
                if self._closing:
                    jobs = self._queue + self._active
                    self._queue, self._active = [], []
                    calls, self._calls = self._calls, []
                    break
                calls, self._calls = self._calls, []
            for fn, fut in calls:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(exc)
            try:
                self._round()
            except Exception:  # a bug in the loop itself: fail what runs, keep the thread
                log.exception("vocoder round failed")
                with self._cond:
                    failed, self._active = self._active, []
                for job in failed:
                    self._fail(job, RuntimeError("vocoder round failed"))
        for job in jobs:
            self._drop(job)
        for _, fut in calls:
            fut.cancel()

    def _admit(self) -> None:
        with self._cond:
            new, self._queue = self._queue, []
        for job in new:
            self._advance(job, None, start=True)

    def _round(self) -> None:
        t0 = time.perf_counter()
        self._batch_s = 0.0
        self._admit()
        rows: dict[str, int] = {}
        for stage in (Encode, Regulate, None, *STAGES):
            if stage is None:  # late arrivals: encode them too, then all go to the flow step
                self._admit()
                continue
            self._active = [j for j in self._active if not self._dropped(j)]
            ready = sorted((j for j in self._active if type(j.request) is stage), key=_Job.key)
            if not ready:
                continue
            by_runner: dict[int, list[_Job]] = {}
            for job in ready[: self.max_rows]:
                by_runner.setdefault(id(job.runner), []).append(job)
            for jobs in by_runner.values():
                self._run_batch(jobs)
            rows[stage.__name__] = rows.get(stage.__name__, 0) + min(len(ready), self.max_rows)
        self.rounds += 1
        if self._sync:
            self._log_profile(rows, time.perf_counter() - t0)
        if self.on_round is not None and rows:
            self.on_round(RoundStats(rows, time.perf_counter() - t0, len(self._active),
                                     self._batch_s))

    def _log_profile(self, rows: dict[str, int], seconds: float) -> None:
        """STEPAUDIO_VOCODER_SYNC=1: every 50 rounds, where a round's time went (ms per round:
        each stage's batched calls on the device, and host work: the streams' own code)."""
        p = self._profile
        p["round"] = p.get("round", 0.0) + seconds
        p["rows"] = p.get("rows", 0.0) + rows.get("Solve", 0)
        if self.rounds % 50:
            return
        n = 50.0
        stages = {k: v for k, v in p.items() if k not in ("round", "rows")}
        host = p["round"] - sum(stages.values())
        log.info("vocoder profile, last 50 rounds: %.1f flow rows a round; ms a round: %s, "
                 "host %.1f, total %.1f", p["rows"] / n,
                 ", ".join(f"{k} {1000 * v / n:.1f}" for k, v in sorted(stages.items())),
                 1000 * host / n, 1000 * p["round"] / n)
        self._profile = {}

    def _run_batch(self, jobs: list[_Job]) -> None:
        runner = jobs[0].runner
        t0 = time.perf_counter()
        try:
            results = runner.run([j.request for j in jobs])  # type: ignore[misc]
            if self._sync and runner.device.type == "cuda":
                torch.cuda.current_stream(runner.device).synchronize()
                kind = type(jobs[0].request).__name__
                self._profile[kind] = self._profile.get(kind, 0.0) + time.perf_counter() - t0
        except Exception as exc:  # one failed batch ends its chunks, not the thread
            log.exception("vocoder batch of %d %s requests failed", len(jobs),
                          type(jobs[0].request).__name__)
            for job in jobs:
                self._fail(job, exc)
            return
        finally:
            self._batch_s += time.perf_counter() - t0
        for job, result in zip(jobs, results, strict=True):
            self._advance(job, result)

    def _advance(self, job: _Job, result: torch.Tensor | None, start: bool = False) -> None:
        """Send the job its result (or start it); it either yields its next request or ends."""
        if self._dropped(job):
            return
        try:
            job.request = next(job.work) if start else job.work.send(result)  # type: ignore[arg-type]
        except StopIteration as stop:
            self._forget(job)
            if job.then is not None:
                try:
                    job.then(stop.value)
                except Exception:  # a follow-up that fails costs that stream its head start
                    log.exception("vocoder follow-up failed")
            if not job.future.done():
                job.future.set_result(stop.value)
            return
        except Exception as exc:  # the stream's own work failed (its bug or bad input)
            self._fail(job, exc)
            return
        if start:
            self._active.append(job)

    def _dropped(self, job: _Job) -> bool:
        try:
            cancelled = job.cancelled()
        except Exception:  # noqa: BLE001 - a broken flag counts as cancelled
            cancelled = True
        if cancelled:
            self._drop(job)
        return cancelled

    def _forget(self, job: _Job) -> None:
        if job in self._active:
            self._active.remove(job)

    def _drop(self, job: _Job) -> None:
        self._forget(job)
        job.work.close()
        if not job.future.done():
            job.future.set_exception(ChunkCancelled("stream cancelled"))

    def _fail(self, job: _Job, exc: BaseException) -> None:
        self._forget(job)
        job.work.close()
        if not job.future.done():
            job.future.set_exception(exc)
