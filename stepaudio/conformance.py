"""`stepaudio conformance GOLDEN_DIR`: measure this implementation against reference outputs.

Cases are discovered from the golden folder layout, never listed by name, so a new golden set of the
same layout (the held-back acceptance set has other seeds, wavs and texts) is checked with no code
change. Each case yields one JSON-able dict: `case`, `pass`, measured agreement / errors, `summary`.
Suites for the later stages (Step1, prompts, TTS) register themselves in `SUITES`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StepAudioError

Case = dict[str, Any]
Suite = Callable[[Path], Iterator[Case]]
CODE_AGREEMENT = 0.99


def _agreement(ours: np.ndarray | list[int], ref: np.ndarray) -> float:
    ours = np.asarray(ours)
    n = max(len(ours), len(ref))
    if n == 0:
        return 1.0
    m = min(len(ours), len(ref))
    return float((ours[:m] == ref[:m]).sum()) / n


def _load_npy(path: Path) -> np.ndarray | None:
    return np.load(path) if path.is_file() else None


def tokenizer_suite(golden: Path) -> Iterator[Case]:
    """golden/tokenizer/{Step-Audio-Tokenizer, cases/<wav>/...}."""
    root = golden / "tokenizer"
    model_dir = root / "Step-Audio-Tokenizer"
    cases = root / "cases"
    if not (model_dir.is_dir() and cases.is_dir()):
        return
    from .tokenizer import StepAudioTokenizer
    from .tokenizer.interleave import interleave_ids, token_text
    from .tokenizer.semantic import LogMel

    tok = StepAudioTokenizer(model_dir)
    logmel = LogMel()
    for case_dir in sorted(p for p in cases.iterdir() if p.is_dir()):
        for variant in ("notrim", "trim"):
            wav = _load_npy(case_dir / f"wav16k_{variant}.npy")
            ref02 = _load_npy(case_dir / f"vq02_{variant}.npy")
            ref06 = _load_npy(case_dir / f"vq06_{variant}.npy")
            if wav is None or ref02 is None or ref06 is None:
                continue
            res = tok.codes16k(wav.astype(np.float32))
            a02 = _agreement(res.vq02, ref02)
            a06 = _agreement(res.vq06, ref06)
            line: Case = {
                "case": f"tokenizer/{case_dir.name}/{variant}",
                "vq02_agreement": round(a02, 6),
                "vq06_agreement": round(a06, 6),
                "vq02_len": [len(res.vq02), len(ref02)],
                "vq06_len": [len(res.vq06), len(ref06)],
            }
            ok = a02 >= CODE_AGREEMENT and a06 >= CODE_AGREEMENT
            ids_ref = _load_npy(case_dir / f"wav2token_{variant}.npy")
            if ids_ref is not None:
                exact = interleave_ids(ref02.tolist(), ref06.tolist()) == ids_ref.tolist()
                line["ids_exact_given_codes"] = exact
                line["ids_agreement"] = round(_agreement(res.ids, ids_ref), 6)
                ok &= exact
            text_path = case_dir / f"token_str_{variant}.txt"
            if text_path.is_file():
                exact = token_text(ref02.tolist(), ref06.tolist()) == text_path.read_text().strip()
                line["text_exact_given_codes"] = exact
                ok &= exact
            if variant == "notrim":
                mel_ref = _load_npy(case_dir / "whisper_logmel128_notrim.npy")
                if mel_ref is not None:
                    mel = logmel(wav.astype(np.float32))
                    if mel.shape == mel_ref.shape:
                        line["logmel_max_abs_err"] = float(np.abs(mel - mel_ref).max())
                    else:
                        line["logmel_shape"] = [list(mel.shape), list(mel_ref.shape)]
                enc_ref = _load_npy(case_dir / "vq02_enc_out_notrim.npy")
                if enc_ref is not None:
                    dbg = tok.linguistic.encode_debug(wav.astype(np.float32))
                    enc = np.asarray(dbg["enc_out"])
                    if enc.shape == enc_ref.shape:
                        line["enc_out_max_abs_err"] = float(np.abs(enc - enc_ref).max())
                    else:
                        line["enc_out_shape"] = [list(enc.shape), list(enc_ref.shape)]
            line["pass"] = bool(ok)
            line["summary"] = (
                f"vq02 {a02:.2%} vq06 {a06:.2%} of codes identical"
                + ("" if ok else " (need >= 99% and exact ids/text)")
            )
            yield line
        stream_path = case_dir / "vq02_stream_notrim.json"
        wav = _load_npy(case_dir / "wav16k_notrim.npy")
        if stream_path.is_file() and wav is not None:
            spec = json.loads(stream_path.read_text())
            stream = tok.linguistic.new_stream()
            bounds = spec["chunk_bounds"]
            got = []
            for k, (a, b) in enumerate(bounds):
                got.append([int(c) for c in tok.linguistic.feed(
                    stream, wav[a:b].astype(np.float32), is_final=k == len(bounds) - 1
                )])
            want = spec["codes_per_call"]
            calls_equal = sum(g == w for g, w in zip(got, want, strict=True)) if len(got) == len(want) else 0
            ok = got == want
            yield {
                "case": f"tokenizer/{case_dir.name}/vq02_stream",
                "calls": len(want),
                "calls_identical": calls_equal,
                "pass": ok,
                "summary": f"{calls_equal}/{len(want)} streaming calls returned identical codes",
            }


SUITES: list[Suite] = [tokenizer_suite]


def tts_suite(golden: Path) -> Iterator[Case]:
    """golden/tts/{CosyVoice folder, cases/}: CAM++, prompt mel, flow, estimator, HiFT, end to end."""
    from .tts.golden_cases import tts_cases  # torch-heavy: imported only when this suite runs

    yield from tts_cases(golden)


SUITES.append(tts_suite)


def run_conformance(golden_dir: Path) -> Iterator[Case]:
    golden = Path(golden_dir)
    if not golden.is_dir():
        raise StepAudioError(f"{golden}: not a folder")
    for suite in SUITES:
        yield from suite(golden)
