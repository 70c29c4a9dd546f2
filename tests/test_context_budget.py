"""Bad input at the prompt: over-long contexts are trimmed oldest-first, empty audio is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepaudio.llm.budget import ContextOverflowError, fit_chat_prompt
from stepaudio.llm.prompt import PromptError, build_chat_prompt
from stepaudio.llm.tokenizer import load_text_tokenizer

AUDIO = [65536 + 11, 65536 + 1024 + 77] * 10
HISTORY = [
    ("user", "first question about the weather"),
    ("assistant", "first answer: sunny and warm"),
    ("user", "second question about dinner"),
    ("assistant", "second answer: noodles"),
    ("user", "third question"),
    ("assistant", "third answer"),
]


@pytest.fixture(scope="module")
def tok(golden_dir: Path):
    return load_text_tokenizer(golden_dir / "prompts" / "tokenizer")


def _tokens(tok, history, system="be brief"):
    return len(tok.encode(build_chat_prompt(AUDIO, history, system)))


def test_prompt_that_fits_is_untouched_and_counted_exactly(tok):
    full = _tokens(tok, HISTORY)
    fitted = fit_chat_prompt(tok, AUDIO, HISTORY, "be brief", budget=full)
    assert fitted.dropped == 0 and fitted.history == HISTORY
    assert fitted.ids == tok.encode(fitted.text) and fitted.tokens == full


def test_oldest_exchange_goes_first_and_newest_audio_stays(tok):
    budget = _tokens(tok, HISTORY[2:])  # room for the last two exchanges only
    fitted = fit_chat_prompt(tok, AUDIO, HISTORY, "be brief", budget=budget)
    assert fitted.history == HISTORY[2:] and fitted.dropped == 2
    assert fitted.text.endswith(build_chat_prompt(AUDIO)) and "be brief" in fitted.text
    assert fitted.tokens <= budget


def test_a_user_turn_leaves_together_with_its_reply(tok):
    budget = _tokens(tok, HISTORY[1:])  # room for all but the first user turn
    fitted = fit_chat_prompt(tok, AUDIO, HISTORY, "be brief", budget=budget)
    assert fitted.history == HISTORY[2:]  # its reply went too: history still starts with a user


def test_everything_but_system_and_audio_can_go(tok):
    budget = _tokens(tok, [])
    fitted = fit_chat_prompt(tok, AUDIO, HISTORY, "be brief", budget=budget)
    assert fitted.history == [] and fitted.dropped == len(HISTORY)


def test_audio_turn_over_the_budget_is_refused_not_cut(tok):
    with pytest.raises(ContextOverflowError, match="audio turn needs"):
        fit_chat_prompt(tok, AUDIO, HISTORY, "be brief", budget=_tokens(tok, []) - 1)


@pytest.mark.parametrize("audio", [[], ""])
def test_empty_audio_turn_is_refused_with_a_clear_error(tok, audio):
    with pytest.raises(PromptError, match="empty audio turn"):
        fit_chat_prompt(tok, audio, HISTORY, budget=10_000)
