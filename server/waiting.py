"""Waiting on several things at once, without polling and without leaving tasks behind."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import Any

log = logging.getLogger(__name__)


class TaskSet:
    """The background tasks of one owner (a session): each is kept referenced until it ends
    (asyncio keeps only a weak one), a failure nobody awaits is logged, and ``cancel`` stops
    them all when the owner goes."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], *, awaited: bool = False
              ) -> asyncio.Task[Any]:
        """``awaited``: its result (or failure) belongs to whoever awaits it (a turn's tokens),
        so a failure is not logged here."""
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._awaited_done if awaited else self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def _awaited_done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: an unawaited failure is not an asyncio warning

    def cancel(self) -> None:
        for task in list(self.tasks):
            task.cancel()


async def first_of(events: Sequence[asyncio.Event], timeout: float) -> None:
    """Wait until one of ``events`` is set, or ``timeout`` seconds have passed."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


async def side_by_side(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines together until all are done; the first to fail cancels the others
    and its exception is raised (none is left running or unretrieved)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            err = None if task not in done or task.cancelled() else task.exception()
            if err is not None:
                raise err
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
