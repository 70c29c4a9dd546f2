"""Dialogue history: text history, newest turn as audio, spoken-text truncation, token budget."""

from __future__ import annotations

import pytest

from server.context import ContextError, ContextManager, ContextOverflow
from stepaudio.llm.prompt import ASR_SYSTEM_PROMPT, build_chat_prompt
from stepaudio.llm.tokens import AUDIO_TOKEN_OFFSET, audio_ids_to_token_str

A = AUDIO_TOKEN_OFFSET


def audio(n: int, first: int = 0) -> list[int]:
    return [A + (first + i) % 2048 for i in range(n)]


def exchange(ctx: ContextManager, k: int, user_audio: int = 10, reply: str = "好的。") -> None:
    """One finished exchange: a spoken user turn (transcribed) and a fully played reply."""
    ctx.add_user_audio(f"u{k}", audio(user_audio, k))
    ctx.set_transcript(f"u{k}", f"问题{k}")
    ctx.add_assistant(f"a{k}")
    ctx.add_assistant_segment(f"a{k}", reply, 1000)
    ctx.finish_assistant(f"a{k}")


def test_prompt_matches_the_chat_template_with_text_history_and_newest_audio():
    ctx = ContextManager(instructions="系统")
    exchange(ctx, 1)
    ctx.add_user_audio("u2", audio(6, 50))
    expected = build_chat_prompt(
        audio(6, 50), history=[("user", "问题1"), ("assistant", "好的。")], system="系统"
    )
    assert ctx.build_prompt() == expected


def test_newest_user_turn_stays_audio_even_when_its_transcript_arrived():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.set_transcript("u1", "你好")
    prompt = ctx.build_prompt()
    assert audio_ids_to_token_str(audio(4)) in prompt and "你好" not in prompt


def test_older_turn_without_transcript_yet_is_sent_as_audio_then_as_text():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "嗯。", 500)
    ctx.finish_assistant("a1")
    ctx.add_user_audio("u2", audio(3, 100))
    assert audio_ids_to_token_str(audio(4)) in ctx.build_prompt()  # transcription still running
    assert ctx.set_transcript("u1", " 你好 ")
    prompt = ctx.build_prompt()
    assert "你好" in prompt and audio_ids_to_token_str(audio(4)) not in prompt
    assert ctx.get("u1").audio_tokens is None  # memory: only the newest turn keeps its audio


def test_transcript_for_a_deleted_item_is_dropped():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.delete("u1")
    assert not ctx.set_transcript("u1", "晚了")


def test_speculative_prompt_reads_pending_audio_as_the_newest_turn():
    ctx = ContextManager()
    exchange(ctx, 1)
    prompt = ctx.build_prompt(pending_audio=audio(5, 300))
    expected = build_chat_prompt(
        audio(5, 300), history=[("user", "问题1"), ("assistant", "好的。")]
    )
    assert prompt == expected


def test_reply_in_progress_is_left_out_of_prompts():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "正在说", 300)
    assert "正在说" not in ctx.build_prompt()


def test_truncation_keeps_the_text_spoken_in_the_played_audio():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "今天天气很好，", 1400)  # 7 characters over 1.4 s
    ctx.add_assistant_segment("a1", "我们去公园吧。", 1400)
    ctx.finish_assistant("a1")
    assert ctx.truncate("a1", 2100) == "今天天气很好，我们去"  # half of the second clause
    assert ctx.truncate("a1", 1400) == "今天天气很好，"
    assert ctx.truncate("a1", 0) == ""
    assert ctx.truncate("a1", 2800) == "今天天气很好，我们去公园吧。"


def test_truncation_does_not_keep_half_an_english_word():
    ctx = ContextManager()
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "Hello wonderful world.", 2200)
    ctx.finish_assistant("a1")
    assert ctx.truncate("a1", 900) == "Hello "  # the cut falls inside "wonderful"


def test_truncated_reply_is_what_the_next_prompt_carries():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.set_transcript("u1", "讲个故事")
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "从前有座山，", 1200)
    ctx.add_assistant_segment("a1", "山里有座庙。", 1200)
    ctx.truncate("a1", 1200)  # barge-in: the second clause was never heard
    ctx.finish_assistant("a1")
    ctx.add_user_audio("u2", audio(3, 99))
    prompt = ctx.build_prompt()
    assert "从前有座山，" in prompt and "山里有座庙" not in prompt


def test_reply_nobody_heard_is_left_out():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "一句话。", 800)
    ctx.truncate("a1", 0)
    ctx.finish_assistant("a1")
    assert "<|BOT|>assistant\n<|EOT|>" not in ctx.build_prompt()


def test_truncation_errors_name_the_problem():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(4))
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "短", 500)
    with pytest.raises(ContextError, match="past the end"):
        ctx.truncate("a1", 900)
    with pytest.raises(ContextError, match="not an assistant"):
        ctx.truncate("u1", 0)
    with pytest.raises(ContextError, match="no item"):
        ctx.truncate("nope", 0)


def test_budget_drops_the_oldest_exchanges_first():
    ctx = ContextManager(instructions="系统", max_tokens=60)
    for k in range(1, 6):
        exchange(ctx, k)  # each exchange: 3 + 4 and 3 + 4 tokens
    ctx.add_user_audio("u6", audio(20, 600))  # 24 tokens, never dropped
    msgs = ctx.messages()
    texts = [m["content"] for m in msgs if isinstance(m["content"], str)]
    assert texts == ["系统", "问题4", "好的。", "问题5", "好的。"]
    assert msgs[-1]["content"]["type"] == "audio"
    assert ctx.dropped_last_prompt == 6


def test_budget_never_starts_history_with_a_reply():
    ctx = ContextManager(max_tokens=40)
    ctx.add_user_audio("u1", audio(4))
    ctx.set_transcript("u1", "很长的一个问题啊")  # 8 + 4
    ctx.add_assistant("a1", in_progress=False)
    ctx.add_assistant_text("a1", "答")  # 1 + 4
    exchange(ctx, 2)
    ctx.add_user_audio("u3", audio(10, 300))
    roles = [m["role"] for m in ctx.messages()]
    assert roles[0] == "user"


def test_budget_overflow_when_the_newest_turn_alone_is_too_long():
    ctx = ContextManager(instructions="系统", max_tokens=50)
    ctx.add_user_audio("u1", audio(100))
    with pytest.raises(ContextOverflow, match="over the budget"):
        ctx.messages()


def test_client_items_insert_after_previous_item():
    ctx = ContextManager()
    ctx.add_user_text("t1", "第一")
    ctx.add_user_text("t3", "第三")
    ctx.add_system_text("t2", "插入", previous_item_id="t1")
    assert [t.item_id for t in ctx] == ["t1", "t2", "t3"]
    with pytest.raises(ContextError, match="already exists"):
        ctx.add_user_text("t1", "again")


def test_item_count_is_bounded():
    ctx = ContextManager(max_items=4)
    for k in range(10):
        ctx.add_user_text(f"t{k}", str(k))
    assert [t.item_id for t in ctx] == ["t6", "t7", "t8", "t9"]
    assert "t0" not in ctx


def test_asr_prompt_uses_the_transcription_system_prompt():
    ctx = ContextManager()
    ctx.add_user_audio("u1", audio(3))
    assert ASR_SYSTEM_PROMPT in ctx.asr_prompt("u1")
    ctx.add_user_text("t", "text")
    with pytest.raises(ContextError):
        ctx.asr_prompt("t")


class _CharTokenizer:
    """One token per character: enough for fit_chat_prompt's arithmetic."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [0] * (len(text) + (1 if add_special_tokens else 0))


def test_chat_inputs_feed_the_exact_budget_fitter_with_the_same_prompt():
    from stepaudio.llm.budget import fit_chat_prompt

    ctx = ContextManager(instructions="系统")
    ctx.add_user_audio("u1", audio(4))  # not transcribed yet: history carries its audio tokens
    ctx.add_assistant("a1")
    ctx.add_assistant_segment("a1", "你好。", 600)
    ctx.finish_assistant("a1")
    ctx.add_user_audio("u2", audio(5, 40))
    system, history, newest = ctx.chat_inputs()
    assert system == "系统" and newest == audio(5, 40)
    assert history == [("user", audio_ids_to_token_str(audio(4))), ("assistant", "你好。")]
    fitted = fit_chat_prompt(_CharTokenizer(), newest, history, system, budget=100_000)
    assert fitted.text == ctx.build_prompt() and fitted.dropped == 0


async def test_a_transcript_cut_at_its_token_limit_says_so_in_the_history(tiny_root):
    """The transcription stops at max_transcript_tokens; the history must not pass the start of a
    long turn off as the whole of it."""
    from server.context import CUT_MARK
    from server.metrics import Metrics
    from server.workers import ChatStage
    from stepaudio.llm.engine import SamplingParams
    from stepaudio.llm.engine_transformers import TransformersEngine

    engine = TransformersEngine.from_pretrained(tiny_root / "Step-Audio-Chat")
    stage = ChatStage(engine, Metrics(), budget=4096, send_text=False,
                      base_params=SamplingParams(), max_transcript_tokens=3)
    try:
        heard = await stage.transcribe(audio(60))
    finally:
        await stage.aclose()
    assert heard.cut  # the random tiny model never ends a transcript within 3 tokens
    ctx = ContextManager()
    exchange(ctx, 1)
    ctx.add_user_audio("u2", audio(6, 50))
    ctx.set_transcript("u2", ctx.transcript_text(heard.text, cut=heard.cut))
    ctx.add_user_audio("u3", audio(6, 90))
    _, history, _ = ctx.chat_inputs()
    assert history[-1] == ("user", heard.text + CUT_MARK)
    assert history[0] == ("user", "问题1")  # complete transcripts carry no mark
    assert ctx.transcript_text(" 全部 ", cut=False) == "全部"
