"""Bad input at the prompt: over-long contexts are trimmed oldest-first, empty audio is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepaudio.llm.budget import ContextOverflowError, fit_chat_prompt, keep_from
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


def test_a_growing_conversation_keeps_the_start_of_its_prompt_for_the_prefix_cache(tok):
    """Once the window is full, the history is cut in steps of about a quarter of the budget at
    points fixed by the conversation's beginning: most turns extend the previous prompt (which
    a prefix cache then serves) instead of every turn dropping one more exchange."""
    budget = 1200  # about 17 exchanges of 70 tokens
    history: list[tuple[str, str]] = []
    prompts, dropped = [], []
    for n in range(50):
        fitted = fit_chat_prompt(tok, AUDIO, history, "be brief", budget=budget)
        assert fitted.tokens <= budget
        prompts.append(fitted.ids)
        dropped.append(fitted.dropped)
        history += [("user", f"question number {n} about the weather in town {n}"),
                    ("assistant", f"answer number {n}: it is sunny, {n} degrees, light wind")]
    full = [i for i, d in enumerate(dropped) if d]
    assert full and full[0] < 20  # the window filled up early on
    assert dropped == sorted(dropped)  # the start only ever moves forward
    moves = sum(1 for a, b in zip(dropped, dropped[1:], strict=False) if b != a)
    assert moves <= len(full) // 3, dropped  # cut in steps, not one exchange a turn
    assert min(p for p in map(len, prompts[full[0]:])) >= budget * 0.7  # steps of ~1/4 budget
    audio_part = len(tok.encode(build_chat_prompt(AUDIO), add_special_tokens=False))
    for a, b, da, db in zip(prompts, prompts[1:], dropped, dropped[1:], strict=False):
        if da == db:  # same start: the new prompt extends all of the old but its audio turn
            shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                          min(len(a), len(b)))
            assert shared >= len(a) - audio_part - 2


def test_cut_points_do_not_move_as_the_history_grows():
    sizes = [10] * 40
    starts = list(range(0, 41, 2))
    picks = [keep_from(sizes[:n], [s for s in starts if s <= n], room=150, step=50)
             for n in range(16, 41, 2)]
    assert all(p is not None and sum(sizes[p:n]) <= 150
               for p, n in zip(picks, range(16, 41, 2), strict=True))
    assert set(picks) <= {0, 6, 10, 16, 20, 26, 30, 36, 40}  # the first start past each 50 tokens
    assert keep_from([10, 10], [0, 2], room=5, step=50) == 2  # keep nothing when nothing fits
