"""One `CosyVoice-300M-25Hz*` folder loaded: flow, HiFT, prompt-feature extractors.

`token_to_wav` is the reference's offline `token_to_wav_offline` (whole utterance); streaming
synthesis builds on the same objects. As in the reference the flow may run in bf16 while HiFT
stays float32; here the flow's dtype is a choice (float32 reproduces the reference's numbers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stepaudio.errors import ModelError
from stepaudio.tts.campplus import CAMPPlus
from stepaudio.tts.flow import MaskedDiffWithXvec
from stepaudio.tts.hift import HiFTGenerator, SourceDraws
from stepaudio.tts.yaml_config import CosyVoiceConfig, load_cosyvoice_yaml


def load_state(module: torch.nn.Module, path: Path, what: str) -> None:
    """Load a reference checkpoint with strict key matching, as one clear error if it does not fit."""
    if not path.is_file():
        raise ModelError(f"{path}: {what} checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle / zip errors vary by torch version
        raise ModelError(f"{path}: cannot read {what} checkpoint ({err})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise ModelError(f"{path}: {what} checkpoint does not match cosyvoice.yaml: "
                         + " ".join(lines[1:4])[:600]) from None


class CosyVoice:
    """Token → wav models of one vocoder folder (`cosyvoice.yaml`, `flow.pt`, `hift.pt`, `campplus.onnx`)."""

    def __init__(self, model_dir: Path | str, flow_dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> None:
        self.model_dir = Path(model_dir)
        self.config: CosyVoiceConfig = load_cosyvoice_yaml(self.model_dir / "cosyvoice.yaml")
        self.flow: MaskedDiffWithXvec = self.config.flow
        self.hift: HiFTGenerator = self.config.hift
        load_state(self.flow, self.model_dir / "flow.pt", "flow")
        load_state(self.hift, self.model_dir / "hift.pt", "hift")
        self.device = torch.device(device)
        self.flow.to(self.device, flow_dtype).eval()
        self.hift.to(self.device).eval()
        self.campplus = CAMPPlus(self.model_dir / "campplus.onnx")

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    def speech_feat(self, wav: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Prompt waveform at `sample_rate` → mel (1, frames, 80), float32 (the flow's prompt_feat)."""
        y = torch.as_tensor(np.asarray(wav), dtype=torch.float32).reshape(1, -1)
        return self.config.feat_extractor(y).squeeze(0).transpose(0, 1).unsqueeze(0)

    def embedding(self, wav16k: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Prompt waveform at 16 kHz → CAM++ x-vector (1, 192)."""
        return self.campplus(wav16k)

    @torch.inference_mode()
    def token_to_mel(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                     embedding: torch.Tensor, noise: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """Flow tokens (1, T) in 0..vocab-1 → mel (1, 80, frames), float32."""
        dtype = self.flow.dtype
        mel = self.flow.inference(token.to(self.device), prompt_token.to(self.device),
                                  prompt_feat.to(self.device, dtype), embedding.to(self.device, dtype),
                                  noise=None if noise is None else noise.to(self.device, dtype),
                                  generator=generator)
        return mel.float()

    @torch.inference_mode()
    def token_to_wav(self, token: torch.Tensor, prompt_token: torch.Tensor, prompt_feat: torch.Tensor,
                     embedding: torch.Tensor, noise: torch.Tensor | None = None,
                     draws: SourceDraws | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The reference's `token_to_wav_offline`: → waveform (1, samples) at `sample_rate`."""
        mel = self.token_to_mel(token, prompt_token, prompt_feat, embedding, noise, generator)
        wav, _ = self.hift.inference(mel, draws, generator)
        return wav.cpu()
