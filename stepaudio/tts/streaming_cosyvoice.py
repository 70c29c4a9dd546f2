"""Streaming token → wav by CosyVoice's own recipe, step for step as its streaming code does it.

Source: FunAudioLLM/CosyVoice at commit ffa28e3 (2024-09-29): ``cosyvoice/cli/model.py``
(``CosyVoiceModel.tts(stream=True)`` and ``token2wav``), ``cosyvoice/flow/length_regulator.py``
(``InterpolateRegulator.inference``) and ``cosyvoice/utils/common.py`` (``fade_in_out``). It is
the last version before CosyVoice gave its flow a ``flow_cache`` (merged 2024-10-16), which the
flow and CFM that Step-Audio ships do not have, and its HiFT interface
(``inference(mel=, cache_source=)``) is the one Step-Audio ships. This is the recipe the
CosyVoice-300M vocoders were published with; tests/fixtures/cosyvoice_stream holds that code's
output on the tiny checkpoints, which this module reproduces.

The recipe, in flow tokens (Step-Audio: 125/3 a second) and mel frames (22050/256 a second):

1. Chunk k runs the flow on tokens ``[start, start + hop + overlap)`` with the speaker prompt and
   fresh noise (hop = int(2 s × rate) = 83 tokens, overlap 20); the next chunk starts ``hop``
   tokens later (the hop grows by ``stream_scale_factor``, 1 as shipped, up to 4 s). Once the
   tokens are complete and fewer than hop + overlap remain, the rest is one last chunk.
2. In every flow call the length regulator interpolates the first and the last 20 tokens to
   int(20 / rate × 22050 / 256) = 41 frames each and the middle to the rest, so the 20 tokens two
   chunks share map to the same 41 frames in both.
3. The chunk's first 41 mel frames are cross-faded (Hamming halves) with the previous chunk's
   last 41, which were held back; its own last 41 are held back in turn.
4. HiFT runs on the previous chunk's last 20 mel frames followed by this chunk's; the first
   20 × 256 samples of its excitation are replaced by the previous chunk's last 20 × 256, the
   first 20 × 256 samples of its audio are cross-faded (Hamming halves) with the previous chunk's
   held-back last 20 × 256, and its own last 20 × 256 are held back (the last chunk keeps none).

So the first audio waits for hop + overlap = 103 tokens (2.5 s of speech) and each chunk after
it for 83 more. The Hamming halves sum to 1.08 mid-join, not 1: that is the recipe.

The model calls are the requests of :mod:`stepaudio.tts.vocoder_work`, as in
:class:`~stepaudio.tts.streaming.StreamingToken2Wav`, so a scheduler can batch both modes; the
fades, the excitation and the caches are generator-side work.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from stepaudio.errors import ModelError
from stepaudio.tts.hift import SourceDraws
from stepaudio.tts.speakers import SpeakerFeatures
from stepaudio.tts.streaming import (
    ChunkStats,
    Token2WavModels,
    speaker_on_device,
    tagged_generator,
)
from stepaudio.tts.token_feed import TokenFeed
from stepaudio.tts.vocoder_work import (
    AloneRunner,
    ChunkWork,
    Decode,
    DecodeFn,
    Encode,
    EncodeFn,
    PredictF0,
    Regulate,
    Request,
    Solve,
    Solver,
    interpolate_to,
    run_now,
)


@dataclass(frozen=True)
class CosyVoiceStreamOptions:
    """CosyVoice's streaming constants (``CosyVoiceModel.__init__``), in its own units; the
    defaults are the shipped values."""

    min_hop_seconds: float = 2.0  # token_min_hop_len = 2 × input_frame_rate
    max_hop_seconds: float = 4.0  # token_max_hop_len
    stream_scale_factor: float = 1.0  # hop × this after each chunk (1: a constant hop)
    overlap_tokens: int = 20  # token_overlap_len (and the regulator's head and tail)
    mel_cache_frames: int = 20  # mel_cache_len: HiFT's left context and excitation carried over
    n_timesteps: int = 10

    def __post_init__(self) -> None:
        if not 0 < self.min_hop_seconds <= self.max_hop_seconds:
            raise ValueError("need 0 < min_hop_seconds <= max_hop_seconds")
        if self.stream_scale_factor < 1:
            raise ValueError("stream_scale_factor must be >= 1 (as CosyVoice asserts)")
        if self.overlap_tokens < 1 or self.mel_cache_frames < 1:
            raise ValueError("overlap_tokens and mel_cache_frames must be >= 1 (the recipe "
                             "slices [:-n], which is empty for 0)")


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk: flow tokens [start, end); ``final``: the last chunk (keeps nothing back)."""

    index: int
    start: int
    end: int
    final: bool


@dataclass(frozen=True)
class CosyVoiceWindows:
    """The recipe's sizes for one flow (token rate, mel rate) and HiFT (samples per frame).

    CosyVoice computes the hops as ``2 * input_frame_rate`` and slices the token list with them,
    which only works for an integral rate; here they are ``int()`` of that (83 and 166 tokens at
    125/3 a second), as its own ``int(token_hop_len * stream_scale_factor)`` makes them from the
    second chunk on.
    """

    min_hop: int
    max_hop: int
    scale: float
    overlap: int
    mel_overlap: int
    mel_cache: int
    samples_per_frame: int
    input_frame_rate: float
    sampling_rate: float
    hop_size: float

    @classmethod
    def for_models(cls, flow: Any, hift: Any,
                   options: CosyVoiceStreamOptions | None = None) -> CosyVoiceWindows:
        """The sizes for this flow (its yaml's token rate and mel settings) and HiFT."""
        opt = options or CosyVoiceStreamOptions()
        conf = flow.mel_feat_conf
        rate = float(flow.input_frame_rate)
        sr, hop = float(conf["sampling_rate"]), float(conf["hop_size"])
        min_hop = int(opt.min_hop_seconds * rate)
        win = cls(
            min_hop=min_hop, max_hop=max(min_hop, int(opt.max_hop_seconds * rate)),
            scale=opt.stream_scale_factor, overlap=opt.overlap_tokens,
            mel_overlap=int(opt.overlap_tokens / rate * sr / hop), mel_cache=opt.mel_cache_frames,
            samples_per_frame=int(hift.samples_per_frame()),
            input_frame_rate=rate, sampling_rate=sr, hop_size=hop)
        if min_hop < 1:
            raise ValueError(f"min_hop_seconds gives {min_hop} tokens at {rate:g} a second")
        first_hift = win.mel_frames(min_hop + win.overlap) - win.mel_overlap
        if win.mel_overlap < 1 or first_hift < win.mel_cache:
            raise ValueError(f"windows too small: a first chunk of {first_hift} HiFT frames "
                             f"cannot keep {win.mel_cache} cache frames")
        return win

    @property
    def source_cache(self) -> int:
        """Samples of excitation and audio carried from chunk to chunk."""
        return self.mel_cache * self.samples_per_frame

    def mel_frames(self, n_tokens: int) -> int:
        """The flow's target length for ``n_tokens`` (its own int() truncation)."""
        return int(n_tokens / self.input_frame_rate * self.sampling_rate / self.hop_size)

    def hop(self, chunk: int) -> int:
        """Tokens between the starts of chunk ``chunk`` and the next one."""
        hop = self.min_hop
        for _ in range(chunk):
            hop = min(self.max_hop, int(hop * self.scale))
        return hop

    def max_chunk_tokens(self) -> int:
        """Most tokens one flow call takes: the largest hop the chunks reach, plus the overlap
        (with the shipped scale factor of 1 the hop never grows to ``max_hop``)."""
        k = 0
        while self.hop(k + 1) != self.hop(k):  # non-decreasing and capped: this ends
            k += 1
        return self.hop(k) + self.overlap

    def next_chunk(self, index: int, start: int, available: int, finished: bool
                   ) -> ChunkPlan | None:
        """The chunk that can run now with ``available`` tokens, or None (wait for more)."""
        hop = self.hop(index)
        if available - start >= hop + self.overlap:
            return ChunkPlan(index, start, start + hop + self.overlap, False)
        if finished:
            return ChunkPlan(index, start, available, True)
        return None

    def plan(self, n_tokens: int) -> list[ChunkPlan]:
        """Every chunk of a complete utterance of ``n_tokens``."""
        out: list[ChunkPlan] = []
        start = 0
        while True:
            c = self.next_chunk(len(out), start, n_tokens, True)
            assert c is not None
            out.append(c)
            if c.final:
                return out
            start += self.hop(c.index)

    def emitted_frames(self, chunk: ChunkPlan) -> int:
        """Audio frames a chunk puts out: its flow frames less the held-back overlap; the cache
        frames it holds back replace those it releases, except in the first and last chunk."""
        frames = self.mel_frames(chunk.end - chunk.start)
        if not chunk.final:
            frames -= self.mel_overlap
        if chunk.index > 0:
            frames += self.mel_cache
        if not chunk.final:
            frames -= self.mel_cache
        return frames

    def regulator_segments(self, n_tokens: int) -> list[tuple[int, int]]:
        """(tokens, frames) the length regulator interpolates separately: head, middle and tail
        of ``overlap`` tokens each end when the chunk has more than twice that, else one."""
        frames = self.mel_frames(n_tokens)
        if n_tokens > 2 * self.overlap:
            o, m = self.overlap, self.mel_overlap
            return [(o, m), (n_tokens - 2 * o, frames - 2 * m), (o, m)]
        return [(n_tokens, frames)]

    def graph_shapes(self) -> tuple[list[int], list[int]]:
        """(flow target frames, HiFT frames) of the chunks before the last: the shapes worth a
        captured graph (a last chunk's vary)."""
        flow, hift = [], []
        for k in range(64):
            m = self.mel_frames(self.hop(k) + self.overlap)
            h = m - self.mel_overlap + (self.mel_cache if k else 0)
            if m not in flow:
                flow.append(m)
            if h not in hift:
                hift.append(h)
            if k and self.hop(k) == self.hop(k - 1):
                break
        return flow, hift


class ChunkDraws(Protocol):
    """The random draws of one utterance, per chunk: the flow's initial noise (80, L) and the
    excitation's phases and noise (CosyVoice draws both afresh for every chunk)."""

    def flow_noise(self, chunk: int, shape: tuple[int, int]) -> torch.Tensor: ...

    def source(self, chunk: int, harmonics: int, samples: int) -> SourceDraws: ...


class SeededDraws:
    """Draws from the utterance's seed, each chunk's from its own generator (order- and
    device-independent, so a scheduler may run chunks of many streams in any order)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def flow_noise(self, chunk: int, shape: tuple[int, int]) -> torch.Tensor:
        return torch.randn(shape, generator=tagged_generator(self.seed, ("flow", chunk)))

    def source(self, chunk: int, harmonics: int, samples: int) -> SourceDraws:
        return SourceDraws.sample(1, harmonics, samples,
                                  tagged_generator(self.seed, ("source", chunk)))


def hamming_join(fade_in: torch.Tensor, fade_out: torch.Tensor, window: torch.Tensor
                 ) -> torch.Tensor:
    """CosyVoice's ``fade_in_out``: the first n = len(window) / 2 steps of ``fade_in`` (last
    axis) weighted by the window's rising half, plus the last n of ``fade_out`` by its falling
    half, in float64 as its numpy window makes it; a new tensor in ``fade_in``'s dtype."""
    n = window.shape[0] // 2
    out = fade_in.clone()
    w = window.to(fade_in.device)
    joined = fade_in[..., :n].double() * w[:n] + fade_out[..., -n:].double() * w[n:]
    out[..., :n] = joined.to(out.dtype)
    return out


@dataclass
class _Carry:
    """What a chunk leaves for the next: held-back mel frames and HiFT's cache."""

    mel_overlap: torch.Tensor  # (80, mel_overlap) flow frames to fade into the next chunk
    mel: torch.Tensor  # (80, mel_cache) HiFT input frames repeated as the next one's context
    source: torch.Tensor  # (mel_cache · spf,) excitation the next chunk starts with
    speech: torch.Tensor  # (mel_cache · spf,) audio held back, faded into the next chunk


class CosyVoiceToken2Wav(TokenFeed):
    """One utterance by CosyVoice's recipe: ``push(flow tokens)``, ``finish()``; each
    ``next_chunk()`` computes one chunk (``chunk_work()`` as model requests). Same interface as
    :class:`~stepaudio.tts.streaming.StreamingToken2Wav`; not thread-safe."""

    def __init__(self, model: Token2WavModels, speaker: SpeakerFeatures,
                 options: CosyVoiceStreamOptions | None = None, seed: int = 0,
                 solver: Solver | None = None, decode: DecodeFn | None = None,
                 encode: EncodeFn | None = None, draws: ChunkDraws | None = None) -> None:
        super().__init__()
        self.model = model
        self.flow = model.flow
        self.hift = model.hift
        self.opt = options or CosyVoiceStreamOptions()
        self.win = CosyVoiceWindows.for_models(self.flow, self.hift, self.opt)
        self.speaker = speaker
        self.device = model.device
        self.dtype = self.flow.dtype
        self.spf = self.win.samples_per_frame
        self.draws: ChunkDraws = draws or SeededDraws(seed)
        self.stats: list[ChunkStats] = []
        self._run_alone = AloneRunner(model, self.opt.n_timesteps, solver, decode, encode)
        self._start = 0  # first token of the next chunk
        self._chunks = 0
        self._committed = 0  # audio frames put out
        self._last_done = False
        self._carry: _Carry | None = None
        self._mel_window = torch.from_numpy(np.hamming(2 * self.win.mel_overlap))
        self._speech_window = torch.from_numpy(np.hamming(2 * self.win.source_cache))
        self.mel_len1 = int(speaker.prompt_feat.shape[1])
        self._on_device: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def total_frames(self) -> int:
        """Audio frames of the tokens so far, were they complete (exact once finished)."""
        return sum(self.win.emitted_frames(c) for c in self.win.plan(len(self.tokens)))

    @property
    def committed_frames(self) -> int:
        return self._committed

    @property
    def done(self) -> bool:
        """The last chunk went out (or the utterance ended without a token: nothing to say)."""
        return self._last_done or (self.finished and not self.tokens)

    def _next(self) -> ChunkPlan | None:
        if self.done:
            return None
        return self.win.next_chunk(self._chunks, self._start, len(self.tokens), self.finished)

    def ready(self) -> bool:
        """Whether a chunk can be computed now."""
        return self._next() is not None

    # -- chunks --------------------------------------------------------------------------------
    def next_chunk(self) -> np.ndarray:
        """Compute the next chunk now, each model call alone (float32 PCM, possibly empty)."""
        return run_now(self.chunk_work(), self._run_alone)

    def chunk_work(self) -> ChunkWork:
        """The next chunk as model requests (see :mod:`stepaudio.tts.vocoder_work`). The
        stream's state moves on only when the generator returns; drive one chunk at a time."""
        plan = self._next()
        if plan is None:
            raise ModelError("streaming token2wav: no chunk is ready")
        t0 = time.perf_counter()
        mel = yield from self._flow(self.tokens[plan.start: plan.end], plan.index)
        t1 = time.perf_counter()
        wav, carry, hift_frames = yield from self._vocode(mel, plan)
        t2 = time.perf_counter()
        frames = wav.shape[0] // self.spf
        context = self.win.mel_cache if self._carry is not None else 0
        self.stats.append(ChunkStats(plan.index, (self._committed, self._committed + frames),
                                     (self._committed - context,
                                      self._committed - context + hift_frames),
                                     (plan.start, plan.end), (t1 - t0) * 1e3, (t2 - t1) * 1e3,
                                     plan.final))
        self._carry = carry
        self._committed += frames
        self._chunks += 1
        if plan.final:
            self._last_done = True
        else:
            self._start += self.win.hop(plan.index)
        return wav.numpy()

    def _flow(self, tokens: Sequence[int], chunk: int
              ) -> Generator[Request, torch.Tensor, torch.Tensor]:
        """The flow on one chunk's tokens, prompt first: target mel (80, M) float32."""
        flow, dev, dtype = self.flow, self.device, self.dtype
        if self._on_device is None:  # on the thread that runs the chunks (speaker_on_device)
            self._on_device = speaker_on_device(flow, self.speaker, dev, dtype)
        prompt_token, spks, prompt_feat = self._on_device
        ids = torch.tensor(list(tokens), dtype=torch.long, device=dev)
        h = yield Encode(torch.cat([prompt_token[0], ids]))
        n1 = prompt_token.shape[1]
        parts = [interpolate_to(h[:n1].transpose(0, 1), self.mel_len1)] if n1 else []
        at = n1
        for n, frames in self.win.regulator_segments(len(tokens)):
            parts.append(interpolate_to(h[at: at + n].transpose(0, 1), frames))
            at += n
        mu = yield Regulate(torch.cat(parts, dim=1))
        length = mu.shape[-1]
        cond = torch.zeros(flow.output_size, length, device=dev, dtype=dtype)
        cond[:, : self.mel_len1] = prompt_feat[0].transpose(0, 1)
        noise = self.draws.flow_noise(chunk, (flow.output_size, length)).to(dev, dtype)
        feat = yield Solve(mu, cond, spks[0], noise)
        return feat[:, self.mel_len1:].float()

    def _vocode(self, mel: torch.Tensor, plan: ChunkPlan
                ) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, _Carry | None, int]]:
        """``token2wav`` after the flow: mel fade, HiFT with the cache, audio fade; returns
        (audio to put out, float32 on the CPU; what the next chunk needs; HiFT frames)."""
        win, prev = self.win, self._carry
        if prev is not None:
            mel = hamming_join(mel, prev.mel_overlap, self._mel_window)
            mel = torch.cat([prev.mel, mel], dim=1)
        held = None
        if not plan.final:
            held = mel[:, -win.mel_overlap:].clone()
            mel = mel[:, : -win.mel_overlap]
        f0 = yield PredictF0(mel)
        draws = self.draws.source(plan.index, self.hift.harmonics, mel.shape[1] * self.spf)
        with torch.inference_mode():
            source = self.hift.source(f0[None], draws).reshape(-1)
        source = source.clone()  # a normal tensor: the cached prefix is written into it
        if prev is not None:
            n = min(prev.source.shape[0], source.shape[0])
            source[:n] = prev.source[:n].to(source.device, source.dtype)
        wav = (yield Decode(mel, source)).float().cpu()
        if prev is not None:
            wav = hamming_join(wav, prev.speech, self._speech_window)
        if held is None:
            return wav, None, mel.shape[1]
        keep = win.source_cache
        carry = _Carry(held, mel[:, -win.mel_cache:].clone(), source[-keep:].clone(),
                       wav[-keep:].clone())
        return wav[:-keep], carry, mel.shape[1]
