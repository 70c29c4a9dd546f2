"""CUDA graphs for the flow's 10 Euler steps and for HiFT, one per window length.

Why: the flow estimator at CosyVoice-300M sizes launches a few thousand small kernels per call
(16 ResNet stages and 64 transformer blocks, twice for guidance, ten times); eagerly, a call costs
hundreds of milliseconds whatever the length, so a short streaming chunk would cost as much as a
long one. Captured once per input length and replayed, a call costs what its arithmetic costs.

Streaming windows have a few fixed lengths (:meth:`StreamOptions.window_lengths`), so only those
are captured, ahead of time by :meth:`GraphedSolver.warm`, and replayed; any other length (a short
utterance's single window) runs eagerly rather than paying a capture on the request path. Each
graph keeps its own memory pool and static input/output buffers; replays are never concurrent
(one model thread), and outputs are copied out before the next replay.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class _GraphCache:
    """Captured graphs keyed by an input length; an LRU bounded by ``max_graphs``."""

    def __init__(self, fn: Callable[..., torch.Tensor], max_graphs: int = 16, warmup: int = 2,
                 capture_any: bool = False, pool: Any = None) -> None:
        self.fn = fn
        self.max_graphs = max_graphs
        self.warmup = warmup
        self.capture_any = capture_any
        #: A memory pool shared with other graphs that never run at the same time (their outputs
        #: are copied out before the next replay), or None for a pool of its own.
        self.pool = pool
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.allowed: set[tuple] = set()
        self.failed: set[tuple] = set()
        self.replays = 0
        self.eager_calls = 0

    def run(self, key: tuple, *inputs: torch.Tensor) -> torch.Tensor:
        g = self.graphs.get(key)
        if g is None and (self.capture_any or key in self.allowed) and key not in self.failed:
            g = self.capture(key, inputs)
        if g is None:
            self.eager_calls += 1
            return self.fn(*inputs)
        self.graphs.move_to_end(key)
        for static, x in zip(g.inputs, inputs, strict=True):
            static.copy_(x)
        g.graph.replay()
        self.replays += 1
        return g.output

    def capture(self, key: tuple, inputs: Iterable[torch.Tensor]) -> _Graph | None:
        statics = tuple(x.detach().clone() for x in inputs)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.fn(*statics)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: TTS-3B may be decoding on this device from another thread meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = self.fn(*statics)
        except Exception as err:  # capture is an optimisation: fall back to eager, say so once
            log.warning("cuda graph capture failed for %s (%s); running eagerly", key, err)
            self.failed.add(key)
            return None
        g = _Graph(graph, statics, out)
        self.graphs[key] = g
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return g


class GraphedEncoder:
    """The flow's token encoder (embedding, conformer, projection) replayed per token count.

    Token counts of streaming windows vary by a token or two, and a capture costs about three
    eager runs of this small part, so any count is captured on first use (LRU-bounded).
    """

    def __init__(self, flow: torch.nn.Module, max_graphs: int = 32) -> None:
        self.flow = flow
        dev = flow.encoder_proj.weight.device
        for mod in flow.encoder.modules():  # relative-position tables: keep them on the device
            pe = getattr(mod, "_pe", None)
            if isinstance(pe, torch.Tensor) and pe.device != dev:
                mod._pe = pe.to(dev)

        @torch.inference_mode()
        def encode(ids: torch.Tensor) -> torch.Tensor:
            return flow.encoder_proj(flow.encoder(flow.input_embedding(torch.clamp(ids, min=0))))

        self.cache = _GraphCache(encode, max_graphs, capture_any=True)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.device.type != "cuda":
            return self.cache.fn(ids)
        return self.cache.run((int(ids.shape[-1]),), ids)


class GraphedSolver:
    """Drop-in ``Solver`` for :class:`StreamingToken2Wav`: (mu, mask, spks, cond, noise) → mel."""

    def __init__(self, flow: torch.nn.Module, n_timesteps: int = 10, max_graphs: int = 16,
                 fast: bool = True, fused_norm: bool = True, compile: bool = False) -> None:
        """``fast``: the fewer-kernel estimator (:mod:`estimator_fast`; windows are unpadded, so
        their mask is all ones), ``fused_norm`` with its add+LayerNorm kernel; ``compile``:
        also ``torch.compile`` it (slow to compile: not used by default)."""
        from stepaudio.tts.estimator_fast import FastEstimator, solve_full_mask

        self.flow = flow
        self.n_timesteps = n_timesteps
        cfm = flow.decoder
        estimator: torch.nn.Module = (FastEstimator(cfm.estimator, fused_norm) if fast
                                      else cfm.estimator)
        if compile:
            estimator = torch.compile(estimator, dynamic=True)

        @torch.inference_mode()
        def eager(mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
            return cfm(mu, mask, n_timesteps, 1.0, spks=spks, cond=cond, noise=noise)

        @torch.inference_mode()
        def solve(mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
            if not (fast or compile):
                return eager(mu, mask, spks, cond, noise)
            return solve_full_mask(cfm, estimator, mu, mask, n_timesteps, spks, cond, noise)

        self.eager = eager
        self.cache = _GraphCache(solve, max_graphs)

    def allow(self, total_lengths: Iterable[int]) -> None:
        """Lengths (prompt frames + window frames) worth a graph."""
        self.cache.allowed.update((int(n),) for n in total_lengths)

    @torch.inference_mode()
    def warm(self, prompt_frames: int, window_lengths: Iterable[int]) -> None:
        """Capture the graphs of one speaker's standard windows now, off the request path."""
        flow = self.flow
        dev, dtype = flow.encoder_proj.weight.device, flow.dtype
        lengths = [prompt_frames + int(w) for w in window_lengths]
        self.allow(lengths)
        for n in lengths:
            if (n,) in self.cache.graphs:
                continue
            c = flow.output_size
            mu = torch.randn(1, c, n, device=dev, dtype=dtype)
            args = (mu, torch.ones(1, 1, n, device=dev, dtype=dtype),
                    torch.randn(1, c, device=dev, dtype=dtype), torch.randn_like(mu),
                    torch.randn_like(mu))
            self(*args)

    def __call__(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                 cond: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if mu.device.type != "cuda":
            return self.eager(mu, mask, spks, cond, noise)
        return self.cache.run((int(mu.shape[-1]),), mu, mask, spks, cond, noise)


def overlap_add_istft(spec: torch.Tensor, n_fft: int, hop: int, window: torch.Tensor) -> torch.Tensor:
    """``torch.istft(spec, n_fft, hop, n_fft, window, center=True)`` without its host-side check.

    torch.istft verifies the window envelope with a device-to-host read, which a CUDA graph
    capture forbids; HiFT's periodic Hann at 75 % overlap always passes it, so the check is
    skipped and the same arithmetic (inverse rFFT, window, overlap-add, divide by the summed
    squared window, trim n_fft // 2 each side) is done with capturable ops.
    """
    frames = torch.fft.irfft(spec, n=n_fft, dim=1) * window.view(1, -1, 1)
    n = frames.shape[-1]
    length = n_fft + hop * (n - 1)
    fold = torch.nn.functional.fold
    y = fold(frames, (1, length), (1, n_fft), stride=(1, hop)).reshape(frames.shape[0], length)
    env = fold((window * window).view(1, -1, 1).expand(1, n_fft, n), (1, length), (1, n_fft),
               stride=(1, hop)).reshape(length)
    half = n_fft // 2
    return (y / env)[:, half: length - half]


def _capturable_decode(hift: torch.nn.Module, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """HiFT's decode with :func:`overlap_add_istft` in place of torch.istft."""

    def istft(magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        magnitude = torch.clip(magnitude, max=1e2)
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        return overlap_add_istft(spec, hift.n_fft, hift.hop_len,
                                 hift.stft_window.to(magnitude.device))

    hift._istft = istft  # shadows the method for this call only
    try:
        return hift.decode(mel, source)
    finally:
        del hift._istft


class GraphedDecode:
    """HiFT's ``decode(mel, source)`` replayed per mel length (float32, as the reference runs it)."""

    def __init__(self, hift: torch.nn.Module, max_graphs: int = 16) -> None:
        self.hift = hift

        @torch.inference_mode()
        def decode(mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            if mel.device.type != "cuda":
                return hift.decode(mel, source)
            return _capturable_decode(hift, mel, source)

        self.cache = _GraphCache(decode, max_graphs)

    def allow(self, lengths: Iterable[int]) -> None:
        self.cache.allowed.update((int(n),) for n in lengths)

    @torch.inference_mode()
    def warm(self, lengths: Iterable[int]) -> None:
        dev = next(self.hift.parameters()).device
        spf = self.hift.samples_per_frame()
        lengths = list(lengths)
        self.allow(lengths)
        for n in lengths:
            if (int(n),) not in self.cache.graphs:
                mels = self.hift.conv_pre.in_channels
                self(torch.randn(1, mels, n, device=dev), 0.1 * torch.randn(1, 1, n * spf, device=dev))

    def __call__(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        if mel.device.type != "cuda":
            return self.cache.fn(mel, source)
        return self.cache.run((int(mel.shape[-1]),), mel, source)


class GraphedBatchSolver:
    """:attr:`BatchRunner.solver` replayed from CUDA graphs, one per (masked, rows, length).

    Rows are rounded up to a power of two (extra rows are zeros with a full mask, so they compute
    finite nonsense that is dropped); an unpadded batch (every window the same length) replays
    the unmasked estimator's graph for that exact length when one was captured (the standard
    windows, at start-up), any other batch the masked estimator's for the runner's bucketed
    length. Every graph shares one memory pool: replays never overlap
    (one vocoder thread) and each output is copied out before the next replay.
    """

    def __init__(self, runner: Any, max_rows: int = 16, max_graphs: int = 96) -> None:
        self.runner = runner
        self.max_rows = max_rows
        pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

        def plain(mu, mask, spks, cond, noise):  # noqa: ANN001, ANN202 - graph body
            return runner.eager_solve(mu, mask, spks, cond, noise, False)

        def masked(mu, mask, spks, cond, noise):  # noqa: ANN001, ANN202
            return runner.eager_solve(mu, mask, spks, cond, noise, True)

        # One warm-up run before a capture (not two): the estimator has no lazy state beyond
        # the first call's, and each eager run costs a quarter of a second at these sizes.
        self.caches = {False: _GraphCache(plain, max_graphs, 1, capture_any=True, pool=pool),
                       True: _GraphCache(masked, max_graphs, 1, capture_any=True, pool=pool)}

    def rows_bucket(self, rows: int) -> int:
        b = 1
        while b < rows:
            b *= 2
        return b

    def __call__(self, mu: torch.Tensor, mask: torch.Tensor, spks: torch.Tensor,
                 cond: torch.Tensor, noise: torch.Tensor, padded: bool) -> torch.Tensor:
        if mu.device.type != "cuda" or mu.shape[0] > self.max_rows:
            return self.runner.eager_solve(mu, mask, spks, cond, noise, padded)
        rows = mu.shape[0]
        size = self.rows_bucket(rows)
        length = int(mu.shape[-1])
        if not padded and (size, length) not in self.caches[False].graphs:
            # An exact length no graph was captured for (a last window): pad it to the bucket
            # and replay the masked graph there, rather than capture one more on a request.
            extra = self.runner.bucket(length) - length
            mu, cond, noise, mask = (torch.nn.functional.pad(x, (0, extra))
                                     for x in (mu, cond, noise, mask))
            padded = True
        if size != rows:
            def grow(x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
                out = x.new_full((size, *x.shape[1:]), fill)
                out[:rows] = x
                return out

            mu, cond, noise, spks, mask = grow(mu), grow(cond), grow(noise), grow(spks), grow(mask, 1)
        out = self.caches[padded].run((size, int(mu.shape[-1])), mu, mask, spks, cond, noise)
        return out[:rows, :, :length].clone()

    def warm(self, rows: Iterable[int], lengths: Iterable[int], padded: bool) -> int:
        """Capture graphs now (start-up), not on a request; returns how many were captured."""
        if not torch.cuda.is_available() or self.runner.device.type != "cuda":
            return 0
        runner, n = self.runner, 0
        flow = runner.flow
        dev, dtype = runner.device, flow.dtype
        for length in sorted({int(x) for x in lengths}, reverse=True):
            for size in sorted({self.rows_bucket(r) for r in rows}, reverse=True):
                if (size, length) in self.caches[padded].graphs:
                    continue
                mu = torch.randn(size, flow.output_size, length, device=dev, dtype=dtype)
                mask = torch.ones(size, 1, length, device=dev, dtype=dtype)
                spks = torch.randn(size, flow.output_size, device=dev, dtype=dtype)
                self.caches[padded].run((size, length), mu, mask, spks, torch.randn_like(mu),
                                        torch.randn_like(mu))
                n += 1
        return n


class GraphedBatchDecode:
    """:attr:`BatchRunner.decoder` (HiFT's decode on equal-length windows) replayed per
    (rows, mel length) from CUDA graphs sharing one pool; rows rounded up to a power of two.

    The standard window lengths get graphs for every row bucket (:meth:`warm`); every other
    length up to the longest window gets a one-row graph (:meth:`warm_lengths`): a clause
    shorter than two steady windows ends with a window as long as the clause, so under load
    most rounds hold a few such windows, and run eagerly each cost ~10-20 ms of launches on a
    busy host (measured: HiFT took 35-50 ms of a 150-240 ms round at 16-32 sessions) where a
    replay costs ~3 ms. A batch of such windows replays its one-row graph once per window."""

    def __init__(self, hift: torch.nn.Module, max_rows: int = 16, max_graphs: int = 512) -> None:
        self.hift = hift
        self.max_rows = max_rows
        pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

        @torch.inference_mode()
        def decode(mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
            return _capturable_decode(hift, mel, source)

        self.cache = _GraphCache(decode, max_graphs, pool=pool)

    def route(self, rows: int, length: int) -> tuple[int, int] | str:
        """How a (rows, length) batch runs: the graph key it replays (rows rounded up to a
        power of two), ``"per_row"`` (the one-row graph once per window) or ``"eager"``."""
        if rows > self.max_rows:
            return "eager"
        size = 1
        while size < rows:
            size *= 2
        if (size, length) in self.cache.allowed:
            return (size, length)
        return "per_row" if (1, length) in self.cache.allowed else "eager"

    def __call__(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        if mel.device.type != "cuda":
            return self.hift.decode(mel, source)
        rows = mel.shape[0]
        key = self.route(rows, int(mel.shape[-1]))
        if key == "per_row":
            return torch.cat([self(mel[i: i + 1], source[i: i + 1]) for i in range(rows)])
        if isinstance(key, str):
            return self.hift.decode(mel, source)
        size = key[0]
        if size != rows:
            mel = torch.cat([mel, mel.new_zeros((size - rows, *mel.shape[1:]))])
            source = torch.cat([source, source.new_zeros((size - rows, *source.shape[1:]))])
        return self.cache.run(key, mel, source)[:rows].clone()

    @torch.inference_mode()
    def warm(self, rows: Iterable[int], lengths: Iterable[int]) -> int:
        dev = next(self.hift.parameters()).device
        spf = self.hift.samples_per_frame()
        mels = self.hift.conv_pre.in_channels
        n = 0
        for length in sorted({int(x) for x in lengths}, reverse=True):
            for r in sorted(set(rows), reverse=True):
                self.cache.allowed.add((r, length))
                self(torch.randn(r, mels, length, device=dev),
                     0.1 * torch.randn(r, 1, length * spf, device=dev))
                n += 1
        return n

    def warm_lengths(self, lengths: Iterable[int]) -> int:
        """Capture one-row graphs for ``lengths`` not captured yet; returns how many."""
        todo = [int(x) for x in lengths if (1, int(x)) not in self.cache.allowed]
        return self.warm([1], todo) if todo else 0


class GraphedBatchEncoder:
    """:attr:`BatchRunner.encoder` replayed from CUDA graphs per (rows, token count), both
    rounded up (rows to a power of two, tokens to a multiple of ``token_bucket``) with the
    padding masked, so a few graphs serve every window. The eager encoder of a batch is ~100
    small launches: on a busy host that is tens of milliseconds a round."""

    def __init__(self, runner: Any, max_rows: int = 16, token_bucket: int = 32,
                 max_graphs: int = 64) -> None:
        self.runner = runner
        self.max_rows = max_rows
        self.token_bucket = token_bucket
        flow = runner.flow
        dev = flow.encoder_proj.weight.device
        for mod in flow.encoder.modules():  # relative-position tables: keep them on the device
            pe = getattr(mod, "_pe", None)
            if isinstance(pe, torch.Tensor) and pe.device != dev:
                mod._pe = pe.to(dev)
        pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
        self.cache = _GraphCache(lambda ids, lens: runner.eager_encode(ids, lens), max_graphs, 1,
                                 capture_any=True, pool=pool)

    def __call__(self, ids: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
        rows, n = ids.shape
        if ids.device.type != "cuda" or rows > self.max_rows:
            return self.runner.eager_encode(ids, lens)
        size = 1
        while size < rows:
            size *= 2
        q = self.token_bucket
        width = -(-n // q) * q
        padded = ids.new_zeros((size, width))
        padded[:rows, :n] = ids
        full = lens if lens is not None else torch.full((rows,), n, device=ids.device)
        lengths = torch.ones(size, dtype=torch.long, device=ids.device)
        lengths[:rows] = full
        return self.cache.run((size, width), padded, lengths)[:rows, :n].clone()

    def warm(self, rows: Iterable[int], tokens: Iterable[int]) -> int:
        dev = self.runner.device
        if dev.type != "cuda":
            return 0
        n = 0
        for t in sorted({-(-int(x) // self.token_bucket) * self.token_bucket for x in tokens},
                        reverse=True):
            for r in sorted(set(rows), reverse=True):
                self(torch.zeros(r, t, dtype=torch.long, device=dev), None)
                n += 1
        return n
