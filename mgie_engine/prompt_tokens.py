"""Token ids for a prompt whose user text can never become a special token.

The reference (Apple's demo) tokenizes the whole prompt string, so a user who types ``<im_start>``,
``</s>`` or ``[IMG0]`` gets the real tokens: the image placeholder breaks, the prompt ends early, or the
visual tokens are read from the prompt. Here the prompt is encoded as one string too, so ordinary text
gets exactly the reference's ids, but by a private copy of the tokenizer in which:

* every added token of the original is special and special-token matching is off
  (``encode_special_tokens``), so those strings are plain text wherever they appear;
* each added token has a stand-in: a new added token with the same matching flags (``lstrip``,
  ``rstrip``, ``normalized``, ``single_word``) whose text is one private-use character. The template's own
  special tokens are written as their stand-ins, which split the text exactly where the originals would
  (each run between them normalized on its own, as the reference does), and their ids are mapped back.

User text has the stand-in characters removed, so only the template can place a special token. The copy
is configured once and never changed afterwards, so threads can share it. (A token matched after
normalization by a normalizer that changes it, e.g. the legacy Prepend("▁"), is matched as "▁</s>": the
reference's own placeholder would break there, and so does this one; the pipeline says so.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer

from .conversation import PromptPart, UserText

_FIRST_STAND_IN = 0xF0000  # Supplementary Private Use Area-A: no tokenizer normalizer changes these


class PromptEncoder:
    """Encodes prompt parts (``conversation.build_edit_prompt_parts``) to ids; thread-safe."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, bos: int) -> None:
        self.add_bos, self.bos = add_bos, bos
        added = sorted(tokenizer.get_added_tokens_decoder().items())
        raw = json.loads(tokenizer.to_str())
        for entry in raw.get("added_tokens", []):
            entry["special"] = True
        self._tokenizer = Tokenizer.from_str(json.dumps(raw))
        stand_ins = {token.content: chr(_FIRST_STAND_IN + k) for k, (_, token) in enumerate(added)}
        self._tokenizer.add_tokens([
            AddedToken(stand_ins[token.content], single_word=token.single_word, lstrip=token.lstrip,
                       rstrip=token.rstrip, normalized=token.normalized, special=False)
            for _, token in added])
        self._tokenizer.encode_special_tokens = True
        self._real_id = {self._tokenizer.token_to_id(stand_ins[token.content]): tid for tid, token in added}
        self._stand_in_of = stand_ins
        self._specials = re.compile("|".join(re.escape(c) for c in sorted(stand_ins, key=len, reverse=True))) \
            if stand_ins else None
        self._no_stand_ins = {ord(c): None for c in stand_ins.values()}
        self.special_ids = frozenset(tid for tid, _ in added)

    def text(self, parts: Sequence[PromptPart]) -> str:
        """The string the private tokenizer reads: template specials as stand-ins, user text cleaned."""
        out = []
        for part in parts:
            if isinstance(part, UserText):
                out.append(part.text.translate(self._no_stand_ins))
            elif self._specials is not None:
                out.append(self._specials.sub(lambda m: self._stand_in_of[m.group(0)], part))
            else:
                out.append(part)
        return "".join(out)

    def encode(self, parts: Sequence[PromptPart]) -> list[int]:
        """Ids of the whole prompt, BOS first where the tokenizer config asks for it.

        For text without special-token strings in its user parts these are the ids of the joined string
        encoded by the original tokenizer (tests/engine/test_prompt_tokens.py checks it).
        """
        ids = [self._real_id.get(i, i) for i in self._tokenizer.encode(self.text(parts)).ids]
        if self.add_bos and (not ids or ids[0] != self.bos):
            ids = [self.bos, *ids]
        return ids
