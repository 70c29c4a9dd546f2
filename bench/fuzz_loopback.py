"""Loopback fuzz of a running server (not a test): many sessions, thousands of hostile events.

Starts `stepaudio serve` (tiny profile) as a child process and opens ``--sessions`` sessions at
once, some with handshake headers that appear twice (``X-Forwarded-For``, ``Cookie``,
``OpenAI-Beta``). Each session sends its share of ``--events`` events from a seeded generator:
well-formed events of every type (short replies), and malformed ones (broken JSON, wrong types,
unknown fields and types, bad base64, lone UTF-16 surrogates, 20 kB strings, deep nesting, huge
numbers, binary frames). Every malformed event must be answered by an ``error`` and the session
must live on: at the end each session proves it still answers. Prints the counts.

    PYTHONPATH=. python bench/fuzz_loopback.py [--events 10000] [--sessions 12] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.instruments.loadtest import SpawnedServer

TYPES = ["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
         "input_audio_buffer.clear", "conversation.item.create", "conversation.item.truncate",
         "conversation.item.delete", "conversation.item.retrieve", "response.create",
         "response.cancel"]
SURROGATES = ["\\ud800", "\\udfff", "\\ud83d", "\\udc00x"]


class Generator:
    """Seeded events: (wire message, is it malformed, its event_id or None)."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)
        self.seed = seed
        self.n = 0

    def _id(self) -> str:
        self.n += 1
        return f"fz{self.seed}_{self.n}"

    def _text(self) -> str:
        r = self.r
        return r.choice(["你好", "hello", "", "x" * r.randint(1, 40), "(高兴1)好的", "\u0000\u202e"])

    def valid(self) -> dict[str, Any]:
        r = self.r
        t = r.choice(TYPES)
        ev: dict[str, Any] = {"type": t, "event_id": self._id()}
        if t == "session.update":
            ev["session"] = r.choice([{"instructions": self._text()},
                                      {"max_output_tokens": r.randint(1, 3)},
                                      {"voice": "Tingting"},
                                      {"stepaudio": {"speculative": r.random() < 0.5}},
                                      {"type": "realtime", "output_modalities": ["text"]}])
        elif t == "input_audio_buffer.append":
            pcm = bytes(r.randrange(0, 256) for _ in range(2 * r.randint(1, 480)))
            ev["audio"] = base64.b64encode(pcm).decode()
        elif t == "conversation.item.create":
            ev["item"] = {"type": "message", "role": r.choice(["user", "system"]),
                          "content": [{"type": "input_text", "text": self._text() or "hi"}]}
        elif t in ("conversation.item.truncate", "conversation.item.delete",
                   "conversation.item.retrieve"):
            ev["item_id"] = f"item_{r.randint(0, 3)}"
            if t == "conversation.item.truncate":
                ev["audio_end_ms"] = r.randint(0, 500)
        elif t == "response.create":
            ev["response"] = {"max_output_tokens": r.randint(1, 2), "metadata": {"k": "v"}}
        return ev

    def malformed(self) -> tuple[str | bytes, str | None]:
        r = self.r
        eid = self._id()
        kind = r.randrange(12)
        if kind == 0:
            return r.choice(["{", "[1,2", "nul", '{"type": }', "\x00", "{'a': 1}"]), None
        if kind == 1:
            return json.dumps(r.choice([[], 1, "s", None, True])), None
        if kind == 2:
            return json.dumps({"type": r.choice(["nope", "response.audio.delta", "x" * 300, ""]),
                               "event_id": eid}), eid
        if kind == 3:  # an unknown field
            ev = self.valid()
            ev["event_id"] = eid
            ev[r.choice(["foo", "x" * 20000, "sesion"])] = 1
            return json.dumps(ev), eid
        if kind == 4:  # a wrong type
            return json.dumps({"type": "conversation.item.truncate", "event_id": eid,
                               "item_id": 5, "audio_end_ms": "9"}), eid
        if kind == 5:
            return json.dumps({"type": "input_audio_buffer.append", "event_id": eid,
                               "audio": r.choice(["!!!", "AAA", "A" * 5])}), eid
        if kind == 6:  # a lone surrogate, escaped as JSON allows
            where = r.choice(["instructions", "voice", "text"])
            s = r.choice(SURROGATES)
            if where == "text":
                obj: dict[str, Any] = {"type": "conversation.item.create", "event_id": eid,
                                       "item": {"type": "message", "role": "user", "content": [
                                           {"type": "input_text", "text": "a@@S@@"}]}}
            else:
                obj = {"type": "session.update", "event_id": eid, "session": {where: "@@S@@"}}
            body = json.dumps(obj).replace("@@S@@", s)  # the escape as written, not decoded
            return body, eid
        if kind == 7:  # strings past their bounds
            return json.dumps(r.choice([
                {"type": "session.update", "event_id": eid, "session": {"voice": "v" * 20000}},
                {"type": "conversation.item.delete", "event_id": eid, "item_id": "i" * 20000},
                {"type": "response.create", "event_id": eid,
                 "response": {"metadata": {f"k{i}": "v" for i in range(40)}}}])), eid
        if kind == 8:
            return "[" * 5000 + "]" * 5000, None
        if kind == 9:
            return json.dumps({"type": "session.update", "event_id": eid, "session": {
                "turn_detection": {"silence_duration_ms": 10 ** 30}}}), eid
        if kind == 10:
            return bytes(r.randrange(256) for _ in range(r.randint(1, 64))) + b"\xff", None
        return json.dumps({"type": "conversation.item.create", "event_id": eid,
                           "item": {"type": "function_call", "role": "user"}}), eid


class Tally:
    def __init__(self) -> None:
        self.sent = 0
        self.malformed = 0
        self.malformed_ids: set[str] = set()
        self.anonymous_malformed = 0
        self.errors = 0
        self.error_ids: set[str] = set()
        self.codes: collections.Counter[str] = collections.Counter()
        self.events = 0
        self.closes: collections.Counter[str] = collections.Counter()
        self.alive = 0


async def session(url: str, gen: Generator, count: int, tally: Tally, headers: list) -> None:
    try:
        ws = await connect(url, max_size=None, additional_headers=headers)
    except Exception as err:  # noqa: BLE001 - counted, not fatal to the run
        tally.closes[f"handshake failed: {type(err).__name__}"] += 1
        return
    probe_seen = asyncio.Event()

    async def read() -> None:
        async for message in ws:
            tally.events += 1
            event = json.loads(message)
            if event["type"] == "error":
                tally.errors += 1
                tally.codes[event["error"]["code"]] += 1
                if event["error"].get("event_id"):
                    tally.error_ids.add(event["error"]["event_id"])
            if event["type"] == "session.updated" and \
                    event["session"].get("instructions") == "still here":
                probe_seen.set()

    reader = asyncio.get_running_loop().create_task(read())
    try:
        await ws.send(json.dumps({"type": "session.update", "session": {
            "max_output_tokens": 2, "stepaudio": {"speculative": False}}}))
        for _ in range(count):
            if gen.r.random() < 0.45:
                message, eid = gen.malformed()
                tally.malformed += 1
                if eid is None:
                    tally.anonymous_malformed += 1
                else:
                    tally.malformed_ids.add(eid)
            else:
                message = json.dumps(gen.valid())
            await ws.send(message)
            tally.sent += 1
            if tally.sent % 8 == 0:
                await asyncio.sleep(0.001)
        await ws.send(json.dumps({"type": "session.update",
                                  "session": {"instructions": "still here"}}))
        await asyncio.wait_for(probe_seen.wait(), 120)
        tally.alive += 1
        await ws.close()
    except (ConnectionClosed, TimeoutError) as err:
        code = getattr(getattr(err, "rcvd", None), "code", None)
        tally.closes[f"{type(err).__name__} {code}"] += 1
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        if ws.close_code is not None:
            tally.closes[str(ws.close_code)] += 1


async def run(url: str, args: argparse.Namespace) -> Tally:
    tally = Tally()
    per, extra = divmod(args.events, args.sessions)
    duplicates = [[], [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")],
                  [("Cookie", "a=1"), ("Cookie", "b=2")],
                  [("OpenAI-Beta", "realtime=v1"), ("OpenAI-Beta", "x=1")]]
    await asyncio.gather(*(session(url, Generator(args.seed * 1000 + i), per + (i < extra), tally,
                                   duplicates[i % len(duplicates)])
                           for i in range(args.sessions)))
    return tally


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=10000)
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    log = Path(tempfile.mkdtemp(prefix="fuzz-loopback-")) / "server.log"
    srv = SpawnedServer(None, {"session": {"max_output_tokens": 2}}, log)
    try:
        srv.wait_ready()
        t0 = time.perf_counter()
        tally = asyncio.run(run(f"ws://127.0.0.1:{srv.port}/v1/realtime", args))
        took = time.perf_counter() - t0
        server_alive = srv.proc.poll() is None
    finally:
        srv.stop()
    text = log.read_text(errors="replace")
    answered = len(tally.malformed_ids & tally.error_ids)
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"seed {args.seed}, {took:.1f} s")
    print("| what | count |\n|---|---|")
    rows = [
        ("sessions (4 handshake variants, repeated headers in 3)", args.sessions),
        ("events sent", tally.sent),
        ("malformed events sent", tally.malformed),
        ("malformed with an event_id answered by an error naming it",
         f"{answered} of {len(tally.malformed_ids)}"),
        ("malformed without an event_id (broken JSON, binary)", tally.anonymous_malformed),
        ("error events received", tally.errors),
        ("server events received", tally.events),
        ("sessions still answering at the end", f"{tally.alive} of {args.sessions}"),
        ("connections closed by the server with an error code",
         sum(v for k, v in tally.closes.items() if k not in ("1000",))),
        ("server process alive at the end", server_alive),
        ("tracebacks in the server log", text.count("Traceback")),
    ]
    for what, n in rows:
        print(f"| {what} | {n} |")
    print("\nerror codes: " + ", ".join(f"{k} {v}" for k, v in tally.codes.most_common()))
    if tally.closes:
        print("closes: " + ", ".join(f"{k} {v}" for k, v in tally.closes.items()))
    ok = (server_alive and tally.alive == args.sessions
          and answered == len(tally.malformed_ids) and "Traceback" not in text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
