"""The language stage: image + instruction -> expressive instruction and the UNet's conditioning.

CLIP reads the image, LLaVA writes the answer greedily (the demo's ``generate``: no_repeat_ngram_size=3,
up to 96 new tokens) and stops as soon as the eight [IMG] tokens are out; the edit head turns their
hidden states into the prompt embeddings the UNet reads. Results are cached per (image, instruction,
history), so a re-roll with a new seed or CFG skips the whole stage.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from .conversation import build_edit_prompt_parts
from .decoding import GreedyDecoder
from .graphs import GraphedCall
from .inputs import ImageInput, PreparedImage, Prompt
from .instructions import clean_expressive
from .models import MgieModels

MAX_NEW_TOKENS = 96
NO_REPEAT_NGRAM = 3


class CancelToken(Protocol):
    """Anything with ``is_set()``, such as a ``threading.Event``: set, the edit stops."""

    def is_set(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class Guidance:
    """What the LLM side produces for one prompt; reusable across seeds and CFGs."""

    expressive_instruction: str
    new_token_ids: tuple[int, ...]
    prompt_embeds: torch.Tensor
    stopped_early: bool


def select_visual_states(prompt_length: int, new: Sequence[int], hidden: torch.Tensor, img0: int,
                         stopped_early: bool) -> torch.Tensor:
    """The eight hidden states that produced [IMG0]..[IMG7] (the demo's slice, fallback included).

    ``hidden`` holds one last-layer state per position of the prompt and its answer ``new`` except the
    last. [IMG0] is looked for in the answer only: the demo searched the whole sequence, so an [IMG0] in
    the prompt would have been read instead (the prompt encoder keeps users from writing one anyway).
    An early stop only happens once all eight exist and more tokens would have followed, so the demo's
    clamp to ``len(hidden) - 9`` cannot bite and the slice starts just before [IMG0].
    """
    n = hidden.shape[0]
    first = prompt_length + new.index(img0) - 1 if img0 in new else None
    if stopped_early:
        p = first
    else:
        p = min(n - 9 if first is None else first, n - 9)
    return hidden[p:p + 8]


def visual_tokens_complete(new: Sequence[int], img: Sequence[int]) -> bool:
    """[IMG7] just came out, at least seven tokens after the first [IMG0], before the token limit.

    From there the demo's slice (just before [IMG0], eight states) is fixed and every state it needs
    exists, so decoding on to </s> could not change the result.
    """
    return (len(new) < MAX_NEW_TOKENS and new[-1] == img[-1] and img[0] in new
            and len(new) - 1 >= new.index(img[0]) + 7)


def _answer(tokens: list[int], eos: Sequence[int], img: Sequence[int]) -> tuple[list[int], bool]:
    """One row's new tokens up to where it stopped (padding after that is dropped), and whether early."""
    new: list[int] = []
    for token in tokens:
        new.append(token)
        if token in eos:
            return new, False
        if visual_tokens_complete(new, img):
            return new, True
    return new, False


class GuidanceCache:
    """The last ``size`` prompts' guidance, least recently used first out; thread-safe."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, Guidance] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def found(self, keys: Sequence[tuple]) -> dict[tuple, Guidance]:
        """The entries held for these keys (each marked as just used)."""
        found: dict[tuple, Guidance] = {}
        with self._lock:
            for key in keys:
                if key in self._entries:
                    self._entries.move_to_end(key)
                    found[key] = self._entries[key]
        return found

    def add(self, fresh: dict[tuple, Guidance]) -> None:
        """Keep these fresh results, dropping the least recently used beyond ``size``."""
        with self._lock:
            for key, result in fresh.items():
                self._entries[key] = result
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


class LanguageStage:
    """CLIP, the LLM's greedy decode and the edit head, for a batch of prompts at once."""

    def __init__(self, models: MgieModels, prepare: Callable[[ImageInput], PreparedImage],
                 use_stage: Callable[[str], None], compile_layers: bool, recorded: bool, cache_size: int) -> None:
        self.models = models
        self._prepare, self._use_stage = prepare, use_stage
        cuda = models.device.type == "cuda"
        self.decoder = GreedyDecoder(models.llm, NO_REPEAT_NGRAM, graphs=cuda, compile_layers=compile_layers)

        def vision_features(pixels: torch.Tensor) -> torch.Tensor:
            states = models.vision(pixels, output_hidden_states=True).hidden_states[models.vision_select_layer]
            return models.projector(states[:, 1:].to(models.dtype))

        # Small eager calls replayed as CUDA graphs (graphs.py); not under offload, where weights move.
        self._vision_features = GraphedCall(vision_features, "CLIP", enabled=recorded)
        self._edit_head = GraphedCall(lambda hidden: models.edit_head(hidden, models.img_embeds), "edit head",
                                      enabled=recorded)
        self.cache = GuidanceCache(cache_size)

    def guidance(self, prompts: Sequence[Prompt], cancel: CancelToken | None = None,
                 use_cache: bool = True) -> list[tuple[Guidance, bool]]:
        """Each prompt's guidance and whether it came from the cache. Cached ones are looked up, the
        rest decoded together in one batch (``use_cache=False``: all decoded, nothing kept)."""
        prompts = [dataclasses.replace(p, image=self._prepare(p.image)) for p in prompts]
        if not use_cache:
            return [(g, False) for g in self._run(prompts, cancel)]
        keys = [(p.image.key, p.image.size, p.instruction, p.history) for p in prompts]
        found = self.cache.found(keys)
        todo = {key: prompt for key, prompt in zip(keys, prompts, strict=True) if key not in found}
        fresh = dict(zip(todo, self._run(list(todo.values()), cancel), strict=True)) if todo else {}
        self.cache.add(fresh)
        return [(found[k], True) if k in found else (fresh[k], False) for k in keys]

    @torch.inference_mode()
    def prompt_inputs(self, prompts: Sequence[Prompt]) -> list[tuple[list[int], torch.Tensor]]:
        """Per prompt, token ids and input embeddings with CLIP patch features in place of the <im_patch>
        tokens; one CLIP call for all the images."""
        m = self.models
        pixels = torch.stack([self._prepare(p.image).clip_pixels for p in prompts]).to(m.device, m.dtype)
        features = self._vision_features(pixels)
        table = m.llm.get_input_embeddings()
        out = []
        for prompt, feature in zip(prompts, features, strict=True):
            ids = m.encode_prompt(build_edit_prompt_parts(prompt.instruction, m.num_patches, prompt.history))
            start = ids.index(m.token_ids.im_start)
            if ids[start + 1:start + m.num_patches + 2] != [m.token_ids.im_patch] * m.num_patches + [m.token_ids.im_end]:
                raise RuntimeError("the tokenizer split the image placeholder; check tokenizer.json")
            embeds = table(torch.tensor([ids], device=m.device))
            embeds[0, start + 1:start + 1 + m.num_patches] = feature
            out.append((ids, embeds))
        return out

    @torch.inference_mode()
    def _run(self, prompts: Sequence[Prompt], cancel: CancelToken | None = None) -> list[Guidance]:
        """Greedy decoding of several prompts at once (left-padded), each stopping on its own.

        This is the demo's ``generate`` call (greedy, no_repeat_ngram_size=3, up to 96 new tokens) plus a
        stopping rule that ends a sequence as soon as [IMG7] completes the eight visual tokens. On CUDA
        each token is one CUDA graph replay (``decoding.py``); prompts are padded to a multiple of 64
        tokens so a handful of shapes cover every request.
        """
        m = self.models
        self._use_stage("language")
        with torch.profiler.record_function("llm.prompt"):  # sub-stages are named for bench/profile_engine.py
            inputs = self.prompt_inputs(prompts)
            lengths = [len(ids) for ids, _ in inputs]
            cuda = m.device.type == "cuda"
            width = -(-max(lengths) // 64) * 64 if cuda else max(lengths)
            n, pad = len(inputs), m.llm.config.pad_token_id or 0
            ids = torch.full((n, width), pad, device=m.device, dtype=torch.long)
            embeds = torch.zeros(n, width, inputs[0][1].shape[-1], device=m.device, dtype=inputs[0][1].dtype)
            mask = torch.zeros(n, width, device=m.device, dtype=torch.long)
            for i, (prompt_ids, emb) in enumerate(inputs):
                ids[i, width - lengths[i]:] = torch.tensor(prompt_ids, device=m.device)
                embeds[i, width - lengths[i]:] = emb[0]
                mask[i, width - lengths[i]:] = 1
        eos, img = m.token_ids.eos, m.token_ids.img
        rows, states = self.decoder.decode(
            ids, embeds, mask, MAX_NEW_TOKENS, lambda row: row[-1] in eos or visual_tokens_complete(row, img), cancel,
            run=img)
        answers, visual = [], []
        with torch.profiler.record_function("llm.edit_head"):
            for i, row in enumerate(rows):
                new, early = _answer(row, eos, img)
                # One last-layer state per position but the last: the prompt's, then those its answer gave.
                hidden = states[i, width - lengths[i]:width + len(new) - 1]
                visual.append(select_visual_states(lengths[i], new, hidden, img[0], early))
                answers.append((new, early))
            embeds = self._edit_head(torch.stack(visual))  # one call for the batch, not one per job
        return [Guidance(expressive_instruction=clean_expressive(m.decode(new)), new_token_ids=tuple(new),
                         prompt_embeds=embeds[i:i + 1].clone(), stopped_early=early)
                for i, (new, early) in enumerate(answers)]
