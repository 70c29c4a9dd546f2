"""Text tokenizer, chat prompts and TTS-3B prompts against the golden reference outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stepaudio.llm.prompt import (
    ASR_SYSTEM_PROMPT,
    PromptError,
    SamplingDefaults,
    apply_chat_template,
    build_asr_prompt,
    build_chat_prompt,
)
from stepaudio.llm.tokenizer import load_text_tokenizer
from stepaudio.llm.tokens import audio_ids_to_token_str, audio_token_str_to_ids
from stepaudio.tts.prompt import (
    MUSIC_VOCODER_FOLDER,
    SYS_PROMPTS,
    VOCODER_FOLDER,
    SpeakerRegistry,
    TTSPromptError,
    UnknownSpeakerError,
    build_tts_prompt_ids,
    default_speakers_dir,
    detect_instruction_name,
    speaker_entry_id,
    system_prompt_key,
    vocoder_folder,
)


def _load(golden_dir: Path, name: str):
    return json.loads((golden_dir / "prompts" / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer(golden_dir: Path):
    return load_text_tokenizer(golden_dir / "prompts" / "tokenizer")


@pytest.fixture(scope="module")
def tokenizer_no_bos(golden_dir: Path):
    return load_text_tokenizer(golden_dir / "prompts" / "tokenizer", add_bos_token=False)


def _with_audio_tokens(golden_dir: Path, messages: list[dict]) -> list[dict]:
    """Replace each audio path by its golden notrim token string (our audio tokenizer's output)."""
    out = []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, dict) and content.get("type") == "audio":
            stem = Path(content["audio"]).stem
            path = golden_dir / "tokenizer" / "cases" / stem / "token_str_notrim.txt"
            content = {"type": "audio", "audio": path.read_text(encoding="utf-8").strip()}
        out.append({"role": msg["role"], "content": content})
    return out


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_encodes_golden_checks_like_the_fast_reference(tokenizer, golden_dir):
    for text, case in _load(golden_dir, "tokenizer_checks.json").items():
        assert tokenizer.encode(text) == case["fast"], text
        assert tokenizer.convert_ids_to_tokens(case["fast"]) == case["pieces"], text


def test_tokenizer_special_ids_are_the_step_audio_ones(tokenizer):
    assert tokenizer.convert_tokens_to_ids(["<s>", "<|EOT|>", "<|BOT|>"]) == [1, 3, 4]
    assert tokenizer.convert_tokens_to_ids(["<audio_0>", "<audio_5119>"]) == [65536, 70655]


def test_audio_ids_and_token_strings_round_trip():
    ids = [65548, 66566, 70655]
    assert audio_ids_to_token_str(ids) == "<audio_12><audio_1030><audio_5119>"
    assert audio_token_str_to_ids(audio_ids_to_token_str(ids)) == ids
    with pytest.raises(ValueError):
        audio_ids_to_token_str([12])


# --- chat prompts ------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["three_turn_history_audio_last", "asr_audio_then_none_prefill"])
def test_chat_template_string_and_ids_match_reference(tokenizer, golden_dir, case):
    golden = _load(golden_dir, "chat_prompts.json")[case]
    messages = _with_audio_tokens(golden_dir, golden["messages"])
    text = apply_chat_template(messages)
    assert text == golden["text_with_audio"]
    assert tokenizer.encode(text) == golden["token_ids"]


def test_chat_template_accepts_audio_as_llm_ids(golden_dir):
    golden = _load(golden_dir, "chat_prompts.json")["three_turn_history_audio_last"]
    messages = _with_audio_tokens(golden_dir, golden["messages"])
    audio = messages[-1]["content"]
    messages[-1] = {
        "role": "user",
        "content": {**audio, "audio": audio_token_str_to_ids(audio["audio"])},
    }
    assert apply_chat_template(messages) == golden["text_with_audio"]


def test_build_chat_prompt_puts_text_history_before_newest_audio(golden_dir):
    golden = _load(golden_dir, "chat_prompts.json")["three_turn_history_audio_last"]
    messages = _with_audio_tokens(golden_dir, golden["messages"])
    texts = [
        m["content"] if isinstance(m["content"], str) else m["content"]["text"]
        for m in messages[1:-1]
    ]
    history = [(m["role"], t) for m, t in zip(messages[1:-1], texts, strict=True)]
    prompt = build_chat_prompt(
        messages[-1]["content"]["audio"], history, system=messages[0]["content"]
    )
    assert prompt == golden["text_with_audio"]


def test_asr_prompt_matches_reference_asr_case(golden_dir):
    golden = _load(golden_dir, "chat_prompts.json")["asr_audio_then_none_prefill"]
    audio = _with_audio_tokens(golden_dir, golden["messages"])[1]["content"]["audio"]
    assert golden["messages"][0]["content"] == ASR_SYSTEM_PROMPT
    assert build_asr_prompt(audio) == golden["text_with_audio"]


def test_chat_template_adds_no_default_system_prompt_and_one_generation_prefix():
    assert apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|BOT|>human\nhi<|EOT|><|BOT|>assistant\n"
    )
    assert apply_chat_template([{"role": "assistant", "content": None}]) == "<|BOT|>assistant\n"


@pytest.mark.parametrize("audio", ["", [], "some/file.wav", [12, 13]])
def test_chat_template_refuses_empty_or_untokenized_audio(audio):
    with pytest.raises(PromptError):
        apply_chat_template([{"role": "user", "content": {"type": "audio", "audio": audio}}])


def test_sampling_defaults_are_the_reference_ones():
    d = SamplingDefaults()
    assert (d.temperature, d.top_p, d.max_new_tokens, d.stop_token_ids) == (0.7, 0.9, 2048, (3,))


# --- TTS-3B prompts ----------------------------------------------------------------------------


def test_sys_prompts_equal_reference(golden_dir):
    assert _load(golden_dir, "sys_prompts.json") == SYS_PROMPTS


def test_detect_instruction_name_matches_reference(golden_dir):
    for text, expected in _load(golden_dir, "detect_instruction_name.json").items():
        assert detect_instruction_name(text) == expected, text


@pytest.mark.parametrize(
    "case",
    ["speaker_tingting_tags", "clone_yuqian", "speaker_tingting_rap", "speaker_tingting_humming"],
)
def test_tts_prompt_ids_match_reference_with_and_without_bos(
    tokenizer, tokenizer_no_bos, golden_dir, case
):
    golden = _load(golden_dir, "tts_prompts.json")[case]
    speaker = golden["prompt_speaker_passed_to_tokenize"]
    args = (golden["text"], golden["prompt_text"], speaker, golden["prompt_code"])
    assert system_prompt_key(golden["text"], speaker) == golden["sys_prompt_key_selected"]
    assert build_tts_prompt_ids(tokenizer, *args) == golden["token_ids_add_bos_token_true"]
    assert build_tts_prompt_ids(tokenizer_no_bos, *args) == golden["token_ids_add_bos_token_false"]


@pytest.mark.parametrize(
    "case", ["speaker_tingting_tags", "speaker_tingting_rap", "speaker_tingting_humming"]
)
def test_named_speaker_resolves_entry_wav_and_vocoder_like_reference(golden_dir, case):
    golden = _load(golden_dir, "tts_prompts.json")[case]
    text = golden["text"]
    assert detect_instruction_name(text) == golden["instruction_name"]
    assert speaker_entry_id(golden["speaker_arg"], text) == golden["speakers_info_key"]
    music = golden["instruction_name"] in ("RAP", "哼唱")
    assert vocoder_folder(text) == (MUSIC_VOCODER_FOLDER if music else VOCODER_FOLDER)
    speaker = SpeakerRegistry.from_dir(default_speakers_dir()).for_text(golden["speaker_arg"], text)
    assert speaker.prompt_text == golden["prompt_text"]
    assert speaker.prompt_wav.name == Path(golden["prompt_wav"]).name


def test_unknown_speaker_is_a_clear_error():
    registry = SpeakerRegistry.from_dir(default_speakers_dir())
    with pytest.raises(UnknownSpeakerError, match="Tingting"):
        registry.get("Nobody")


def test_empty_tts_text_is_refused(tokenizer):
    with pytest.raises(TTSPromptError):
        build_tts_prompt_ids(tokenizer, "  \n", "prompt", "Tingting", [65536])
