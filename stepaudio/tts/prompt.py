"""Step-Audio-TTS-3B prompts, id for id as the reference ``StepAudioTTS.tokenize`` builds them.

Layout (every ``enc`` is a plain ``tokenizer.encode``, so with ``add_bos_token`` each piece
starts with BOS and the prompt reads ``[1, 4, 1, ...]``)::

    [1, 4] + enc("system\\n" + SYS) + [3]
    + [4] + enc("human\\n") + enc("\\n" + prompt_text)[len(enc("\\n")):] + [3]
    + [4] + enc("assistant\\n") + prompt_code + [3]
    + [4] + enc("human\\n") + enc("\\n" + text)[len(enc("\\n")):] + [3]
    + [4] + enc("assistant\\n")

The ``"\\n" + text`` trick encodes the text as a continuation, so its first word does not get the
word-initial ``▁`` it would get at the start of a sequence. A leading RAP or 哼唱 tag switches
the system prompt, the speaker entry (``f"{speaker}{tag}"``) and the vocoder folder.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from stepaudio.errors import ConfigError, StepAudioError
from stepaudio.llm.tokens import BOS_ID, BOT_ID, EOT_ID

_SHARED_HEAD = (
    "作为一名卓越的声优演员，你的任务是根据文本中（）或()括号内标注的情感、语种或方言、音乐哼唱、"
    "语音调整等标签，以丰富细腻的情感和自然顺畅的语调来朗读文本。\n"
    "# 情感标签涵盖了多种情绪状态，包括但不限于：\n"
    '- "高兴1"\n- "高兴2"\n- "生气1"\n- "生气2"\n- "悲伤1"\n- "撒娇1"\n\n'
    "# 语种或方言标签包含多种语言或方言，包括但不限于：\n"
    '- "中文"\n- "英文"\n- "韩语"\n- "日语"\n- "四川话"\n- "粤语"\n- "广东话"\n\n'
    "# 音乐哼唱标签包含多种类型歌曲哼唱，包括但不限于：\n"
    '- "RAP"\n- "哼唱"\n\n'
    "# 语音调整标签，包括但不限于：\n"
    '- "慢速1"\n- "慢速2"\n- "快速1"\n- "快速2"\n\n'
    "请在朗读时，"
)
_SHARED_TAIL = (
    "根据这些情感标签的指示，调整你的情感、语气、语调和哼唱节奏，以确保文本的情感和意义得到准确而生动的传达，"
    "如果没有()或（）括号，则根据文本语义内容自由演绎。"
)

#: The four system prompts of the reference; ``sys_prompt_with_spk`` has ``{}`` for the speaker.
SYS_PROMPTS: dict[str, str] = {
    "sys_prompt_for_rap": "请参考对话历史里的音色，用RAP方式将文本内容大声说唱出来。",
    "sys_prompt_for_vocal": "请参考对话历史里的音色，用哼唱的方式将文本内容大声唱出来。",
    "sys_prompt_wo_spk": _SHARED_HEAD + _SHARED_TAIL,
    "sys_prompt_with_spk": _SHARED_HEAD + "使用[{}]的声音，" + _SHARED_TAIL,
}

#: Instruction tags the model was trained on (the lists inside the system prompts).
INSTRUCTION_TAGS: dict[str, tuple[str, ...]] = {
    "emotion": ("高兴1", "高兴2", "生气1", "生气2", "悲伤1", "撒娇1"),
    "language": ("中文", "英文", "韩语", "日语", "四川话", "粤语", "广东话"),
    "music": ("RAP", "哼唱"),
    "speed": ("慢速1", "慢速2", "快速1", "快速2"),
}
RAP_TAG = "RAP"
HUMMING_TAG = "哼唱"
MUSIC_TAGS = (RAP_TAG, HUMMING_TAG)

VOCODER_FOLDER = "CosyVoice-300M-25Hz"
MUSIC_VOCODER_FOLDER = "CosyVoice-300M-25Hz-Music"

_FIRST_TAG = re.compile(r"^([（\(][^\(\)()]*[）\)]).*$", re.DOTALL)


class TTSPromptError(StepAudioError):
    """Input the TTS prompt cannot be built from (empty text, no prompt audio)."""


class UnknownSpeakerError(StepAudioError):
    """A speaker id that is not registered."""


class TextEncoder(Protocol):
    """Anything with ``encode(text) -> ids``, e.g. a transformers tokenizer."""

    def encode(self, text: str) -> list[int]: ...


def detect_instruction_name(text: str) -> str:
    """The first ``(tag)``/``（tag）`` at the very start of the text, without brackets; else "".

    Mixed brackets (``(RAP）``) count, as in the reference regex; a tag later in the text does not.
    """
    match = _FIRST_TAG.match(text)
    return match.group(1).strip("()（）") if match else ""


def is_music(text: str) -> bool:
    """True when the text starts with a RAP or 哼唱 tag (music vocoder and speaker entry)."""
    return detect_instruction_name(text) in MUSIC_TAGS


def system_prompt_key(text: str, prompt_speaker: str) -> str:
    """Which system prompt the reference picks.

    Music first: 哼唱 anywhere in a music-tagged text selects the humming prompt (so a RAP tag with
    哼唱 in the lyrics sings), the other music case raps; then named speaker, else cloning.
    """
    if is_music(text):
        return "sys_prompt_for_vocal" if HUMMING_TAG in text else "sys_prompt_for_rap"
    return "sys_prompt_with_spk" if prompt_speaker else "sys_prompt_wo_spk"


def system_prompt(text: str, prompt_speaker: str) -> str:
    """The system prompt text, with the speaker filled in where the prompt names one."""
    key = system_prompt_key(text, prompt_speaker)
    prompt = SYS_PROMPTS[key]
    return prompt.format(prompt_speaker) if key == "sys_prompt_with_spk" else prompt


def vocoder_folder(text: str) -> str:
    """The CosyVoice folder (inside the TTS-3B checkpoint) that renders this text."""
    return MUSIC_VOCODER_FOLDER if is_music(text) else VOCODER_FOLDER


def speaker_entry_id(speaker: str, text: str) -> str:
    """The speakers_info key whose prompt conditions this text: ``TingtingRAP`` for a RAP text."""
    tag = detect_instruction_name(text)
    return f"{speaker}{tag}" if tag in MUSIC_TAGS else speaker


def _continuation(encoder: TextEncoder, text: str, prefix_len: int) -> list[int]:
    return list(encoder.encode("\n" + text))[prefix_len:]


def build_tts_prompt_ids(
    encoder: TextEncoder,
    text: str,
    prompt_text: str,
    prompt_speaker: str,
    prompt_code: Sequence[int],
) -> list[int]:
    """The TTS-3B input ids (reference ``tokenize``); ``prompt_speaker`` is "" for cloning.

    ``prompt_code`` holds the prompt wav's LLM audio ids (65536 + code, trimmed ``wav2token``).
    """
    if not text.strip():
        raise TTSPromptError("nothing to synthesise: the text is empty")
    if len(prompt_code) == 0:
        raise TTSPromptError("the speaker prompt has no audio tokens")
    sys_tokens = list(encoder.encode(f"system\n{system_prompt(text, prompt_speaker)}"))
    prefix_len = len(encoder.encode("\n"))
    human = list(encoder.encode("human\n"))
    assistant = list(encoder.encode("assistant\n"))
    return (
        [BOS_ID, BOT_ID, *sys_tokens, EOT_ID]
        + [BOT_ID, *human, *_continuation(encoder, prompt_text, prefix_len), EOT_ID]
        + [BOT_ID, *assistant, *(int(c) for c in prompt_code), EOT_ID]
        + [BOT_ID, *human, *_continuation(encoder, text, prefix_len), EOT_ID]
        + [BOT_ID, *assistant]
    )


@dataclass(frozen=True)
class Speaker:
    """A registered voice: its prompt transcript and prompt wav."""

    id: str
    prompt_text: str
    prompt_wav: Path


class SpeakerRegistry:
    """Speakers from a folder holding ``speakers_info.json`` and ``{id}_prompt.wav`` files."""

    def __init__(self, speakers: Mapping[str, Speaker]) -> None:
        self._speakers = dict(speakers)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> SpeakerRegistry:
        """Read ``speakers_info.json`` (id -> prompt transcript); every wav must exist.

        A missing wav fails here, at start-up, rather than at the first request for that voice.
        """
        folder = Path(folder)
        info_path = folder / "speakers_info.json"
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read speakers from {info_path}: {exc}") from exc
        if not isinstance(info, dict):
            raise ConfigError(f"{info_path} must map speaker ids to prompt texts")
        speakers = {}
        for speaker_id, prompt_text in info.items():
            wav = folder / f"{speaker_id}_prompt.wav"
            if not wav.is_file():
                raise ConfigError(f"speaker {speaker_id!r}: prompt wav {wav} is missing")
            speakers[speaker_id] = Speaker(str(speaker_id), str(prompt_text), wav)
        return cls(speakers)

    @property
    def ids(self) -> list[str]:
        return list(self._speakers)

    def __contains__(self, speaker_id: object) -> bool:
        return speaker_id in self._speakers

    def __iter__(self) -> Iterator[Speaker]:
        return iter(self._speakers.values())

    def __len__(self) -> int:
        return len(self._speakers)

    def get(self, speaker_id: str) -> Speaker:
        try:
            return self._speakers[speaker_id]
        except KeyError:
            known = ", ".join(sorted(self._speakers)) or "none"
            raise UnknownSpeakerError(f"unknown speaker {speaker_id!r} (known: {known})") from None

    def for_text(self, speaker_id: str, text: str) -> Speaker:
        """The entry that conditions ``text``: the RAP/哼唱 variant when the text starts so."""
        return self.get(speaker_entry_id(speaker_id, text))


def default_speakers_dir() -> Path:
    """The speakers shipped with the package (Tingting, TingtingRAP, Tingting哼唱)."""
    return Path(__file__).resolve().parent.parent / "assets" / "speakers"
