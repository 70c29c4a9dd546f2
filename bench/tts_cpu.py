"""TTS latency benchmark on CPU (not a test): first audio chunk vs whole-utterance synthesis.

For utterances of 2, 5, 10 and 20 s of audio (TTS-3B forced to write exactly that many tokens:
the tiny model's <|EOT|> is random), in a voice whose features are already cached:
- first chunk: request → first PCM chunk, through the streaming synthesizer (TTS-3B prefill and
  its first ~20 tokens, one flow window, HiFT);
- offline: the reference's way, every token first, then flow and HiFT on the whole utterance;
- streaming total and its real-time factor (wall time / audio seconds).
Goal (issue): first chunk / whole-utterance synthesis <= 0.2; both denominators are printed
(offline synthesis, and the streaming run's own total). ``--mode`` picks the streaming mode
(``tts.streaming``: low-latency, cosyvoice, or both, alternating run by run so that load from
other processes falls on both alike); the first chunk's own
flow + HiFT time and the tokens it waited for are printed too (the rest is TTS-3B).

    python bench/tts_cpu.py [--models DIR] [--repeats 3] [--mode both]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepaudio.llm.engine import SamplingParams  # noqa: E402
from stepaudio.tts.prompt import VOCODER_FOLDER, build_tts_prompt_ids  # noqa: E402
from stepaudio.tts.sampling import AudioTokenFilter  # noqa: E402
from stepaudio.tts.stream_modes import open_token2wav  # noqa: E402
from stepaudio.tts.streaming import offline_wav  # noqa: E402
from stepaudio.tts.synthesizer import Synthesizer, SynthOptions  # noqa: E402

TEXT = "今天天气很好我们一起去公园散步吧。"  # one clause: one TTS request


class ForcedLength:
    """Engine wrapper: every request writes exactly ``n`` tokens (no stop id)."""

    def __init__(self, engine, n: int) -> None:
        self.engine, self.n = engine, n
        self.name = engine.name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len

    def generate(self, prompt, params: SamplingParams | None = None, *, request_id=None):
        params = (params or SamplingParams()).replace(max_new_tokens=self.n, stop_token_ids=())
        return self.engine.generate(prompt, params, request_id=request_id)

    async def aclose(self) -> None:
        pass


async def first_chunk_and_total(synth: Synthesizer, voice, seed: int
                                ) -> tuple[float, float, float, float, int]:
    """(first chunk s, total s, audio s, first chunk's flow + HiFT ms, tokens it waited for)."""
    t0 = time.perf_counter()
    stream = synth.open(voice, seed)
    stream.push_text(TEXT)
    stream.end_text()
    first = None
    audio = 0.0
    async for chunk in stream:
        if first is None:
            first = time.perf_counter() - t0
        audio += chunk.seconds
    c = stream.report.chunks[0]
    return first or 0.0, time.perf_counter() - t0, audio, c.flow_ms + c.hift_ms, c.tokens[1]


async def offline_time(synth: Synthesizer, engine: ForcedLength, voice, seed: int) -> float:
    t0 = time.perf_counter()
    feats = synth.features(voice, TEXT)
    model = synth.cosyvoice(VOCODER_FOLDER)
    prompt = build_tts_prompt_ids(engine.tokenizer, TEXT, feats.prompt_text, feats.prompt_speaker,
                                  feats.prompt_code)
    _, ids = await engine.generate(prompt, SamplingParams(temperature=0.7, top_p=1.0, top_k=50,
                                                          seed=seed)).collect()
    offline_wav(model, feats, AudioTokenFilter()(ids), seed=seed)
    return time.perf_counter() - t0


async def run(root: Path, repeats: int, modes: tuple[str, ...]) -> None:
    synth = Synthesizer.from_model_root(root, options=SynthOptions(streaming=modes[0]))
    real_engine = synth.engine
    voice = synth.voice("Tingting")
    synth.features(voice, TEXT)  # a cached voice, as in a conversation
    rate = synth.cosyvoice(VOCODER_FOLDER).config.input_frame_rate
    print(f"# TTS first chunk vs offline, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, "
          f"median of {repeats}, modes interleaved run by run, tiny checkpoints")
    print("| audio | mode | first chunk (ms) | its tokens | its flow + HiFT (ms) | offline (ms) "
          "| first / offline | streaming total (ms) | first / streaming total | streaming RTF |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seconds in (2, 5, 10, 20):
        engine = ForcedLength(real_engine, int(round(seconds * rate)))
        synth.engine = engine
        runs: dict[str, list[tuple[float, float, float, float, int]]] = {m: [] for m in modes}
        offs = []
        for r in range(-1, repeats):  # run -1 warms up
            for mode in modes:
                synth.streaming = mode  # the mode new streams are opened in
                result = await first_chunk_and_total(synth, voice, max(r, 0))
                if r >= 0:
                    runs[mode].append(result)
            if r >= 0:
                offs.append(await offline_time(synth, engine, voice, r))
        o = statistics.median(offs)
        for mode in modes:
            f, t, audio, v = (statistics.median(x[i] for x in runs[mode]) for i in range(4))
            tokens = runs[mode][0][4]
            print(f"| {audio:.1f} s | {mode} | {f * 1e3:.0f} | {tokens} | {v:.0f} | {o * 1e3:.0f} "
                  f"| {f / o:.3f} | {t * 1e3:.0f} | {f / t:.3f} | {t / audio:.3f} |")
    synth.engine = real_engine
    vocoder_first_chunk(synth, voice, modes, repeats)
    await synth.aclose()


def vocoder_first_chunk(synth: Synthesizer, voice, modes: tuple[str, ...], repeats: int) -> None:
    """The first chunk's flow + HiFT alone, its tokens already there (no TTS-3B thread running):
    first audio = TTS-3B's time for "its tokens" + this."""
    feats = synth.features(voice, TEXT)
    model = synth.cosyvoice(VOCODER_FOLDER)
    tokens = list(range(0, 5000, 17))[:300]
    times: dict[str, list[float]] = {m: [] for m in modes}
    needed: dict[str, int] = {}
    opts = synth.options
    for r in range(-1, 3 * repeats):
        for mode in modes:
            st = open_token2wav(mode, model, feats, low_latency=opts.stream,
                                cosyvoice=opts.cosyvoice, seed=r)
            n = 0
            while not st.ready():
                st.push(tokens[n: n + 1])
                n += 1
            t0 = time.perf_counter()
            st.next_chunk()
            if r >= 0:
                times[mode].append((time.perf_counter() - t0) * 1e3)
            needed[mode] = n
    print(f"\n# first chunk's flow + HiFT alone, tokens already there, median of {3 * repeats}")
    print("| mode | tokens it waits for | flow + HiFT (ms) |")
    print("|---|---|---|")
    for mode in modes:
        print(f"| {mode} | {needed[mode]} | {statistics.median(times[mode]):.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="model root (default: the tiny checkpoints in the cache)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mode", choices=("low-latency", "cosyvoice", "both"), default="both",
                    help="streaming mode (tts.streaming) to measure")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.models:
        root = Path(args.models)
    else:
        from stepaudio.config import load_config
        from stepaudio.tiny import ensure_tiny_models

        cfg = load_config(None)
        root = ensure_tiny_models(cfg.models.resolved_root(), seed=cfg.models.seed)
    modes = ("low-latency", "cosyvoice") if args.mode == "both" else (args.mode,)
    asyncio.run(run(root, args.repeats, modes))


if __name__ == "__main__":
    main()
