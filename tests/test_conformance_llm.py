"""`stepaudio conformance` for the Step1 model and the prompts: discovered from the folder layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stepaudio.cli import main as cli_main
from stepaudio.conformance import prompts_suite, step1_suite


def _copy_step1(golden_dir: Path, dest: Path) -> Path:
    shutil.copytree(golden_dir / "step1", dest / "step1")
    return dest / "step1"


def test_every_public_step1_case_passes(golden_dir):
    lines = list(step1_suite(golden_dir))
    names = {line["case"] for line in lines}
    assert {"step1/alibi_slopes", "step1/seqA", "step1/seqB"} <= names
    assert all(line["pass"] for line in lines), [x for x in lines if not x["pass"]]
    seq = next(x for x in lines if x["case"] == "step1/seqA")
    assert seq["logits_max_rel_err"] <= 1e-4 and seq["final_hidden_max_rel_err"] <= 1e-4
    assert seq["incremental_last_max_rel_err"] <= 1e-4


def test_every_public_prompt_case_passes(golden_dir):
    lines = list(prompts_suite(golden_dir))
    names = {line["case"] for line in lines}
    chats = json.loads((golden_dir / "prompts" / "chat_prompts.json").read_text())
    tts = json.loads((golden_dir / "prompts" / "tts_prompts.json").read_text())
    assert {f"prompts/chat/{n}" for n in chats} | {f"prompts/tts/{n}" for n in tts} <= names
    assert {"prompts/tokenizer_checks", "prompts/sys_prompts",
            "prompts/detect_instruction_name"} <= names
    assert all(line["pass"] for line in lines), [x for x in lines if not x["pass"]]


def test_step1_sequences_are_found_by_file_name_not_listed(golden_dir, tmp_path):
    root = _copy_step1(golden_dir, tmp_path)
    for suffix in ("input_ids", "logits", "final_hidden"):
        (root / f"seqB_{suffix}.npy").rename(root / f"heldback7_{suffix}.npy")
    names = {line["case"] for line in step1_suite(tmp_path)}
    assert "step1/heldback7" in names and "step1/seqB" not in names


def test_step1_case_fails_when_the_logits_are_off_by_more_than_1e4(golden_dir, tmp_path):
    root = _copy_step1(golden_dir, tmp_path)
    ref = np.load(root / "seqA_logits.npy")
    np.save(root / "seqA_logits.npy", ref * (1 + 3e-4))
    line = next(x for x in step1_suite(tmp_path) if x["case"] == "step1/seqA")
    assert not line["pass"] and line["logits_max_rel_err"] > 1e-4


def test_chat_case_without_a_tokenizer_case_tokenizes_the_wav_beside_the_golden_set(
    golden_dir, audio_dir, tmp_path
):
    golden = tmp_path / "golden"
    shutil.copytree(golden_dir / "prompts", golden / "prompts")
    (golden / "tokenizer").mkdir()
    (golden / "tokenizer" / "Step-Audio-Tokenizer").symlink_to(
        golden_dir / "tokenizer" / "Step-Audio-Tokenizer"
    )
    chats = json.loads((golden / "prompts" / "chat_prompts.json").read_text())
    for case in chats.values():
        for msg in case["messages"]:
            content = msg["content"]
            if isinstance(content, dict) and content.get("type") == "audio":
                dest = tmp_path / "audio" / content["audio"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(audio_dir / Path(content["audio"]).name, dest)
    lines = [x for x in prompts_suite(golden) if x["case"].startswith("prompts/chat/")]
    assert len(lines) == len(chats) and all(x["pass"] for x in lines), lines


def test_chat_case_whose_audio_cannot_be_found_fails_and_says_why(golden_dir, tmp_path):
    golden = tmp_path / "golden"
    shutil.copytree(golden_dir / "prompts", golden / "prompts")
    lines = [x for x in prompts_suite(golden) if x["case"].startswith("prompts/chat/")]
    assert lines and not any(x["pass"] for x in lines)
    assert all("not found" in x["summary"] for x in lines)


@pytest.mark.parametrize("suite", ["step1", "prompts"])
def test_conformance_cli_runs_the_llm_suites(golden_dir, tmp_path, capsys, suite):
    (tmp_path / suite).symlink_to(golden_dir / suite)
    if suite == "prompts":  # the chat cases take their audio tokens from the tokenizer cases
        (tmp_path / "tokenizer").mkdir()
        (tmp_path / "tokenizer" / "cases").symlink_to(golden_dir / "tokenizer" / "cases")
    rc = cli_main(["conformance", str(tmp_path), "--json"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and lines and all(x["case"].startswith(f"{suite}/") for x in lines)
    assert all(x["pass"] for x in lines)
