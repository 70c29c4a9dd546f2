"""`stepaudio tts` and the speak-to-wav pipeline on the tiny checkpoints."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from stepaudio.cli import main
from stepaudio.pipeline import speak_reply
from stepaudio.tts.prompt import TTSPromptError
from stepaudio.tts.synthesizer import Synthesizer


def test_tts_speaks_a_named_speaker_into_a_22050_hz_wav(tiny_root, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert main(["tts", "--models", str(tiny_root), "--text", "(高兴1)你好，今天天气真好。",
                 "--speaker", "Tingting", "--seed", "1", "-o", str(out)]) == 0
    info = sf.info(str(out))
    assert info.samplerate == 22050 and info.channels == 1 and info.frames > 22050 // 2
    assert "1 clause(s)" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["hello.wav"]  # no temporary left behind


def test_tts_clones_a_voice_from_a_prompt_wav(tiny_root, tmp_path, audio_dir):
    out = tmp_path / "clone.wav"
    assert main(["tts", "--models", str(tiny_root), "--text", "Nice to meet you.", "--prompt-wav",
                 str(audio_dir / "prompt_wav_lixueqin.wav"), "--prompt-text", "一段示例文字",
                 "--seed", "2", "-o", str(out)]) == 0
    wav, sr = sf.read(str(out))
    assert sr == 22050 and len(wav) > 0 and np.isfinite(wav).all()


@pytest.mark.parametrize("args, message", [
    (["--text", "   "], "nothing to synthesise"),
    (["--text", "你好", "--speaker", "Nobody"], "unknown speaker 'Nobody'"),
    (["--text", "你好", "--prompt-wav", "PROMPT"], "transcript"),
    (["--text", "你好", "--prompt-wav", "SHORT", "--prompt-text", "短"], "at least 1 s"),
    (["--text", "你好", "--speaker", "Tingting", "--prompt-wav", "PROMPT", "--prompt-text", "x"],
     "not both"),
])
def test_tts_bad_input_is_one_error_line_and_no_file(tiny_root, tmp_path, audio_dir, capsys, args,
                                                     message):
    short = tmp_path / "short.wav"
    sf.write(str(short), np.full(8000, 0.1, np.float32), 16000)
    args = [str(audio_dir / "prompt_wav_lixueqin.wav") if a == "PROMPT" else
            str(short) if a == "SHORT" else a for a in args]
    out = tmp_path / "out.wav"
    assert main(["tts", "--models", str(tiny_root), *args, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()


async def test_speak_reply_takes_llm_deltas_and_writes_what_it_streamed(tiny_root, tmp_path):
    synth = Synthesizer.from_model_root(tiny_root)

    async def deltas():
        for piece in ["你好", "，我是", "你的助手。", "有什么", "事吗？"]:
            await asyncio.sleep(0)
            yield piece

    try:
        result = await speak_reply(synth, deltas(), tmp_path / "reply.wav",
                                   synth.voice("Tingting"), seed=3)
        wav, sr = sf.read(str(result.path), dtype="float32")
        assert sr == 22050 and result.seconds == pytest.approx(len(wav) / sr)
        assert result.report.clauses == ["你好，我是你的助手。", "有什么事吗？"]  # 你好， is too short
        with pytest.raises(TTSPromptError):
            await speak_reply(synth, "……", tmp_path / "empty.wav", synth.voice("Tingting"))
        assert not (tmp_path / "empty.wav").exists()
    finally:
        await synth.aclose()


async def test_speak_reply_passes_on_a_failing_text_source(tiny_root, tmp_path):
    synth = Synthesizer.from_model_root(tiny_root)

    async def broken():
        yield "你好。"
        raise RuntimeError("chat engine went away")

    try:
        with pytest.raises(RuntimeError, match="went away"):
            await speak_reply(synth, broken(), tmp_path / "x.wav", synth.voice("Tingting"), seed=1)
        assert list(Path(tmp_path).iterdir()) == []  # noqa: ASYNC240 - a test's check of a tmp dir
    finally:
        await synth.aclose()
