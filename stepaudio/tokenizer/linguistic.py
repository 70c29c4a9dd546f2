"""Linguistic ("vq02") codes: streaming Paraformer encoder output, quantised by k-means.

16.7 Hz, 1024 codes. The reference (`StepAudioTokenizer.get_vq02_code` → FunASR
`ParaformerStreaming.infer_encoder`) cuts audio into 240 ms chunks and runs the streaming encoder
with per-session caches; the code of a frame is its nearest centroid. This module drives the pip
FunASR frontend and encoder the same way, chunk by chunk, so any split of a stream into calls gives
the codes the reference gives for that split, and offline encoding is just one final call.

Where pip FunASR and the reference disagree (the final short tail, step-audio.md §13) the
reference's rule is reproduced here, outside FunASR.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from ..errors import AudioError, ModelError
from ..models import CENTROIDS_FILE, PARAFORMER_SUBDIR

log = logging.getLogger(__name__)

SR = 16000
CHUNK_SIZE = (0, 4, 5)  # [left pad, LFR frames per chunk, overlap frames], as the reference passes
CHUNK_SAMPLES = CHUNK_SIZE[1] * 960  # 240 ms: 4 LFR frames of 60 ms
ENCODER_LOOK_BACK = 4  # chunks of attention history
# The reference also passes decoder_chunk_look_back=1; the decoder never runs for codes.


class StreamFinishedError(RuntimeError):
    """Raised when a stream is fed after its final call: its caches are gone by then."""


def _import_funasr() -> tuple[Any, type]:
    """Import pip FunASR quietly: its package import prints an ffmpeg notice to stdout."""
    with contextlib.redirect_stdout(io.StringIO()):
        from funasr.models.transformer.embedding import StreamSinusoidalPositionEncoder
        from funasr.register import tables
    return tables, StreamSinusoidalPositionEncoder


class _WindowedPositionEncoder(torch.nn.Module):
    """FunASR's streaming sinusoidal encoding, computed only for the chunk's own positions.

    The stock module builds the table for every position since the stream began and slices it,
    which costs O(stream length) per chunk (~200 ms per 240 ms chunk after an hour). The table is
    elementwise in the position, so computing just the window gives bit-identical values.
    """

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, cache: dict[str, Any] | None = None) -> torch.Tensor:
        steps = x.shape[1]
        start = 0
        if cache is not None:
            start = cache["start_idx"]
            cache["start_idx"] += steps
        positions = torch.arange(start + 1, start + steps + 1)[None, :]
        return x + self.inner.encode(positions, x.shape[2], x.dtype).to(x.device)


def _encoder_cache(feat_dim: int) -> dict[str, Any]:
    """The encoder part of FunASR's `ParaformerStreaming.init_cache` (only what the encoder reads)."""
    return {
        "start_idx": 0,
        "chunk_size": list(CHUNK_SIZE),
        "encoder_chunk_look_back": ENCODER_LOOK_BACK,
        "opt": None,
        "feats": torch.zeros((1, CHUNK_SIZE[0] + CHUNK_SIZE[2], feat_dim)),
        "tail_chunk": False,
    }


@dataclass
class LinguisticStream:
    """One session's state; streams share the model but nothing else."""

    frontend_cache: dict[str, Any]
    encoder_cache: dict[str, Any]
    pending: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    finished: bool = False
    # Serialises feeds of one stream, so a caller racing itself can't interleave chunk order.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


def _as_wave(wav16k: np.ndarray) -> np.ndarray:
    """Validate early: an int16 buffer would silently be 32768x too loud for the fbank."""
    x = np.asarray(wav16k)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise AudioError(f"linguistic tokenizer wants mono samples, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise AudioError(f"linguistic tokenizer wants float samples in [-1, 1], got {x.dtype}")
    return x.astype(np.float32, copy=False)


def _chunks(pending: np.ndarray, wav: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Full 240 ms chunks of pending+wav, and the remainder (a copy, not a view on the input).

    The chunks after the first are views, so an hour of audio is never copied whole.
    """
    head = CHUNK_SAMPLES - len(pending)
    if len(wav) < head:
        return [], np.concatenate([pending, wav])
    chunks = [np.concatenate([pending, wav[:head]])]
    pos = head
    while len(wav) - pos >= CHUNK_SAMPLES:
        chunks.append(wav[pos : pos + CHUNK_SAMPLES])
        pos += CHUNK_SAMPLES
    return chunks, wav[pos:].copy()


class LinguisticTokenizer:
    """The vq02 model (Paraformer-streaming encoder + k-means), shared by any number of streams."""

    def __init__(self, tokenizer_dir: str | os.PathLike[str], device: str = "cpu") -> None:
        root = Path(tokenizer_dir)
        model_dir = root / PARAFORMER_SUBDIR
        for f in (
            model_dir / "config.yaml",
            model_dir / "model.pt",
            model_dir / "am.mvn",
            root / CENTROIDS_FILE,
        ):
            if not f.is_file():
                raise ModelError(f"{f}: missing (linguistic tokenizer)")
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._frontend, self._encoder = _build_model(model_dir, self.device)
        centroids = np.load(root / CENTROIDS_FILE)
        if centroids.ndim != 2 or centroids.shape[1] != self._encoder.output_size():
            raise ModelError(
                f"{root / CENTROIDS_FILE}: shape {centroids.shape} does not fit encoder width "
                f"{self._encoder.output_size()}"
            )
        self._centroids = torch.from_numpy(centroids.astype(np.float32)).to(self.device)
        self.num_codes = int(centroids.shape[0])
        self.frame_rate = SR / (self._frontend.frame_shift_sample_length * self._frontend.lfr_n)

    # -- public API ------------------------------------------------------------------------------
    def new_stream(self) -> LinguisticStream:
        return LinguisticStream(
            frontend_cache={}, encoder_cache=_encoder_cache(self._frontend.output_size())
        )

    def feed(
        self, stream: LinguisticStream, wav16k: np.ndarray, is_final: bool = False
    ) -> np.ndarray:
        """Codes produced by this call (int64); audio short of a 240 ms chunk waits in the stream.

        With is_final the buffered tail is flushed under the reference's rules and the stream is
        closed.
        """
        return self._feed(stream, _as_wave(wav16k), is_final, None)

    def copy_stream(self, stream: LinguisticStream) -> LinguisticStream:
        """An independent copy of a stream's state: finishing the copy gives the codes the
        utterance would have if it ended here, and leaves the original open."""
        with stream.lock:
            if stream.finished:
                raise StreamFinishedError("linguistic stream already received is_final=True")
            return LinguisticStream(
                frontend_cache=copy.deepcopy(stream.frontend_cache),
                encoder_cache=copy.deepcopy(stream.encoder_cache),
                pending=stream.pending.copy(),
            )

    def encode(self, wav16k: np.ndarray) -> np.ndarray:
        """Offline codes: the reference's `get_vq02_code(audio)` (one final call on a fresh stream)."""
        return self.feed(self.new_stream(), wav16k, is_final=True)

    def encode_debug(self, wav16k: np.ndarray) -> dict[str, np.ndarray]:
        """Offline, with the encoder's inputs and outputs, for conformance tests."""
        sink: dict[str, list[np.ndarray]] = {"enc_in": [], "enc_out": []}
        codes = self._feed(self.new_stream(), _as_wave(wav16k), True, sink)
        width = {"enc_in": self._frontend.output_size(), "enc_out": self._encoder.output_size()}
        out = {
            k: np.concatenate(v) if v else np.zeros((0, width[k]), np.float32)
            for k, v in sink.items()
        }
        out["codes"] = codes
        return out

    # -- internals -------------------------------------------------------------------------------
    def _feed(
        self,
        stream: LinguisticStream,
        wav: np.ndarray,
        is_final: bool,
        sink: dict[str, list[np.ndarray]] | None,
    ) -> np.ndarray:
        with stream.lock:
            if stream.finished:
                raise StreamFinishedError("linguistic stream already received is_final=True")
            chunks, rest = _chunks(stream.pending, wav)
            out = [self._chunk(stream, c, False, sink) for c in chunks]
            if is_final:
                # An exact multiple of 240 ms leaves nothing: the reference then skips the flush.
                if len(rest):
                    out.append(self._chunk(stream, rest, True, sink))
                stream.finished = True
                stream.pending = np.zeros(0, dtype=np.float32)
                stream.frontend_cache = {}
                stream.encoder_cache = {}
            else:
                stream.pending = rest
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def _chunk(
        self,
        stream: LinguisticStream,
        samples: np.ndarray,
        is_final: bool,
        sink: dict[str, list[np.ndarray]] | None,
    ) -> np.ndarray:
        """One reference loop iteration: frontend, encoder, keep the chunk's own frames, quantise."""
        if is_final and not _reference_flushes(self._frontend, stream.frontend_cache, len(samples)):
            return np.zeros(0, dtype=np.int64)
        # A copy: the caller's array may be read-only, and torch must not alias it.
        x = torch.from_numpy(np.array(samples, dtype=np.float32))[None, :]
        with self._lock, torch.inference_mode():
            feats, lens = self._frontend(
                x, [x.shape[1]], cache=stream.frontend_cache, is_final=is_final
            )
            n = int(lens[0]) if feats.numel() else 0
            if n == 0:  # never reached by the reference's rule; enc[:, -0:] would keep the overlap
                return np.zeros(0, dtype=np.int64)
            feats = feats.to(self.device)
            if sink is not None:  # forward_chunk scales its input in place
                sink["enc_in"].append(feats[0].cpu().numpy().copy())
            enc, _, _ = self._encoder.forward_chunk(feats, lens, cache=stream.encoder_cache)
            enc = enc[0, -n:]
            codes = torch.cdist(enc, self._centroids).argmin(1)
        if sink is not None:
            sink["enc_out"].append(enc.float().cpu().numpy())
        return codes.cpu().numpy().astype(np.int64)


def _reference_flushes(frontend: Any, cache: dict[str, Any], n_samples: int) -> bool:
    """Whether the reference's frontend yields any frame for a final chunk of n_samples.

    The reference's `WavFrontendOnline` returns nothing unless the new fbank frames plus the
    buffered (LFR splice) frames reach lfr_m, and with no new frames it fails (the caller skips
    the chunk) unless more than (lfr_m-1)//2 frames are buffered. pip FunASR flushes in both cases.
    """
    held = cache.get("input_cache")
    held_samples = 0 if held is None else int(held.numel())
    new_frames = frontend.compute_frame_num(
        held_samples + n_samples,
        frontend.frame_sample_length,
        frontend.frame_shift_sample_length,
    )
    context = (frontend.lfr_m - 1) // 2
    splice = cache.get("lfr_splice_cache") or []
    buffered = int(splice[0].shape[0]) if splice else None
    if new_frames > 0:
        # A fresh stream's splice cache starts as `context` copies of the first frame.
        return new_frames + (context if buffered is None else buffered) >= frontend.lfr_m
    return buffered is not None and buffered > context


def _build_model(model_dir: Path, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """Frontend and encoder from config.yaml via FunASR's registry.

    Not `funasr.AutoModel`: it also builds the decoder and predictor, resets torch's thread count
    and may look at a model hub; only the encoder weights are needed here.
    """
    tables, stream_pos_cls = _import_funasr()
    cfg = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8"))
    if cfg.get("normalize"):
        raise ModelError(f"{model_dir}: feature normalize={cfg['normalize']!r} is not supported")
    frontend_cls = tables.frontend_classes.get(cfg.get("frontend"))
    encoder_cls = tables.encoder_classes.get(cfg.get("encoder"))
    if frontend_cls is None or encoder_cls is None:
        raise ModelError(
            f"{model_dir}/config.yaml: unknown frontend {cfg.get('frontend')!r} "
            f"or encoder {cfg.get('encoder')!r}"
        )
    frontend_conf = dict(cfg.get("frontend_conf") or {})
    frontend_conf["cmvn_file"] = str(model_dir / "am.mvn")
    # The class default (dither 1.0) would add random noise; the reference passes the config as is.
    frontend = frontend_cls(**frontend_conf)
    if frontend.dither:
        log.warning("%s: frontend dither=%s makes vq02 codes random", model_dir, frontend.dither)
    encoder = encoder_cls(input_size=frontend.output_size(), **(cfg.get("encoder_conf") or {}))
    state = _load_state(model_dir / "model.pt")
    enc_state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    missing, unexpected = encoder.load_state_dict(enc_state, strict=False)
    if missing or unexpected:
        raise ModelError(
            f"{model_dir}/model.pt: encoder weights do not fit config.yaml "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    del state, enc_state
    if isinstance(encoder.embed, stream_pos_cls):
        encoder.embed = _WindowedPositionEncoder(encoder.embed)
    return frontend, encoder.to(device).eval()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict; memory-mapped where possible, since the real file also holds the decoder."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
    return state
