"""The ``random`` model profile: the speech models at their published shapes, seeded random
weights, built in memory on the device. No checkpoint files, no downloads.

Why: the server's capacity on a GPU is set by the shapes of its models, not by their weights, and
a 7 GB TTS-3B checkpoint need not exist to measure it. ``stepaudio serve --config
configs/gpu-random.yaml`` therefore starts on any CUDA machine with every speech-side model real
in size and arithmetic (TTS-3B on the fast decode path, flow matching and HiFT with their batched
CUDA graphs), and says plainly that the voices are noise.

What is built here:

- TTS-3B: ``Step1ForCausalLM`` with the published config (3.5 B parameters, bf16 on a GPU),
  weights drawn on the device. Random weights would pick text ids as often as audio ids, so the
  head is steered as the tiny checkpoints' is: a carrier dimension in every embedding and one
  column of the head give each ``<audio_N>`` id a large positive and every other id (``<|EOT|>``
  included) a large negative offset. It therefore speaks until the clause's length cap, which the
  profile sets to what a real voice takes for the text (:func:`speech_seconds`), not the
  reference's generous ceiling, so replies last as long as real ones.
- Flow (conformer encoder, length regulator, the CFM estimator) and HiFT at the sizes of the
  public CosyVoice-300M recipe with Step-Audio's dual-codebook vocabulary (5120) and token rate
  (125/3 per second): 105 M + 20.5 M parameters.
- A voice's prompt features (codes, mel, x-vector) as random tensors of the sizes its real
  prompt wav gives (:class:`RandomPromptTokenizer`, :meth:`RandomCosyVoice.speech_feat`), so
  the TTS-3B prompt and the flow's condition are as long as with the real voice, packaged or
  cloned.
- The text tokenizer: the tiny checkpoints' SentencePiece (the real id layout and vocabulary
  size), so prompts have realistic token counts.

The audio tokenizer and the 130B chat model are not built here: the server stands in for them
(see ``server/instruments/standin_chat.py``) and says so.
"""

from __future__ import annotations

import json
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from stepaudio.llm.tokens import AUDIO_TOKEN_OFFSET

#: Flow and HiFT sizes: the CosyVoice-300M recipe (FunAudioLLM/CosyVoice, examples/libritts/
#: cosyvoice/conf/cosyvoice.yaml) with Step-Audio's flow vocabulary and token rate.
COSYVOICE_SIZES: dict[str, dict[str, Any]] = {
    "published": dict(d=512, heads=8, units=2048, blocks=6, ch=256, head_dim=64, n_blocks=4,
                      mid=12, eheads=8, hift=512, f0=512, ratios="[1, 1, 1, 1]"),
    "small": dict(d=32, heads=2, units=64, blocks=2, ch=32, head_dim=16, n_blocks=1, mid=2,
                  eheads=2, hift=32, f0=32, ratios="[1, 1]"),
}

#: TTS-3B sizes: the published config.json (the Step1Config defaults), and a CPU-sized one.
TTS_LM_SIZES: dict[str, dict[str, int]] = {
    "published": {},
    "small": dict(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_attention_groups=2, num_hidden_layers=2),
}

COSYVOICE_YAML = """\
sample_rate: 22050
flow: !new:cosyvoice.flow.flow.MaskedDiffWithXvec
    input_size: {d}
    output_size: 80
    spk_embed_dim: 192
    output_type: 'mel'
    vocab_size: 5120
    input_frame_rate: 41.666666666666664
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.encoder.ConformerEncoder
        output_size: {d}
        attention_heads: {heads}
        linear_units: {units}
        num_blocks: {blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {d}
        use_cnn_module: False
        macaron_style: False
    length_regulator: !new:cosyvoice.flow.length_regulator.InterpolateRegulator
        channels: 80
        sampling_ratios: {ratios}
    decoder: !new:cosyvoice.flow.flow_matching.ConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: 1e-06
                solver: 'euler'
                t_scheduler: 'cosine'
                training_cfg_rate: 0.2
                inference_cfg_rate: 0.7
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [{ch}, {ch}]
            dropout: 0.0
            attention_head_dim: {head_dim}
            n_blocks: {n_blocks}
            num_mid_blocks: {mid}
            num_heads: {eheads}
            act_fn: 'gelu'
hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: {hift}
    nb_harmonics: 8
    sampling_rate: 22050
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 8]
    upsample_kernel_sizes: [16, 16]
    istft_params:
        n_fft: 16
        hop_len: 4
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: {f0}
feat_extractor: !name:cosyvoice.matcha.audio.mel_spectrogram
    n_fft: 1024
    num_mels: 80
    sampling_rate: 22050
    hop_size: 256
    win_size: 1024
    fmin: 0
    fmax: 8000
    center: False
"""

#: Flow tokens per second (Step-Audio's dual codes: 2 + 3 per 120 ms).
TOKENS_PER_SECOND = 125 / 3
MEL_FRAMES_PER_SECOND = 22050 / 256


@dataclass
class RandomCosyVoice:
    """What the synthesizer uses of a vocoder folder, built at a shape with random weights."""

    flow: Any
    hift: Any
    config: Any
    device: torch.device

    seed: int = 0

    @property
    def sample_rate(self) -> int:
        return int(self.config.sample_rate)

    def speech_feat(self, wav: np.ndarray) -> torch.Tensor:
        """A random (1, frames, 80) prompt mel, as many frames as the real extractor gives."""
        frames = max(1, (len(wav) - 1024) // 256 + 1)
        rng = _rng_for(wav, self.seed, "mel")
        return torch.from_numpy(rng.standard_normal((1, frames, 80)).astype(np.float32))

    def embedding(self, wav16k: np.ndarray) -> torch.Tensor:
        """A random (1, 192) x-vector."""
        rng = _rng_for(wav16k, self.seed, "xvec")
        return torch.from_numpy(rng.standard_normal((1, 192)).astype(np.float32))


def build_cosyvoice(device: str | torch.device, seed: int = 0, sizes: str = "published",
                    flow_dtype: torch.dtype | None = None) -> RandomCosyVoice:
    """Flow + HiFT with seeded random weights (flow in bf16 on a GPU, HiFT in float32)."""
    from stepaudio.tts.yaml_config import load_cosyvoice_yaml

    device = torch.device(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cosyvoice.yaml"
        path.write_text(COSYVOICE_YAML.format(**COSYVOICE_SIZES[sizes]), encoding="utf-8")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            cfg = load_cosyvoice_yaml(path)
    flow, hift = cfg.flow, cfg.hift
    with torch.no_grad():
        for p in flow.parameters():  # keeps activations finite through 64 bf16 attention blocks
            if p.dim() > 1:
                p.mul_(0.5)
        # A voice-like pitch (tens to a few hundred Hz), so the source is mostly voiced, as in
        # speech, rather than all noise (the tiny checkpoints do the same).
        head = hift.f0_predictor.classifier
        head.bias.mul_(100).add_(120)
        head.weight.mul_(30)
    if flow_dtype is None:
        flow_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flow.to(device, flow_dtype).eval()
    hift.to(device).eval()
    return RandomCosyVoice(flow, hift, cfg, device, seed)


#: Offsets written into the TTS head's carrier column (see :func:`steer_to_audio_ids`).
CARRIER = 100.0


def build_tts_lm(device: str | torch.device, seed: int = 0, sizes: str = "published",
                 dtype: torch.dtype | None = None) -> torch.nn.Module:
    """TTS-3B (``Step1ForCausalLM``) with random weights drawn on ``device``, steered to speak
    audio ids only."""
    from stepaudio.llm.step1 import Step1Config, Step1ForCausalLM

    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = Step1Config(**TTS_LM_SIZES[sizes])
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Step1ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    if device.type == "meta":  # shapes only (tests, memory planning)
        return model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # explicit, so no init path leaves zeros or garbage
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(1.0, 0.1, generator=gen)
    steer_to_audio_ids(model)
    return model.eval()


def steer_to_audio_ids(model: torch.nn.Module) -> None:
    """Every position's final hidden state gets a large constant in dimension 0 (a carrier set
    in every token embedding, which the residual stream carries), and lm_head's column 0 turns
    it into +offset for the 5120 audio ids and -offset for every other id, ``<|EOT|>`` included."""
    from stepaudio.tts.sampling import AUDIO_ID_END

    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = CARRIER
        head = model.lm_head.weight
        head[:, 0] = -1.0
        head[AUDIO_TOKEN_OFFSET:AUDIO_ID_END, 0] = 1.0


def speech_seconds(text: str) -> float:
    """About how long a voice takes to say ``text`` at normal speed: 0.22 s per CJK character,
    0.07 s per other letter or digit, plus 0.3 s (Mandarin is read at ~4.5 characters a second,
    English at ~14 letters). The random profile's clause length (its TTS-3B never says EOT)."""
    cjk = sum(1 for ch in text if unicodedata.east_asian_width(ch) in ("W", "F") and ch.isalpha())
    other = sum(1 for ch in text if ch.isalnum()) - cjk
    return 0.3 + 0.22 * cjk + 0.07 * other


def speech_tokens(text: str) -> int:
    """:func:`speech_seconds` in TTS-3B audio tokens."""
    return max(1, int(round(speech_seconds(text) * TOKENS_PER_SECOND)))


def _rng_for(wav: np.ndarray, seed: int, what: str) -> np.random.Generator:
    """Draws that depend on the prompt (its length and a few samples) and the seed only."""
    probe = np.asarray(wav, dtype=np.float32).ravel()[:: max(1, len(wav) // 64)][:64]
    words = [seed, len(wav), int(np.abs(probe).sum() * 1e4) & 0xFFFFFFFF,
             int.from_bytes(what.encode()[:4].ljust(4, b"\0"), "little")]
    return np.random.default_rng(words)


@dataclass
class RandomPromptTokenizer:
    """The audio tokenizer's part in describing a voice: interleaved codes (2 linguistic + 3
    semantic per 120 ms) as many as a prompt of that length gives, drawn at random."""

    seed: int = 0

    def tokenize(self, wav: np.ndarray, sr: int, trim: bool = True) -> Any:
        rng = _rng_for(wav, self.seed, "codes")
        codes: list[int] = []
        for _ in range(max(1, int(len(wav) / sr / 0.12))):
            codes += rng.integers(0, 1024, 2).tolist() + (1024 + rng.integers(0, 4096, 3)).tolist()
        return SimpleNamespace(ids=[AUDIO_TOKEN_OFFSET + c for c in codes])


def write_text_tokenizer(folder: Path) -> Path:
    """The tiny checkpoints' text tokenizer files (SentencePiece with the Step1 id layout)."""
    from stepaudio.tiny import TOKENIZER_CONFIG, sentencepiece_model_bytes, step1_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(sentencepiece_model_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps(step1_config(TTS_LM_SIZES["small"])),
                                        encoding="utf-8")
    return folder


def text_tokenizer(cache_dir: Path | None = None) -> Any:
    """Load (writing once) the profile's text tokenizer."""
    from stepaudio.llm.tokenizer import load_text_tokenizer

    folder = Path(cache_dir or Path(tempfile.gettempdir()) / "stepaudio-random-tokenizer")
    if not (folder / "tokenizer.model").is_file():
        write_text_tokenizer(folder)
    return load_text_tokenizer(folder)


def random_synthesizer(device: str, *, seed: int = 0, sizes: str = "published",
                       options: Any = None, engine_options: dict[str, Any] | None = None,
                       speakers_dir: str | Path | None = None) -> Any:
    """A :class:`~stepaudio.tts.synthesizer.Synthesizer` over the random models: TTS-3B in
    process (the fast decode path on a GPU), the vocoders built on first use, the packaged
    speakers (or ``speakers_dir``), clauses as long as a real voice would make them."""
    from dataclasses import replace

    from stepaudio.llm.engine_transformers import TransformersEngine
    from stepaudio.tts.prompt import SpeakerRegistry, default_speakers_dir
    from stepaudio.tts.synthesizer import Synthesizer, SynthOptions

    tokenizer = text_tokenizer()
    engine = TransformersEngine(build_tts_lm(device, seed, sizes), tokenizer,
                                **(engine_options or {}))
    def cosyvoice(folder: str) -> RandomCosyVoice:  # each folder its own weights
        return build_cosyvoice(device, seed + 1 + zlib.crc32(folder.encode()) % 997, sizes)

    options = replace(options or SynthOptions(), clause_tokens=speech_tokens)
    registry = SpeakerRegistry.from_dir(speakers_dir or default_speakers_dir())
    return Synthesizer(engine, cosyvoice, registry, lambda: RandomPromptTokenizer(seed), options,
                       owns_engine=True)
