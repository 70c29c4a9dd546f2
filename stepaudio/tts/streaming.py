"""Streaming token → wav: flow and HiFT on overlapping windows whose joins cannot be heard.

The flow (conformer encoder, U-Net estimator with attention and GroupNorm) and HiFT see their
whole input at once, so a chunk computed from part of the tokens differs from the same frames
computed offline, and most at its edges. Each chunk therefore:

1. runs the flow on a window of mel frames ``[committed - left, committed + hop + lookahead)``,
   with the speaker prompt as condition, the encoder given a few tokens more on each side. The
   tokens are placed on the utterance's global mel grid (frame j reads token position
   ``(j + 0.5) / r - 0.5``, ``r`` mel frames per token), so overlapping windows agree on where
   every token is; the initial noise comes from a per-utterance buffer indexed by absolute mel
   frame, so they also start from the same noise;
2. commits the frames up to ``committed + hop``; the first ``mel_xfade`` of them are blended with
   the previous window's look-ahead frames (complementary raised-cosine weights summing to 1);
3. vocodes ``[committed - hift_left, end of window)``: final mel on the left, the new frames, and
   this window's look-ahead frames as provisional right context. The harmonic source continues
   each harmonic's phase from where the previous chunk left it (explicit phase offset) and its
   noise is indexed by absolute sample;
4. emits the audio of the committed frames, its first ``wav_xfade`` samples blended with the
   previous chunk's audio for the same samples.

Window lengths are fixed (first chunk, steady chunks, last chunk), so a GPU can replay a captured
graph per length. When one window covers the whole utterance, the flow input is built exactly as
offline (``flow.conditions``), so a short utterance equals the offline result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from stepaudio.errors import ModelError
from stepaudio.tts.cosyvoice import CosyVoice
from stepaudio.tts.hift import SourceDraws
from stepaudio.tts.speakers import SpeakerFeatures
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
    linear_interp_rows,
    run_now,
)


class Token2WavModels(Protocol):
    """What streaming needs of a vocoder folder (:class:`CosyVoice` or bare modules)."""

    flow: Any
    hift: Any
    device: torch.device


@dataclass(frozen=True)
class StreamOptions:
    """Chunking, in mel frames (86.13 a second at 22.05 kHz / 256) unless named otherwise.

    Defaults: first audio after ~0.19 s of tokens plus a 0.09 s look-ahead (14 tokens); then 0.56 s, then
    ~1.1 s chunks (fewer joins and less prompt overhead once playback has a lead, as CosyVoice
    grows its hop); 0.56 s of flow left context; 8-frame mel and 256-sample wav cross-fades.
    """

    first_frames: int = 16
    hop_frames: int = 48
    max_hop_frames: int = 96
    left_frames: int = 48
    lookahead_frames: int = 8
    mel_xfade: int = 8
    hift_left_frames: int = 16
    wav_xfade: int = 256
    token_margin: int = 2
    n_timesteps: int = 10

    def __post_init__(self) -> None:
        if min(self.first_frames, self.hop_frames) < 1 or self.max_hop_frames < self.hop_frames:
            raise ValueError("first_frames, hop_frames must be >= 1 and max_hop_frames >= hop_frames")
        if not 0 <= self.mel_xfade <= self.lookahead_frames:
            raise ValueError("mel_xfade must be between 0 and lookahead_frames (the blended "
                             "frames come from the previous window's look-ahead)")
        if min(self.left_frames, self.hift_left_frames, self.token_margin, self.wav_xfade) < 0:
            raise ValueError("context sizes must be >= 0")

    @property
    def window_frames(self) -> int:
        """Flow window of a steady chunk (and of the last chunk when the utterance is longer)."""
        return self.left_frames + self.max_hop_frames + self.lookahead_frames

    @property
    def hift_window_frames(self) -> int:
        """HiFT window of a steady chunk. A last chunk takes as much more left context as makes
        its window this long too (when the utterance has that much), so last chunks batch with
        steady ones instead of each having a length of its own."""
        return self.hift_left_frames + self.max_hop_frames + self.lookahead_frames

    def schedule(self) -> list[tuple[int, int]]:
        """(flow window, HiFT window) lengths of the chunks before the steady state, then the
        steady one: the shapes worth a CUDA graph (a last chunk of a long utterance has the steady
        HiFT window; a short utterance's last chunk varies)."""
        out, committed, k = [], 0, 0
        while True:
            hop = self.hop(k)
            flow = committed + hop + self.lookahead_frames - max(0, committed - self.left_frames)
            hift = min(committed, self.hift_left_frames) + hop + self.lookahead_frames
            if (flow, hift) not in out:
                out.append((flow, hift))
            elif committed >= max(self.left_frames, self.hift_left_frames):
                return out
            committed += hop
            k += 1

    def hop(self, chunk: int) -> int:
        """Frames committed by chunk ``chunk`` (0-based): first, hop, then doubling to the max."""
        if chunk == 0:
            return self.first_frames
        return min(self.max_hop_frames, self.hop_frames << min(chunk - 1, 16))


class UtteranceNoise:
    """The utterance's random draws, indexed by absolute position so any window can fetch its
    slice and overlapping windows agree: flow noise per mel frame, source noise per sample,
    prompt-frame noise and the per-harmonic starting phases.

    Generated on the CPU in blocks, each from its own seed, so a slice costs only its blocks and
    the values do not depend on the order windows ask for them (nor on the device).
    """

    BLOCK = 64  # mel frames per block (source blocks are the same span in samples)

    def __init__(self, seed: int, n_mels: int, harmonics: int, samples_per_frame: int,
                 prompt_frames: int) -> None:
        self.seed = int(seed)
        self.n_mels = n_mels
        self.harmonics = harmonics
        self.spf = samples_per_frame
        self._mel: dict[int, torch.Tensor] = {}
        self._src: dict[int, torch.Tensor] = {}
        self.prompt = self._randn(("prompt",), (n_mels, prompt_frames))
        phase = self._rand(("phase",), (1, harmonics, 1)) * (2 * np.pi) - np.pi
        self.phase = phase

    def _gen(self, tag: tuple) -> torch.Generator:
        return tagged_generator(self.seed, tag)

    def _randn(self, tag: tuple, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self._gen(tag))

    def _rand(self, tag: tuple, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.rand(shape, generator=self._gen(tag))

    def mel(self, start: int, end: int) -> torch.Tensor:
        """(n_mels, end - start) flow noise for absolute mel frames [start, end)."""
        return self._slice(self._mel, "mel", self.n_mels, self.BLOCK, start, end)

    def source(self, start: int, end: int) -> torch.Tensor:
        """(harmonics, end - start) source noise for absolute samples [start, end)."""
        return self._slice(self._src, "src", self.harmonics, self.BLOCK * self.spf, start, end)

    def _slice(self, cache: dict[int, torch.Tensor], tag: str, rows: int, block: int, start: int,
               end: int) -> torch.Tensor:
        if end <= start:
            return torch.zeros(rows, 0)
        parts = []
        for b in range(start // block, (end - 1) // block + 1):
            if b not in cache:
                cache[b] = self._randn((tag, b), (rows, block))
            lo = max(start, b * block) - b * block
            hi = min(end, (b + 1) * block) - b * block
            parts.append(cache[b][:, lo:hi])
        return torch.cat(parts, dim=1)

    def forget_before(self, frame: int) -> None:
        """Drop blocks no window can ask for again (long replies stay bounded in memory)."""
        for cache, block in ((self._mel, self.BLOCK), (self._src, self.BLOCK * self.spf)):
            limit = frame * (1 if cache is self._mel else self.spf) // block
            for b in [b for b in cache if b < limit]:
                del cache[b]

    def offline(self, mel_frames: int) -> tuple[torch.Tensor, SourceDraws]:
        """The same draws for a whole-utterance (offline) run: flow noise (1, 80, prompt + T) and
        source draws for T frames, so offline and streaming output can be compared."""
        noise = torch.cat([self.prompt, self.mel(0, mel_frames)], dim=1).unsqueeze(0)
        draws = SourceDraws(self.phase.clone(), self.source(0, mel_frames * self.spf).unsqueeze(0))
        return noise, draws


def speaker_on_device(flow: Any, speaker: SpeakerFeatures, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt tokens (1, T1), projected speaker embedding (1, 80), prompt mel (1, T, 80)) on
    the device. A stream makes them on first use: by whichever thread runs the chunks (the
    vocoder's, on its own CUDA stream), never the event loop that creates the stream."""
    with torch.inference_mode():
        emb = speaker.embedding.to(device, dtype)
        return (speaker.prompt_token.reshape(1, -1).to(device),
                flow.spk_embed_affine_layer(F.normalize(emb, dim=1)),
                speaker.prompt_feat.to(device))


def tagged_generator(seed: int, tag: tuple) -> torch.Generator:
    """A CPU generator for one named draw of an utterance (seed and tag), independent of every
    other draw, so draws can be made in any order and on any device."""
    words = [seed & 0xFFFFFFFF] + [hash_word(str(t)) for t in tag]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def hash_word(text: str) -> int:
    """A stable 32-bit word (Python's hash() is salted per process)."""
    import zlib

    return zlib.crc32(text.encode())


def raised_cosine(n: int) -> torch.Tensor:
    """Fade-in weights w (fade-out is 1 - w): sums to exactly 1 at every sample, so a join of two
    equal signals is that signal (the hamming halves of CosyVoice add up to about 1.08)."""
    if n <= 0:
        return torch.zeros(0)
    i = torch.arange(n, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(math.pi * (i + 0.5) / n)).float()


@dataclass
class ChunkStats:
    """What one chunk cost and covered (for benchmarks and logs)."""

    index: int
    frames: tuple[int, int]
    window: tuple[int, int]
    tokens: tuple[int, int]
    flow_ms: float
    hift_ms: float
    final: bool


@dataclass
class _State:
    committed: int = 0  # mel frames (and audio frames) emitted so far
    chunks: int = 0
    mel_tail: torch.Tensor | None = None  # previous window's frames [committed, +mel_xfade)
    mel_hist: torch.Tensor = field(default_factory=lambda: torch.zeros(80, 0))
    wav_tail: torch.Tensor | None = None  # previous chunk's audio for [committed·spf, +wav_xfade)
    phase: np.ndarray | None = None  # per-harmonic phase (cycles) at sample committed·spf


class StreamingToken2Wav(TokenFeed):
    """One utterance: ``push(flow tokens)``, ``finish()``; each ``next_chunk()`` computes one chunk.

    Not thread-safe; one utterance is driven by one caller. ``ready()`` says whether a chunk can
    be computed now, so a caller can check for cancellation between chunks.
    """

    def __init__(self, model: Token2WavModels, speaker: SpeakerFeatures,
                 options: StreamOptions | None = None, seed: int = 0, solver: Solver | None = None,
                 decode: DecodeFn | None = None, encode: EncodeFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.flow = model.flow
        self.hift = model.hift
        self.opt = options or StreamOptions()
        self.speaker = speaker
        self.device = model.device
        self.dtype = self.flow.dtype
        self.spf = self.hift.samples_per_frame()
        self.stats: list[ChunkStats] = []
        self._s = _State()
        n_mels = self.flow.output_size
        self._s.mel_hist = torch.zeros(n_mels, 0)
        self.mel_len1 = int(speaker.prompt_feat.shape[1])
        self.noise = UtteranceNoise(seed, n_mels, self.hift.harmonics, self.spf, self.mel_len1)
        self._s.phase = np.zeros(self.hift.harmonics)
        self._run_alone = AloneRunner(model, self.opt.n_timesteps, solver, decode, encode)
        conf = self.flow.mel_feat_conf
        # mel frames per token, exactly as the flow's own length rule computes it
        self.r = float(conf["sampling_rate"]) / float(conf["hop_size"]) / self.flow.input_frame_rate
        self._on_device: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _speaker(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The speaker on the device, made on first use (see :func:`speaker_on_device`)."""
        if self._on_device is None:
            self._on_device = speaker_on_device(self.flow, self.speaker, self.device, self.dtype)
        return self._on_device

    @property
    def total_frames(self) -> int:
        """Mel frames of the tokens so far (the offline length once finished)."""
        return self.flow.mel_frames(len(self.tokens))

    @property
    def committed_frames(self) -> int:
        return self._s.committed

    @property
    def done(self) -> bool:
        return self.finished and self._s.committed >= self.total_frames

    def _pos(self, frame: int | torch.Tensor) -> float | torch.Tensor:
        """Token position of a mel frame on the utterance's grid."""
        return (frame + 0.5) / self.r - 0.5

    def _tokens_needed(self, end_frame: int) -> int:
        """Tokens that must exist before frames [.., end_frame) have their full token context."""
        return int(math.floor(self._pos(end_frame - 1))) + 2 + self.opt.token_margin

    def _next_commit(self) -> int:
        return self._s.committed + self.opt.hop(self._s.chunks)

    def ready(self) -> bool:
        """True when ``next_chunk()`` has work: a full chunk's tokens (with look-ahead) are here,
        or the utterance is finished and frames remain."""
        if self.finished:
            return self._s.committed < self.total_frames
        end = self._next_commit() + self.opt.lookahead_frames
        return len(self.tokens) >= self._tokens_needed(end)

    # -- computing -----------------------------------------------------------------------------
    def next_chunk(self) -> np.ndarray:
        """Compute the next chunk now, alone; float32 PCM at the model's sample rate (may be
        empty)."""
        return run_now(self.chunk_work(), self._run_alone)

    def chunk_work(self) -> ChunkWork:
        """The next chunk as model requests (see :mod:`stepaudio.tts.vocoder_work`): a scheduler
        may run its requests together with other streams'. The stream's state moves on only
        when the generator returns; drive one chunk at a time."""
        if not self.ready():
            raise ModelError("streaming token2wav: no chunk is ready")
        s, opt = self._s, self.opt
        total = self.total_frames
        commit = self._next_commit()
        # Once the tokens are complete, the rest goes out as soon as one steady-size window
        # (left context included) covers it.
        final = self.finished and total - max(0, s.committed - opt.left_frames) <= opt.window_frames
        if final:
            commit = total
            j1 = total
            j0 = max(0, min(s.committed - opt.left_frames, total - opt.window_frames))
        else:
            j1 = commit + opt.lookahead_frames
            j0 = max(0, s.committed - opt.left_frames)
        whole = final and j0 == 0 and s.chunks == 0
        t0 = time.perf_counter()
        mel, (a, c) = yield from self._flow_window(j0, j1, whole)
        t1 = time.perf_counter()
        final_mel = self._blend_mel(mel, j0, commit)
        wav = yield from self._vocode(final_mel, mel, j0, j1, commit, final)
        t2 = time.perf_counter()
        self.stats.append(ChunkStats(s.chunks, (s.committed, commit), (j0, j1), (a, c),
                                     (t1 - t0) * 1e3, (t2 - t1) * 1e3, final))
        # carry state to the next chunk
        keep = mel[:, commit - j0: commit - j0 + opt.mel_xfade]
        s.mel_tail = None if final else keep.clone()
        hist = torch.cat([s.mel_hist, final_mel], dim=1)
        s.mel_hist = hist[:, max(0, hist.shape[1] - opt.hift_window_frames):].clone()
        s.committed = commit
        s.chunks += 1
        self.noise.forget_before(max(0, commit - max(opt.left_frames, opt.hift_window_frames) - 1))
        return wav

    def _flow_window(self, j0: int, j1: int, whole: bool
                     ) -> Generator[Request, torch.Tensor, tuple[torch.Tensor, tuple[int, int]]]:
        """Mel (80, j1 - j0) float32 on the CPU for absolute frames [j0, j1), and the token
        range used. A whole-utterance window is built exactly as offline (``flow.conditions``).
        No ``inference_mode`` block spans a ``yield``: the mode is per thread, and the requests
        run wherever the driver runs them (every model call itself runs in inference mode)."""
        flow, dtype, dev = self.flow, self.dtype, self.device
        n_tok = len(self.tokens)
        if whole:
            a, c = 0, n_tok
            x = yield from self._offline_x(self.tokens, flow.mel_frames(n_tok))
        else:
            m = self.opt.token_margin
            a = max(0, int(math.floor(self._pos(j0))) - m)
            c = min(n_tok, int(math.floor(self._pos(j1 - 1))) + 2 + m)
            x = yield from self._window_x(a, c, j0, j1)
        mu = yield Regulate(x)
        length = mu.shape[-1]
        cond = torch.zeros(flow.output_size, length, device=dev, dtype=dtype)
        _, spks, prompt_feat = self._speaker()
        cond[:, : self.mel_len1] = prompt_feat[0].transpose(0, 1).to(dtype)
        noise = torch.cat([self.noise.prompt, self.noise.mel(j0, j1)], dim=1)
        feat = yield Solve(mu, cond, spks[0], noise.to(dev, dtype))
        return feat[:, self.mel_len1:].float().cpu(), (a, c)

    def _offline_x(self, tokens: Sequence[int], frames: int
                   ) -> Generator[Request, torch.Tensor, torch.Tensor]:
        """The length regulator's input for a whole utterance, as ``flow.conditions`` builds it:
        prompt and target features interpolated separately to their mel lengths."""
        tok = torch.tensor(list(tokens), dtype=torch.long, device=self.device)
        prompt_token = self._speaker()[0]
        h = yield Encode(torch.cat([prompt_token[0], tok]))
        n1 = prompt_token.shape[1]
        x1 = interpolate_to(h[:n1].transpose(0, 1), self.mel_len1)
        x2 = interpolate_to(h[n1:].transpose(0, 1), frames)
        return torch.cat([x1, x2], dim=1)

    def _window_x(self, a: int, c: int, j0: int, j1: int
                  ) -> Generator[Request, torch.Tensor, torch.Tensor]:
        """The length regulator's input for tokens [a, c), the target part placed on the global
        grid for frames [j0, j1): (80, mel_len1 + j1 - j0)."""
        dev = self.device
        tok = torch.tensor(self.tokens[a:c], dtype=torch.long, device=dev)
        prompt_token = self._speaker()[0]
        h = yield Encode(torch.cat([prompt_token[0], tok]))
        n1 = prompt_token.shape[1]
        x1 = interpolate_to(h[:n1].transpose(0, 1), self.mel_len1)
        frames = torch.arange(j0, j1, device=dev, dtype=torch.float64)
        x2 = linear_interp_rows(h[n1:], self._pos(frames) - a).transpose(0, 1)
        return torch.cat([x1, x2], dim=1)

    def _blend_mel(self, mel: torch.Tensor, j0: int, commit: int) -> torch.Tensor:
        """Final mel for [committed, commit): this window's frames, the first ones cross-faded
        with the previous window's look-ahead frames."""
        s = self._s
        out = mel[:, s.committed - j0: commit - j0].clone()
        if s.mel_tail is not None:
            n = min(s.mel_tail.shape[1], out.shape[1])
            w = raised_cosine(n)
            out[:, :n] = w * out[:, :n] + (1 - w) * s.mel_tail[:, :n]
        return out

    def _vocode(self, final_mel: torch.Tensor, window_mel: torch.Tensor, j0: int, j1: int,
                commit: int, final: bool) -> Generator[Request, torch.Tensor, np.ndarray]:
        """HiFT on [committed - left, j1): history, new final frames, provisional look-ahead
        (a last chunk: as much history as makes a steady-length window)."""
        s, opt, spf, hift = self._s, self.opt, self.spf, self.hift
        left = opt.hift_left_frames
        if final:
            left = max(left, opt.hift_window_frames - final_mel.shape[1])
        hist = s.mel_hist[:, max(0, s.mel_hist.shape[1] - left):]
        parts = [hist, final_mel]
        if not final:
            parts.append(window_mel[:, commit - j0: j1 - j0])
        mel_in = torch.cat(parts, dim=1)
        h0 = s.committed - hist.shape[1]
        dev = next(hift.parameters()).device
        mel_t = mel_in.to(dev)
        f0 = yield PredictF0(mel_t)  # (L,)
        k = np.arange(1, hift.harmonics + 1, dtype=np.float64)
        f0_np = f0.double().cpu().numpy()
        left = s.committed - h0
        cycles_per_hz = spf * k / float(hift.sampling_rate)
        phase0 = (s.phase - cycles_per_hz * f0_np[:left].sum()) % 1.0
        noise = self.noise.source(h0 * spf, (h0 + mel_in.shape[1]) * spf)
        draws = SourceDraws(self.noise.phase, noise.unsqueeze(0))
        p0 = torch.from_numpy(phase0).float().view(1, -1, 1)
        with torch.inference_mode():
            source = hift.source(f0[None], draws, phase0=p0)
        wav = (yield Decode(mel_t, source.view(-1))).float().cpu()
        start, end = left * spf, (commit - h0) * spf
        out = wav[start:end].clone()
        if s.wav_tail is not None:
            n = min(s.wav_tail.shape[0], out.shape[0])
            w = raised_cosine(n)
            out[:n] = w * out[:n] + (1 - w) * s.wav_tail[:n]
        s.wav_tail = None if final else wav[end: end + opt.wav_xfade].clone()
        s.phase = (s.phase + cycles_per_hz * f0_np[left: commit - h0].sum()) % 1.0
        return out.numpy()


def offline_wav(model: CosyVoice, speaker: SpeakerFeatures, tokens: Sequence[int], seed: int = 0,
                n_timesteps: int = 10) -> np.ndarray:
    """The reference's whole-utterance token→wav with this utterance's random draws (the
    comparison point for streaming)."""
    noise_src = UtteranceNoise(seed, model.flow.output_size, model.hift.harmonics,
                               model.hift.samples_per_frame(), int(speaker.prompt_feat.shape[1]))
    tok = torch.tensor([list(tokens)], dtype=torch.long)
    noise, draws = noise_src.offline(model.flow.mel_frames(len(tokens)))
    with torch.inference_mode():
        mel = model.token_to_mel(tok, speaker.prompt_token, speaker.prompt_feat, speaker.embedding,
                                 noise=noise)
        wav, _ = model.hift.inference(mel.to(next(model.hift.parameters()).device), draws)
    return wav[0].float().cpu().numpy()


def stream_wav(model: CosyVoice, speaker: SpeakerFeatures, tokens: Sequence[int], seed: int = 0,
               options: StreamOptions | None = None, push_every: int = 1
               ) -> tuple[np.ndarray, StreamingToken2Wav]:
    """Streaming token→wav of known tokens, fed ``push_every`` at a time as an LM would."""
    st = StreamingToken2Wav(model, speaker, options, seed)
    chunks: list[np.ndarray] = []
    for i in range(0, len(tokens), max(1, push_every)):
        st.push(tokens[i: i + push_every])
        chunks += st.drain()
    st.finish()
    chunks += st.drain()
    wav = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return wav.astype(np.float32), st
