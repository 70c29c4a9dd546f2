"""Step-Audio-Chat prompts, byte for byte as the reference ``StepAudio.apply_chat_template``.

Each turn is ``<|BOT|>{role}\\n{content}<|EOT|>`` (role ``user`` is written ``human``), an audio
turn's content is its ``<audio_N>`` token string, a ``None`` content leaves the turn open, and
``<|BOT|>assistant\\n`` is appended unless the text already ends with it. No BOS here (the
tokenizer adds id 1) and, unlike the Hugging Face chat template, no default system prompt.

Audio arrives already tokenized (a ``<audio_N>`` string or a list of LLM ids): the audio
tokenizer is a separate module.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stepaudio.errors import StepAudioError
from stepaudio.llm.tokens import BOT, EOT, EOT_ID, audio_ids_to_token_str, is_audio_token_str

#: System prompt that makes Step-Audio-Chat transcribe the user's audio (paper §6.2.1).
ASR_SYSTEM_PROMPT = "请记录下你所听到的语音内容。"
#: The reference web demo's system prompt; offered for callers, never inserted implicitly.
DEMO_SYSTEM_PROMPT = "适配用户的语言，用简短口语化的文字回答"
GENERATION_PREFIX = f"{BOT}assistant\n"


class PromptError(StepAudioError):
    """A message the chat template cannot render (empty audio, unknown content type)."""


@dataclass(frozen=True)
class SamplingDefaults:
    """The reference's ``generate`` settings for Step-Audio-Chat.

    Stop on ``<|EOT|>`` (id 3) explicitly: the tokenizer's own eos is ``</s>``, which the model
    never emits, so a server relying on the tokenizer's eos would run to ``max_new_tokens``.
    """

    temperature: float = 0.7
    top_p: float = 0.9
    #: Not in the reference's call: transformers' ``generate`` applies top_k 50 by default and the
    #: checkpoints carry no generation_config.json that would turn it off.
    top_k: int = 50
    max_new_tokens: int = 2048
    do_sample: bool = True
    stop_token_ids: tuple[int, ...] = (EOT_ID,)


def audio_content(audio: str | Sequence[int]) -> str:
    """The text form of an audio turn: a ``<audio_N>`` run, from either accepted input.

    Rejects empty audio (a turn the model would read as silence it never heard) and strings that
    are not token runs, such as a wav path handed over by mistake.
    """
    if isinstance(audio, str):
        if not audio:
            raise PromptError("empty audio turn: the audio tokenizer produced no tokens")
        if not is_audio_token_str(audio):
            raise PromptError("audio content must be <audio_N> tokens (tokenize the wav first)")
        return audio
    ids = list(audio)
    if not ids:
        raise PromptError("empty audio turn: the audio tokenizer produced no tokens")
    try:
        return audio_ids_to_token_str(ids)
    except ValueError as exc:
        raise PromptError(str(exc)) from exc


def _render_content(content: Any) -> str | None:
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, Mapping):
        kind = content.get("type")
        if kind == "text":
            return content["text"]
        if kind == "audio":
            return audio_content(content["audio"])
        raise PromptError(f"unsupported content type {kind!r} (expected 'text' or 'audio')")
    raise PromptError(f"unsupported content {type(content).__name__}")


def apply_chat_template(messages: Iterable[Mapping[str, Any]]) -> str:
    """Render messages (``{"role", "content"}`` dicts) into the Step-Audio-Chat prompt text."""
    text = ""
    for message in messages:
        role = message["role"]
        if role == "user":
            role = "human"
        content = _render_content(message["content"])
        if content is None:
            text += f"{BOT}{role}\n"
        else:
            text += f"{BOT}{role}\n{content}{EOT}"
    if not text.endswith(GENERATION_PREFIX):
        text += GENERATION_PREFIX
    return text


def chat_messages(
    audio: str | Sequence[int],
    history: Iterable[tuple[str, str]] = (),
    system: str | None = None,
) -> list[dict[str, Any]]:
    """Messages for one spoken turn: optional system prompt, text history, newest audio last.

    History is text (earlier user turns as their transcripts), as the model was trained: only the
    last user turn is audio. ``history`` holds ``(role, text)`` pairs with role user/assistant.
    """
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.extend({"role": role, "content": text} for role, text in history)
    messages.append({"role": "user", "content": {"type": "audio", "audio": audio}})
    return messages


def build_chat_prompt(
    audio: str | Sequence[int],
    history: Iterable[tuple[str, str]] = (),
    system: str | None = None,
) -> str:
    """Prompt text for a spoken turn; see :func:`chat_messages`."""
    return apply_chat_template(chat_messages(audio, history, system))


def build_asr_prompt(audio: str | Sequence[int]) -> str:
    """Prompt that makes Step-Audio-Chat transcribe one audio turn (for the text history)."""
    return build_chat_prompt(audio, system=ASR_SYSTEM_PROMPT)
