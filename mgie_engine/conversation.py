"""Chat templates, as LLaVA (and so MGIE) format their prompts.

MGIE was trained on LLaVA's ``vicuna_v1_1`` template, so the prompt must match it byte for byte; the
other styles are kept so the template stays a faithful, general piece rather than a special case.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence


class SeparatorStyle(enum.Enum):
    SINGLE = "single"  # every message ends with `sep`
    TWO = "two"  # user messages end with `sep`, assistant messages with `sep2`
    MPT = "mpt"  # roles carry their own markers; no ": " between role and message


@dataclasses.dataclass(frozen=True)
class Conversation:
    system: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str | None = None
    messages: tuple[tuple[str, str | None], ...] = ()

    def append(self, role: str, message: str | None) -> Conversation:
        """A new conversation with one more message; ``None`` leaves the turn open for the model."""
        return dataclasses.replace(self, messages=self.messages + ((role, message),))

    def prompt(self) -> str:
        if self.sep_style is SeparatorStyle.SINGLE:
            seps = (self.sep, self.sep)
            glue = ": "
        elif self.sep_style is SeparatorStyle.TWO:
            seps = (self.sep, self.sep2 or "")
            glue = ": "
        else:
            seps = (self.sep, self.sep)
            glue = ""
        out = self.system + self.sep
        for i, (role, message) in enumerate(self.messages):
            if message:
                out += role + glue + message + seps[i % 2]
            else:
                out += role + (":" if glue else "")
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


def edit_question(instruction: str) -> str:
    """The question MGIE was trained to answer with an expressive instruction."""
    return f"what will this image be like if '{instruction}'"


def build_edit_prompt(
    instruction: str,
    num_patches: int,
    history: Sequence[tuple[str, str]] = (),
    template: Conversation = VICUNA_V1_1,
) -> str:
    """The full prompt for one edit.

    ``history`` holds earlier turns as (instruction, expressive instruction), oldest first. Earlier turns
    are text only: the image placeholder goes with the current turn, whose image is the latest result.
    With no history this is exactly the prompt of Apple's demo.
    """
    conv = template
    user, assistant = template.roles
    for past_instruction, past_answer in history:
        conv = conv.append(user, edit_question(past_instruction)).append(assistant, past_answer)
    image = IMAGE_START_TOKEN + IMAGE_PATCH_TOKEN * num_patches + IMAGE_END_TOKEN
    conv = conv.append(user, edit_question(instruction) + "\n" + image).append(assistant, None)
    return conv.prompt()
