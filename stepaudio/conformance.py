"""`stepaudio conformance GOLDEN_DIR`: measure this implementation against reference outputs.

Cases are discovered from the golden folder layout, never listed by name, so a new golden set of the
same layout (the held-back acceptance set has other seeds, wavs and texts) is checked with no code
change. Each case yields one JSON-able dict: `case`, `pass`, measured agreement / errors, `summary`.
Suites for the later stages register themselves in `SUITES`.
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


LOGITS_MAX_REL_ERR = 1e-4


def _max_rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the issue's rule, robust to near-zero reference entries."""
    scale = float(np.abs(ref).max()) or 1.0
    return float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max()) / scale


def step1_suite(golden: Path) -> Iterator[Case]:
    """golden/step1/{model/, alibi_slopes.npy, <seq>_input_ids.npy, <seq>_logits.npy, ...}.

    Sequences are every ``*_input_ids.npy``; each is checked in fp32 for the full-sequence logits
    and final hidden state, and for the last position computed incrementally through the cache.
    """
    root = golden / "step1"
    model_dir = root / "model"
    seqs = sorted(root.glob("*_input_ids.npy")) if root.is_dir() else []
    if not (model_dir / "config.json").is_file() or not seqs:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from .llm import compat, register_step1
    from .llm.alibi import alibi_slopes

    register_step1()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, **{compat.DTYPE_KWARG: torch.float32}
    ).eval()
    slopes_path = root / "alibi_slopes.npy"
    if slopes_path.is_file():
        ref = np.load(slopes_path)
        ours = np.float32(alibi_slopes(model.config.num_attention_heads))
        err = _max_rel_err(ours, ref) if ours.shape == ref.shape else float("inf")
        yield {
            "case": "step1/alibi_slopes",
            "heads": model.config.num_attention_heads,
            "max_rel_err": err,
            "pass": err <= 1e-6,
            "summary": f"{len(ours)} slopes, max relative error {err:.2e}",
        }
    for ids_path in seqs:
        name = ids_path.name.removesuffix("_input_ids.npy")
        ids = torch.from_numpy(np.load(ids_path)).long()
        if ids.dim() == 1:
            ids = ids[None]
        line: Case = {"case": f"step1/{name}", "tokens": int(ids.shape[1])}
        ok = True
        with torch.no_grad():
            out = model(ids, use_cache=True, output_hidden_states=True)
            logits = out.logits.numpy()
            hidden = out.hidden_states[-1].numpy()
            prefix = model(ids[:, :-1], use_cache=True) if ids.shape[1] > 1 else None
            if prefix is not None:
                cache = getattr(prefix, compat.CACHE_FIELD)
                step = model(ids[:, -1:], use_cache=True, **{compat.CACHE_FIELD: cache})
                incremental = step.logits[:, -1].numpy()
        for key, ours, ref_name in (
            ("logits", logits, f"{name}_logits.npy"),
            ("final_hidden", hidden, f"{name}_final_hidden.npy"),
        ):
            ref = _load_npy(root / ref_name)
            if ref is None:
                continue
            if ours.shape != ref.shape:
                line[f"{key}_shape"] = [list(ours.shape), list(ref.shape)]
                ok = False
                continue
            err = _max_rel_err(ours, ref)
            line[f"{key}_max_rel_err"] = err
            ok &= err <= LOGITS_MAX_REL_ERR
            if key == "logits":
                line["argmax_last"] = [int(ours[0, -1].argmax()), int(ref[0, -1].argmax())]
                if prefix is not None:
                    inc_err = _max_rel_err(incremental, ref[:, -1])
                    line["incremental_last_max_rel_err"] = inc_err
                    ok &= inc_err <= LOGITS_MAX_REL_ERR
        line["pass"] = bool(ok)
        errs = ", ".join(
            f"{k.removesuffix('_max_rel_err')} {v:.1e}" for k, v in line.items()
            if k.endswith("_max_rel_err")
        )
        line["summary"] = f"max relative error {errs}" + (
            "" if ok else f" (need <= {LOGITS_MAX_REL_ERR:g} and matching shapes)"
        )
        yield line


def _audio_token_str(golden: Path, audio_ref: str, tokenizer_cache: dict[str, Any]) -> str | None:
    """The notrim ``<audio_N>`` string of a wav named in a golden chat case.

    Taken from the tokenizer case of the same stem when there is one; otherwise the wav is looked
    up beside the golden folder (the shared layout has golden/ and audio/ side by side) and
    tokenized with the golden tokenizer, which is how the reference made the prompt.
    """
    stem = Path(audio_ref).stem
    text = golden / "tokenizer" / "cases" / stem / "token_str_notrim.txt"
    if text.is_file():
        return text.read_text(encoding="utf-8").strip()
    for base in (golden.parent / "audio", golden.parent.parent / "audio"):
        for wav in (base / audio_ref, base / Path(audio_ref).name):
            if wav.is_file():
                if "tok" not in tokenizer_cache:
                    from .tokenizer import StepAudioTokenizer

                    tokenizer_cache["tok"] = StepAudioTokenizer(
                        golden / "tokenizer" / "Step-Audio-Tokenizer"
                    )
                return tokenizer_cache["tok"].tokenize_file(wav).text
    return None


def _load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def prompts_suite(golden: Path) -> Iterator[Case]:
    """golden/prompts/{tokenizer/, tokenizer_checks.json, chat_prompts.json, tts_prompts.json,
    sys_prompts.json, detect_instruction_name.json}: all exact (strings and ids)."""
    root = golden / "prompts"
    if not (root / "tokenizer").is_dir():
        return
    from .llm.prompt import PromptError, apply_chat_template
    from .llm.tokenizer import load_text_tokenizer
    from .tts.prompt import (
        SYS_PROMPTS,
        build_tts_prompt_ids,
        detect_instruction_name,
        system_prompt_key,
    )

    tok = load_text_tokenizer(root / "tokenizer")
    tok_no_bos = load_text_tokenizer(root / "tokenizer", add_bos_token=False)

    checks = _load_json(root / "tokenizer_checks.json")
    if checks:
        bad = [text for text, case in checks.items()
               if tok.encode(text) != case["fast"]
               or ("pieces" in case and tok.convert_ids_to_tokens(case["fast"]) != case["pieces"])]
        yield {
            "case": "prompts/tokenizer_checks",
            "checked": len(checks),
            "failed": bad,
            "pass": not bad,
            "summary": f"{len(checks) - len(bad)}/{len(checks)} strings encode to the reference ids",
        }

    sys_prompts = _load_json(root / "sys_prompts.json")
    if sys_prompts:
        bad = sorted(k for k, v in sys_prompts.items() if SYS_PROMPTS.get(k) != v)
        yield {
            "case": "prompts/sys_prompts",
            "checked": len(sys_prompts),
            "failed": bad,
            "pass": not bad,
            "summary": f"{len(sys_prompts) - len(bad)}/{len(sys_prompts)} system prompts identical",
        }

    detect = _load_json(root / "detect_instruction_name.json")
    if detect:
        bad = [t for t, want in detect.items() if detect_instruction_name(t) != want]
        yield {
            "case": "prompts/detect_instruction_name",
            "checked": len(detect),
            "failed": bad,
            "pass": not bad,
            "summary": f"{len(detect) - len(bad)}/{len(detect)} instruction tags found as the reference",
        }

    chats = _load_json(root / "chat_prompts.json") or {}
    tokenizer_cache: dict[str, Any] = {}
    for name, case in chats.items():
        line: Case = {"case": f"prompts/chat/{name}"}
        messages = []
        missing = None
        for msg in case["messages"]:
            content = msg["content"]
            if isinstance(content, dict) and content.get("type") == "audio":
                audio = _audio_token_str(golden, content["audio"], tokenizer_cache)
                if audio is None:
                    missing = content["audio"]
                    break
                content = {"type": "audio", "audio": audio}
            messages.append({"role": msg["role"], "content": content})
        if missing is not None:
            yield {**line, "pass": False,
                   "summary": f"audio tokens for {missing} not found (no tokenizer case, no wav)"}
            continue
        try:
            text = apply_chat_template(messages)
        except PromptError as exc:
            yield {**line, "pass": False, "summary": f"template refused the case: {exc}"}
            continue
        text_ok = text == case["text_with_audio"]
        ids = tok.encode(text)
        ids_ok = ids == case["token_ids"]
        yield {
            **line,
            "text_exact": text_ok,
            "ids_exact": ids_ok,
            "ids_len": [len(ids), len(case["token_ids"])],
            "pass": text_ok and ids_ok,
            "summary": f"prompt text {'identical' if text_ok else 'DIFFERS'}, "
            f"{len(ids)} ids {'identical' if ids_ok else 'DIFFER'}",
        }

    tts = _load_json(root / "tts_prompts.json") or {}
    for name, case in tts.items():
        speaker = case["prompt_speaker_passed_to_tokenize"]
        args = (case["text"], case["prompt_text"], speaker, case["prompt_code"])
        key_ok = system_prompt_key(case["text"], speaker) == case["sys_prompt_key_selected"]
        line = {"case": f"prompts/tts/{name}", "sys_prompt_key_exact": key_ok}
        ok = key_ok
        for variant, encoder in (("add_bos_token_true", tok), ("add_bos_token_false", tok_no_bos)):
            want = case.get(f"token_ids_{variant}")
            if want is None:
                continue
            got = build_tts_prompt_ids(encoder, *args)
            line[f"ids_exact_{variant}"] = got == want
            ok &= got == want
        line["pass"] = bool(ok)
        line["summary"] = (
            f"{len(case.get('token_ids_add_bos_token_true', []))} ids, system prompt and ids "
            + ("identical" if ok else "DIFFER")
        )
        yield line


SUITES: list[Suite] = [tokenizer_suite, step1_suite, prompts_suite]


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
