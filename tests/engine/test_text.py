"""The conversation template and the instruction clean-up."""

from __future__ import annotations

import pytest

from mgie_engine.conversation import VICUNA_V1_1, Conversation, SeparatorStyle, build_edit_prompt
from mgie_engine.errors import BadRequestError
from mgie_engine.instructions import clean_expressive, normalize_instruction


def test_vicuna_prompt_shape():
    prompt = build_edit_prompt("make it red", 2)
    assert prompt == (VICUNA_V1_1.system + " USER: what will this image be like if 'make it red'\n"
                      "<im_start><im_patch><im_patch><im_end> ASSISTANT:")


def test_history_goes_before_the_current_turn_and_only_it_has_the_image():
    prompt = build_edit_prompt("now at night", 1, history=[("make it red", "The car is red.")])
    assert prompt == (VICUNA_V1_1.system + " USER: what will this image be like if 'make it red' ASSISTANT: "
                      "The car is red.</s>USER: what will this image be like if 'now at night'\n"
                      "<im_start><im_patch><im_end> ASSISTANT:")
    assert prompt.count("<im_start>") == 1


def test_other_separator_styles():
    single = Conversation(system="S", roles=("Human", "Assistant"), sep_style=SeparatorStyle.SINGLE, sep="###")
    assert single.append("Human", "hi").append("Assistant", None).prompt() == "S###Human: hi###Assistant:"
    mpt = Conversation(system="S", roles=("<u>", "<a>"), sep_style=SeparatorStyle.MPT, sep="|")
    assert mpt.append("<u>", "hi").append("<a>", None).prompt() == "S|<u>hi|<a>"


@pytest.mark.parametrize("raw, cleaned", [
    ("The sky turns orange. Birds fly. More text.", "The sky turns orange.Birds fly."),
    ("Make it red[IMG0][IMG1]", "Make it red."),
    ("The car is red. An alternative is blue.", "The car is red.An."),
    ("Brighter</s> junk", "Brighter."),
    ("USER: x ASSISTANT: The answer. Second", "The answer.Second."),
    ("", ""),
    ("[IMG0]", ""),
])
def test_clean_expressive_follows_the_demo(raw, cleaned):
    assert clean_expressive(raw) == cleaned


def test_normalize_instruction():
    assert normalize_instruction("  make\tthe\nsky   red \u200b") == "make the sky red"
    assert normalize_instruction("日本語で空を赤く") == "日本語で空を赤く"
    with pytest.raises(BadRequestError, match="describe the edit"):
        normalize_instruction(" \x00\x07 ")
    with pytest.raises(BadRequestError, match="too long"):
        normalize_instruction("a" * 301)
