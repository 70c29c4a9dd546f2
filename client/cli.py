"""``stepaudio client``: talk to a running server from a terminal, with sound files or a microphone.

Files are said one after the other, each as one turn, at real time (or faster with ``--speed``),
followed by silence so the server's voice activity detection ends the turn; the next file waits
for the reply to finish playing, unless ``--interrupt-after`` makes it talk over the reply (a
scripted barge-in). Replies go to a wav file (``-o``), the speaker (``--play``), or nowhere (they
are still played out in real time on a virtual clock, so barge-ins behave as with a speaker).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import sys
import time
from typing import Any

from client.dialogue import Dialogue
from client.playback import Player, Recorder, SpeakerPlayer, import_sounddevice
from client.realtime import (
    EXIT_CODES,
    EXIT_OK,
    ClientError,
    SessionOptions,
    open_connection,
)

DEFAULT_URL = "ws://127.0.0.1:8700/v1/realtime"


def epilog() -> str:
    codes = "\n".join(f"  {code}  {text}" for code, text in EXIT_CODES.items())
    return ("examples:\n"
            "  stepaudio client question.wav -o reply.wav\n"
            "  stepaudio client a.wav b.wav --interrupt-after 800    # b talks over a's reply\n"
            "  stepaudio client --mic --play --url ws://gpu-box:8700/v1/realtime\n\n"
            f"exit status:\n{codes}\n  130  interrupted (Ctrl-C)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``stepaudio client`` (kept here so the main CLI stays a thin dispatcher)."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = epilog()
    p.add_argument("inputs", nargs="*", metavar="AUDIO",
                   help="sound files (wav, flac, mp3; any rate), one turn each")
    p.add_argument("--mic", action="store_true",
                   help="talk through the microphone (needs `pip install sounddevice`)")
    p.add_argument("--url", help=f"server WebSocket URL (default {DEFAULT_URL}, or built from "
                   "--host/--port)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--api-key", help="API key (default: $STEPAUDIO_API_KEY)")
    p.add_argument("-o", "--output", help="write the replies as heard to this wav (24 kHz)")
    p.add_argument("--play", action="store_true",
                   help="play replies on the speaker (needs `pip install sounddevice`)")
    p.add_argument("--speed", type=float, default=1.0,
                   help="send audio this many times faster than real time (default 1)")
    p.add_argument("--chunk-ms", type=int, default=40, help="audio per append (20-100 ms)")
    p.add_argument("--interrupt-after", type=int, metavar="MS",
                   help="start each next file MS after the previous reply's first audio, "
                   "talking over it (barge-in)")
    p.add_argument("--gap-ms", type=int, default=500,
                   help="silence between a reply's end and the next file (default 500)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for each reply (default 60)")
    g = p.add_argument_group("session (sent with session.update; defaults are the server's)")
    g.add_argument("--voice", "--speaker", dest="voice", help="Step-Audio speaker id")
    g.add_argument("--instructions", help="system prompt of the chat model")
    g.add_argument("--instruction", dest="instruction_tags",
                   help="TTS instruction tags before every reply, e.g. '(高兴1)(粤语)'")
    g.add_argument("--vad-threshold", type=float, help="speech probability to start speech")
    g.add_argument("--silence-ms", type=int, help="silence that ends a turn")
    g.add_argument("--prefix-padding-ms", type=int, help="audio kept before the speech start")
    g.add_argument("--pause-ms", type=int, help="silence that starts a speculative reply")
    g.add_argument("--min-barge-in-ms", type=int, help="speech this long interrupts the bot")
    g.add_argument("--max-output-tokens", type=int,
                   help="longest reply in text tokens (1-4096; default: unlimited)")
    g.add_argument("--no-speculation", action="store_true", help="no speculative replies")
    p.add_argument("-v", "--verbose", action="store_true", help="also print other events")


def _url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url
    return f"ws://{args.host}:{args.port}/v1/realtime"


def _options(args: argparse.Namespace) -> SessionOptions:
    return SessionOptions(
        voice=args.voice, instructions=args.instructions, instruction_tags=args.instruction_tags,
        vad_threshold=args.vad_threshold, silence_ms=args.silence_ms,
        prefix_padding_ms=args.prefix_padding_ms, pause_ms=args.pause_ms,
        min_barge_in_ms=args.min_barge_in_ms,
        speculative=False if args.no_speculation else None,
        max_output_tokens=args.max_output_tokens)


async def _say_files(d: Dialogue, files: list, args: argparse.Namespace) -> None:
    """Each file is one turn; the next waits for the reply (or interrupts it)."""
    started = 0.0
    for i, speech in enumerate(files):
        if i:
            if args.interrupt_after is not None:
                await d.wait_for(functools.partial(d.reply_audio_since, started),
                                 args.timeout, f"the reply to {args.inputs[i - 1]}")
                await asyncio.sleep(args.interrupt_after / 1000.0)
            else:
                await d.wait_for(functools.partial(d.reply_finished_since, started),
                                 args.timeout, f"the reply to {args.inputs[i - 1]}")
                await asyncio.sleep(args.gap_ms / 1000.0)
        started = time.monotonic()
        d.say("you", f"saying {args.inputs[i]} ({speech.size / 24000:.1f} s)")
        d.queue_speech(speech)
        await d.drained.wait()
    await d.wait_for(lambda: d.reply_finished_since(started), args.timeout,
                     f"the reply to {args.inputs[-1]}")


async def run(args: argparse.Namespace) -> int:
    from client.sources import load_speech, microphone

    if not args.inputs and not args.mic:
        raise ClientError("nothing to say: give sound files, or --mic")
    if args.inputs and args.mic:
        raise ClientError("give sound files or --mic, not both")
    if not 0.1 <= args.speed <= 20:
        raise ClientError("--speed must be between 0.1 and 20")
    files = [load_speech(f) for f in args.inputs]
    if args.mic:  # fail on a missing sounddevice before connecting, not after
        import_sounddevice("microphone input (--mic)")
    recorder = Recorder(args.output) if args.output else None
    player = SpeakerPlayer(recorder) if args.play else Player(recorder)
    api_key = args.api_key if args.api_key is not None else os.environ.get("STEPAUDIO_API_KEY")
    try:
        conn = await open_connection(_url(args), api_key or None, timeout_s=10.0)
    except BaseException:
        player.close()
        raise
    d = Dialogue(conn, player, chunk_ms=args.chunk_ms, speed=args.speed, verbose=args.verbose)
    d.handle(conn.first_event)
    update = _options(args).update_event()
    if update is not None:
        await conn.send(update)
    stop = asyncio.Event()
    reader = asyncio.create_task(d.read())
    if args.mic:
        sender = asyncio.create_task(d.send_stream(microphone(args.chunk_ms)))
        d.say("you", "listening to the microphone; Ctrl-C ends the session")
        script: asyncio.Task[Any] = asyncio.create_task(asyncio.Event().wait())
    else:
        sender = asyncio.create_task(d.send_paced(stop))
        script = asyncio.create_task(_say_files(d, files, args))
    try:
        done, _ = await asyncio.wait({reader, sender, script}, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a ClientError from any of them ends the session with its status
    finally:
        stop.set()
        for task in (script, sender, reader):
            task.cancel()
        for task in (script, sender, reader):
            with contextlib.suppress(BaseException):
                await task
        with contextlib.suppress(Exception):
            await conn.close()
        player.close()
    d.say("done", d.summary() + (f"; replies written to {args.output}" if args.output else ""))
    return EXIT_OK


def main(args: argparse.Namespace) -> int:
    """Run the client; every expected failure is one line on stderr and a documented status."""
    try:
        return asyncio.run(run(args))
    except ClientError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130


def standalone(argv: list[str] | None = None) -> int:
    """``python -m client.cli``: the same client without the ``stepaudio`` dispatcher."""
    p = argparse.ArgumentParser(prog="stepaudio client", description=__doc__.splitlines()[0])
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(standalone())
