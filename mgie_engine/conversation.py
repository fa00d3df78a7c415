"""Chat templates, as LLaVA (and so MGIE) format their prompts.

MGIE was trained on LLaVA's ``vicuna_v1_1`` template, so the prompt must match it byte for byte; the
other styles are kept so the template stays a faithful, general piece rather than a special case.

A prompt is built as parts: the template's own text (plain ``str``, which may hold special tokens such as
``</s>`` or ``<im_start>``) and :class:`UserText`, what a user typed or the model wrote back from it. The
encoder (``prompt_tokens.py``) reads special tokens only in the template's parts, so a user who types
``<im_start>`` or ``</s>`` gets those characters, never the tokens.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class UserText:
    """Text from a user (or the model's answer to one): always tokenized as plain text."""

    text: str


PromptPart = str | UserText
Message = str | tuple[PromptPart, ...]


def render(parts: Sequence[PromptPart]) -> str:
    """The prompt as one string, as the reference (Apple's demo) spells it."""
    return "".join(part.text if isinstance(part, UserText) else part for part in parts)


class SeparatorStyle(enum.Enum):
    """How a conversation template separates its turns."""

    SINGLE = "single"  # every message ends with `sep`
    TWO = "two"  # user messages end with `sep`, assistant messages with `sep2`
    MPT = "mpt"  # roles carry their own markers; no ": " between role and message


@dataclasses.dataclass(frozen=True)
class Conversation:
    """A chat template and its messages (the reference code's ``conv_templates`` entry)."""

    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str | None = None
    messages: tuple[tuple[str, Message | None], ...] = ()

    def append(self, role: str, message: Message | None) -> Conversation:
        """A new conversation with one more message; ``None`` leaves the turn open for the model.

        A message is template text (``str``) or parts, where user text goes in :class:`UserText`.
        """
        return dataclasses.replace(self, messages=self.messages + ((role, message),))

    def prompt(self) -> str:
        """The whole prompt as one string."""
        return render(self.prompt_parts())

    def prompt_parts(self) -> list[PromptPart]:
        """The prompt as template text and ``UserText`` parts (user text is never read as special tokens)."""
        if self.sep_style is SeparatorStyle.SINGLE:
            seps = (self.sep, self.sep)
            glue = ": "
        elif self.sep_style is SeparatorStyle.TWO:
            seps = (self.sep, self.sep2 or "")
            glue = ": "
        else:
            seps = (self.sep, self.sep)
            glue = ""
        out: list[PromptPart] = [self.system + self.sep]
        for i, (role, message) in enumerate(self.messages):
            parts = (message,) if isinstance(message, str) else message or ()
            if render(parts):
                out += [role + glue, *parts, seps[i % 2]]
            else:
                out.append(role + (":" if glue else ""))
        return out


VICUNA_V1_1 = Conversation(
    system=(
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

IMAGE_PATCH_TOKEN = "<im_patch>"
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"


def edit_question(instruction: str) -> tuple[PromptPart, ...]:
    """The question MGIE was trained to answer with an expressive instruction."""
    return ("what will this image be like if '", UserText(instruction), "'")


def build_edit_prompt_parts(
    instruction: str,
    num_patches: int,
    history: Sequence[tuple[str, str]] = (),
    template: Conversation = VICUNA_V1_1,
) -> list[PromptPart]:
    """The full prompt for one edit, as parts (user text marked as such).

    ``history`` holds earlier turns as (instruction, expressive instruction), oldest first. Earlier turns
    are text only: the image placeholder goes with the current turn, whose image is the latest result.
    The expressive instructions are the model's answers to users' text, so they count as user text too.
    """
    conv = template
    user, assistant = template.roles
    for past_instruction, past_answer in history:
        conv = conv.append(user, edit_question(past_instruction)).append(assistant, (UserText(past_answer),))
    image = IMAGE_START_TOKEN + IMAGE_PATCH_TOKEN * num_patches + IMAGE_END_TOKEN
    conv = conv.append(user, (*edit_question(instruction), "\n" + image)).append(assistant, None)
    return conv.prompt_parts()


def build_edit_prompt(
    instruction: str,
    num_patches: int,
    history: Sequence[tuple[str, str]] = (),
    template: Conversation = VICUNA_V1_1,
) -> str:
    """``build_edit_prompt_parts`` as one string: with no history, exactly the prompt of Apple's demo."""
    return render(build_edit_prompt_parts(instruction, num_patches, history, template))
