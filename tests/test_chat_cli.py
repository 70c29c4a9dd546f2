"""`stepaudio chat`: one spoken turn on the tiny checkpoints, answered in text (and speech), in seconds."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import soundfile as sf

from stepaudio.cli import main as cli_main


def test_chat_prints_a_reply_for_a_wav_on_tiny_checkpoints(tiny_root: Path, audio_dir, capsys):
    started = time.perf_counter()
    rc = cli_main(["chat", "--models", str(tiny_root), str(audio_dir / "multilingual1.wav"),
                   "--max-new-tokens", "24", "--seed", "3"])
    elapsed = time.perf_counter() - started
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip()  # babble, but a reply
    assert "[transformers] audio 95 ids" in captured.err  # the reference's 95 ids for this wav
    assert "reply 24 tokens" in captured.err and "finish length" in captured.err
    assert elapsed < 60


def test_chat_reply_is_reproducible_with_a_seed(tiny_root: Path, audio_dir, capsys):
    args = ["chat", "--models", str(tiny_root), str(audio_dir / "prompt_wav_yuqian.wav"),
            "--max-new-tokens", "10", "--seed", "7", "--no-system"]
    assert cli_main(args) == 0
    first = capsys.readouterr().out
    assert cli_main(args) == 0
    assert capsys.readouterr().out == first


def test_chat_with_output_wav_speaks_the_reply(tiny_root, audio_dir, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    rc = cli_main(["chat", "--models", str(tiny_root), str(audio_dir / "multilingual1.wav"),
                   "-o", str(out), "--max-new-tokens", "16", "--seed", "1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    wav, sr = sf.read(out)
    assert sr == 22050 and len(wav) > sr // 10 and np.abs(wav).max() > 0.01
    assert "reply speech:" in err


def test_chat_on_a_wav_too_short_for_any_audio_token_is_one_clear_line(
    tiny_root: Path, tmp_path: Path, capsys
):
    wav = tmp_path / "blip.wav"
    sf.write(wav, np.zeros(800, np.float32), 16000)  # 50 ms: no complete 120 ms token group
    rc = cli_main(["chat", "--models", str(tiny_root), str(wav)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error:") and "\n" not in err


def test_chat_with_a_missing_model_root_is_one_clear_line(tmp_path: Path, audio_dir, capsys):
    rc = cli_main(["chat", "--models", str(tmp_path / "nope"), str(audio_dir / "multilingual1.wav")])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "model root not found" in err
