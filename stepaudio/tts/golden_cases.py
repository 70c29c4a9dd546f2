"""Conformance of the token→wav models against a golden `tts/` folder (reference runs).

Layout (golden README §3): `tts/<CosyVoice folder>/{cosyvoice.yaml, flow.pt, hift.pt,
campplus.onnx}` and `tts/cases/*.npy`. A case runs when its files exist, and all shapes come from
the files, so a golden set with other seeds, wavs and lengths is checked unchanged. Recorded random
draws (flow noise, sine-source phases and noise) are injected. Tolerances are the README's
suggested ones for an independent float32 implementation (bf16 is informational, loose).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepaudio.errors import StepAudioError

Case = dict[str, Any]
Pair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float = 0.0
    mean_atol: float | None = None  # also bound the mean absolute error (bf16)

    def describe(self) -> str:
        s = f"atol {self.atol:g}" + (f" rtol {self.rtol:g}" if self.rtol else "")
        return s + (f", mean {self.mean_atol:g}" if self.mean_atol is not None else "")


class _Golden:
    """Lazily loaded models and case arrays of one golden `tts/` folder."""

    def __init__(self, model_dir: Path, cases: Path) -> None:
        self.model_dir = model_dir
        self.cases = cases

    def has(self, *names: str) -> bool:
        return all((self.cases / f"{n}.npy").is_file() for n in names)

    def t(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(self.cases / f"{name}.npy"))

    @cached_property
    def models(self) -> Any:
        from stepaudio.tts.cosyvoice import CosyVoice

        return CosyVoice(self.model_dir)

    def flow_inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.t("target_token"), self.t("prompt_token"), self.t("prompt_speech_feat"),
                self.t("prompt_embedding"))

    def cfm_inputs(self, batch2: bool) -> tuple[torch.Tensor, ...]:
        mu, mask, spks, cond = (self.t(f"flow_decoder_{n}") for n in ("mu", "mask", "spks", "cond"))
        if not batch2:
            return mu, mask, spks, cond
        zero2 = lambda a: torch.cat([a, torch.zeros_like(a)])  # noqa: E731 - CFG's unconditional row
        return zero2(mu), torch.cat([mask, mask]), zero2(spks), zero2(cond)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


# -- the checks -------------------------------------------------------------------------------------


def _fbank(g: _Golden) -> Pair:
    from stepaudio.tts.campplus import campplus_fbank

    ref = g.t("campplus_fbank_input").numpy()
    return _np(campplus_fbank(g.t("prompt_wav16k_for_campplus")).reshape(ref.shape)), ref


def _embedding_from_fbank(g: _Golden) -> Pair:
    return _np(g.models.campplus.embed_fbank(g.t("campplus_fbank_input"))), g.t("prompt_embedding").numpy()


def _embedding_from_wav(g: _Golden) -> Pair:
    return _np(g.models.embedding(g.t("prompt_wav16k_for_campplus"))), g.t("prompt_embedding").numpy()


def _speech_feat(g: _Golden) -> Pair:
    return _np(g.models.speech_feat(g.t("prompt_wav22k_for_mel"))), g.t("prompt_speech_feat").numpy()


def _conditions(g: _Golden) -> Pair:
    c = g.models.flow.conditions(*g.flow_inputs())
    ours = [_np(c.mu).ravel(), _np(c.spks).ravel(), _np(c.cond).ravel()]
    ref = [g.t(f"flow_decoder_{n}").numpy().ravel() for n in ("mu", "spks", "cond")]
    return np.concatenate(ours), np.concatenate(ref)


def _estimator(step: int) -> Callable[[_Golden], Pair]:
    def run(g: _Golden) -> Pair:
        mu, mask, spks, cond = g.cfm_inputs(batch2=True)
        x = g.t("flow_noise_z") if step == 0 else g.t(f"estimator_step{step}_x")
        t = g.t("estimator_all_t")[step].reshape(1).repeat(2)
        with torch.inference_mode():
            out = g.models.flow.decoder.estimator(torch.cat([x, x]), mask, mu, t, spks, cond)
        return _np(out), g.t(f"estimator_step{step}_out").numpy()

    return run


def _all_t(g: _Golden) -> Pair:
    mu, mask, spks, cond = g.cfm_inputs(batch2=False)
    times: list[float] = []
    g.models.flow.decoder(mu, mask, len(g.t("estimator_all_t")), spks=spks, cond=cond,
                          noise=g.t("flow_noise_z"), step_hook=lambda i, x, t, v: times.append(float(t)))
    return np.asarray(times, dtype=np.float32), g.t("estimator_all_t").numpy()


def _cfm(g: _Golden) -> Pair:
    mu, mask, spks, cond = g.cfm_inputs(batch2=False)
    n1 = g.t("prompt_speech_feat").shape[1]
    mel = g.models.flow.decoder(mu, mask, 10, spks=spks, cond=cond, noise=g.t("flow_noise_z"))
    return _np(mel[:, :, n1:]), g.t("flow_mel_fp32").numpy()


def _flow_fp32(g: _Golden) -> Pair:
    mel = g.models.token_to_mel(*g.flow_inputs(), noise=g.t("flow_noise_z"))
    return _np(mel), g.t("flow_mel_fp32").numpy()


def _flow_bf16(g: _Golden) -> Pair:
    from stepaudio.tts.cosyvoice import CosyVoice

    bf16 = CosyVoice(g.model_dir, flow_dtype=torch.bfloat16)
    mel = bf16.token_to_mel(*g.flow_inputs(), noise=g.t("flow_noise_z").bfloat16())
    return _np(mel), g.t("flow_mel_bf16_from_fp32_noise").numpy()


def _hift_f0(mel: str, ref: str) -> Callable[[_Golden], Pair]:
    return lambda g: (_np(g.models.hift.f0(g.t(mel))), g.t(ref).numpy())


def _hift_source(g: _Golden) -> Pair:
    from stepaudio.tts.hift import SourceDraws

    draws = SourceDraws(g.t("hift_phase_vec"), g.t("hift_sine_noise_randn"))
    return _np(g.models.hift.source(g.t("hift_f0"), draws)), g.t("hift_source").numpy()


def _hift_inference(g: _Golden) -> Pair:
    from stepaudio.tts.hift import SourceDraws

    draws = SourceDraws(g.t("hift_phase_vec"), g.t("hift_sine_noise_randn"))
    wav, _ = g.models.hift.inference(g.t("hift_mel"), draws)
    return _np(wav), g.t("hift_wav").numpy()


def _hift_wav(mel: str, source: str, ref: str) -> Callable[[_Golden], Pair]:
    return lambda g: (_np(g.models.hift.decode(g.t(mel), g.t(source))), g.t(ref).numpy())


_DEC = ("flow_decoder_mu", "flow_decoder_mask", "flow_decoder_spks", "flow_decoder_cond")
_FLOW_IN = ("target_token", "prompt_token", "prompt_speech_feat", "prompt_embedding")

#: (case name, files it needs, computation, tolerance) — README §3 suggested tolerances.
CHECKS: list[tuple[str, tuple[str, ...], Callable[[_Golden], Pair], Tolerance]] = [
    ("campplus/fbank", ("prompt_wav16k_for_campplus", "campplus_fbank_input"), _fbank, Tolerance(2e-3)),
    ("campplus/embedding_from_fbank", ("campplus_fbank_input", "prompt_embedding"),
     _embedding_from_fbank, Tolerance(1e-5)),
    ("campplus/embedding_from_wav", ("prompt_wav16k_for_campplus", "prompt_embedding"),
     _embedding_from_wav, Tolerance(1e-4)),
    ("prompt/speech_feat", ("prompt_wav22k_for_mel", "prompt_speech_feat"), _speech_feat, Tolerance(2e-3)),
    ("flow/conditions_mu_spks_cond", (*_FLOW_IN, *_DEC), _conditions, Tolerance(1e-4)),
    ("flow/estimator_all_t", ("estimator_all_t", "flow_noise_z", *_DEC), _all_t, Tolerance(1e-7)),
    ("flow/estimator_step0", ("estimator_all_t", "estimator_step0_out", "flow_noise_z", *_DEC),
     _estimator(0), Tolerance(1e-4)),
    ("flow/estimator_step5", ("estimator_all_t", "estimator_step5_x", "estimator_step5_out", *_DEC),
     _estimator(5), Tolerance(1e-4)),
    ("flow/decoder_from_mu", ("flow_noise_z", "prompt_speech_feat", "flow_mel_fp32", *_DEC), _cfm,
     Tolerance(1e-3)),
    ("flow/mel_fp32", (*_FLOW_IN, "flow_noise_z", "flow_mel_fp32"), _flow_fp32, Tolerance(1e-3)),
    ("flow/mel_bf16", (*_FLOW_IN, "flow_noise_z", "flow_mel_bf16_from_fp32_noise"), _flow_bf16,
     Tolerance(0.5, mean_atol=0.1)),
    ("hift/f0", ("hift_mel", "hift_f0"), _hift_f0("hift_mel", "hift_f0"), Tolerance(1e-3, 1e-5)),
    ("hift/source_from_draws", ("hift_f0", "hift_phase_vec", "hift_sine_noise_randn", "hift_source"),
     _hift_source, Tolerance(1e-4)),
    ("hift/wav_from_mel_and_source", ("hift_mel", "hift_source", "hift_wav"),
     _hift_wav("hift_mel", "hift_source", "hift_wav"), Tolerance(1e-5)),
    # Our own f0 drives the source here, so the f0 tolerance compounds: the source's bound applies.
    ("hift/wav_from_mel_and_draws", ("hift_mel", "hift_phase_vec", "hift_sine_noise_randn", "hift_wav"),
     _hift_inference, Tolerance(1e-4)),
    ("e2e/f0", ("flow_mel_fp32", "e2e_f0"), _hift_f0("flow_mel_fp32", "e2e_f0"), Tolerance(1e-3, 1e-5)),
    ("e2e/wav_from_mel_and_source", ("flow_mel_fp32", "e2e_source", "e2e_wav"),
     _hift_wav("flow_mel_fp32", "e2e_source", "e2e_wav"), Tolerance(1e-5)),
]


def compare(name: str, ours: np.ndarray, ref: np.ndarray, tol: Tolerance) -> Case:
    """One result line: max / mean abs error, error relative to the reference's peak, pass/fail."""
    case: Case = {"case": f"tts/{name}", "tolerance": tol.describe()}
    if ours.shape != ref.shape:
        return {**case, "pass": False, "shape": [list(ours.shape), list(ref.shape)],
                "summary": f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"}
    err = np.abs(ours.astype(np.float64) - ref.astype(np.float64))
    peak = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(err.max()) if err.size else 0.0
    mean_abs = float(err.mean()) if err.size else 0.0
    ok = bool(np.all(err <= tol.atol + tol.rtol * np.abs(ref)))
    if tol.mean_atol is not None:
        ok &= mean_abs <= tol.mean_atol
    rel = max_abs / peak if peak else max_abs
    return {**case, "pass": ok, "max_abs_err": max_abs, "mean_abs_err": mean_abs, "max_rel_err": rel,
            "summary": f"max abs err {max_abs:.3g} ({rel:.2g} of peak {peak:.3g}); {tol.describe()}"}


def find_model_dir(tts_root: Path) -> Path | None:
    """The vocoder folder the cases were made with: the one holding `cosyvoice.yaml` (the
    non-Music one when there are several)."""
    dirs = sorted(p for p in tts_root.iterdir() if p.is_dir() and (p / "cosyvoice.yaml").is_file())
    plain = [p for p in dirs if not p.name.endswith("-Music")]
    return (plain or dirs or [None])[0]


def tts_cases(golden: Path) -> Iterator[Case]:
    """Every check whose files exist under `golden/tts`."""
    root = Path(golden) / "tts"
    cases = root / "cases"
    if not cases.is_dir():
        return
    model_dir = find_model_dir(root)
    if model_dir is None:
        return
    g = _Golden(model_dir, cases)
    for name, files, run, tol in CHECKS:
        if not g.has(*files):
            continue
        try:
            ours, ref = run(g)
        except (StepAudioError, RuntimeError, ValueError) as err:
            yield {"case": f"tts/{name}", "pass": False, "error": str(err),
                   "summary": f"failed: {' '.join(str(err).split())[:300]}"}
            continue
        yield compare(name, ours, ref, tol)
