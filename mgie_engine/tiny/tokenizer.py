"""Tiny, deterministic stand-in for the LLaVA-7B-v1 (LLaMA) tokenizer files shipped with MGIE.

The released ``tsujuifu/ml-mgie`` folder ``LLaVA-7B-v1/`` holds five tokenizer files.  Tests of the model
loader need the same files, with the same ids for everything the engine relies on (specials, byte
fallback, the three image tokens at 32000-32002), but without downloading 500 KB of real vocabulary.
So :func:`write_llama_tokenizer` trains a small BPE with ``tokenizers`` on a built-in English corpus
(corpus.py), pads the vocabulary to exactly 32000 pieces with seeded filler, builds the tokenizer through
the ``tokenizers`` API (BPE model, normalizers, decoders, post-processor, added tokens) and writes
``tokenizer.json`` (legacy HF LLaMA layout), ``tokenizer_config.json``, ``special_tokens_map.json``,
``added_tokens.json`` and, where sentencepiece is installed, ``tokenizer.model`` (a sentencepiece BPE
proto with the same ids; nothing in the engine reads it).
"""

from __future__ import annotations

import json
import os
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from .corpus import INSTRUCTIONS, SENTENCES

__all__ = ["IMAGE_TOKENS", "SPACE", "SYSTEM_PROMPT", "VOCAB_SIZE", "write_llama_tokenizer"]

SPACE = "\u2581"  # sentencepiece's "▁" meta symbol standing for a space
VOCAB_SIZE = 32000  # LLaMA base vocabulary, without LLaVA's added image tokens
IMAGE_TOKENS = ("<im_patch>", "<im_start>", "<im_end>")  # ids 32000, 32001, 32002 in LLaVA-7B-v1
_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in LLaMA
_FIRST_NORMAL_ID = len(_SPECIALS) + 256  # 259: after the specials and the <0x00>..<0xFF> byte pieces
_MAX_FILLER_LEN = 10  # letters per filler piece, keeps the vocabulary LLaMA-like and tokenizer.json small
_MAX_FILLER_TAIL = 4  # longest piece appended when growing a filler piece

# Characters that always stay single pieces: ``:`` and ``.`` so prompts like "ASSISTANT:" end in a lone
# ``:`` (the engine relies on it), digits because LLaMA splits digits, and the other ASCII punctuation so
# "helpful," or "user's" split like LLaMA does ("▁helpful" ",", "▁user" "'" "s").
_ISOLATED = string.digits + string.punctuation

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)



def _corpus_lines() -> list[str]:
    """All training lines: the MGIE prompt template per instruction, the instructions, and plain English."""
    instructions = INSTRUCTIONS.splitlines()
    prompts = [
        f"{SYSTEM_PROMPT} USER: what will this image be like if '{text}' ASSISTANT:" for text in instructions
    ]
    capitalized = [text[0].upper() + text[1:] + "." for text in instructions]
    return prompts + instructions + capitalized + SENTENCES.splitlines()


def _train_merged_pieces(lines: list[str]) -> list[str]:
    """Multi-character pieces learned by BPE on ``lines``, in merge order (most frequent first).

    Training splits words at ``▁`` and isolates ``_ISOLATED`` characters, so no learned piece ever spans
    two words or contains punctuation or a digit, even though the final tokenizer has no pre-tokenizer.
    """
    tok = Tokenizer(models.BPE(unk_token=_SPECIALS[0]))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(SPACE, behavior="merged_with_next"),
            pre_tokenizers.Split(Regex(f"[{re.escape(_ISOLATED)}]"), behavior="isolated"),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False, max_token_length=16
    )
    tok.train_from_iterator(lines, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    pieces: list[str] = []
    for merge in merges:  # tokenizers >= 0.20 writes [left, right]; older versions wrote "left right"
        left, right = merge if isinstance(merge, list) else merge.split(" ")
        pieces.append(left + right)
    return pieces


def _char_pieces(lines: list[str]) -> list[str]:
    """Single-character pieces: ``▁`` plus every printable ASCII character, most frequent first like LLaMA.

    A literal space is not a piece because the normalizer turns every space into ``▁``.
    """
    counts = Counter(char for line in lines for char in (SPACE + line.replace(" ", SPACE)))
    chars = set(counts) | set(string.ascii_letters + string.digits + string.punctuation) | {SPACE}
    non_ascii = sorted(c for c in chars if c != SPACE and not ("!" <= c <= "~"))
    if non_ascii:  # keeps non-Latin text on byte fallback
        raise AssertionError(f"built-in corpus must be printable ASCII, found {non_ascii!r}")
    return sorted(chars, key=lambda c: (-counts[c], c))


def _filler_pieces(existing: list[str], count: int, seed: int) -> list[str]:
    """``count`` seeded lowercase pieces, each the concatenation of two existing pieces.

    Being real concatenations keeps them reachable by merges (as in a genuine BPE vocabulary); using only
    letters within one word means they can never swallow punctuation, digits or a word boundary.  Heads
    that are already full length and long tails are left out of the draw, so few draws are rejected.
    """
    rng = random.Random(seed)
    lower = [p for p in existing if p.removeprefix(SPACE).isascii() and p.removeprefix(SPACE).isalpha()]
    lower = [p for p in lower if p.removeprefix(SPACE).islower()]
    heads = [p for p in lower if len(p.removeprefix(SPACE)) < _MAX_FILLER_LEN]
    tails = [p for p in lower if not p.startswith(SPACE) and len(p) <= _MAX_FILLER_TAIL]
    known = set(existing)
    pieces: list[str] = []
    for _ in range(50 * count + 10_000):
        if len(pieces) == count:
            return pieces
        piece = rng.choice(heads) + rng.choice(tails)
        letters = len(piece.removeprefix(SPACE))
        if piece in known or letters > _MAX_FILLER_LEN:
            continue
        known.add(piece)
        pieces.append(piece)
        if letters < _MAX_FILLER_LEN:
            heads.append(piece)
        if len(piece) <= _MAX_FILLER_TAIL:
            tails.append(piece)
    raise RuntimeError("could not generate enough filler pieces")


def _build_vocab(seed: int) -> list[str]:
    """The 32000 base pieces in id order: specials, bytes, ``▁▁``, learned merges, filler, single chars."""
    lines = _corpus_lines()
    chars = _char_pieces(lines)
    vocab: dict[str, int] = {}
    for piece in (*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), SPACE * 2):  # LLaMA's id 259 is "▁▁"
        vocab.setdefault(piece, len(vocab))
    char_set = set(chars)
    for piece in _train_merged_pieces(lines):
        if piece not in char_set:
            vocab.setdefault(piece, len(vocab))
    missing = VOCAB_SIZE - len(vocab) - len(chars)
    if missing < 0:
        raise AssertionError("learned vocabulary is larger than LLaMA's")
    for piece in _filler_pieces(list(vocab)[_FIRST_NORMAL_ID:] + chars, missing, seed):
        vocab[piece] = len(vocab)
    for char in chars:
        vocab[char] = len(vocab)
    pieces = list(vocab)
    if len(pieces) != VOCAB_SIZE:
        raise AssertionError(f"expected {VOCAB_SIZE} pieces, built {len(pieces)}")
    if any(c in piece for piece in pieces[_FIRST_NORMAL_ID:] if len(piece) > 1 for c in _ISOLATED):
        raise AssertionError("a multi-character piece contains an isolated character")
    return pieces


def _merges(pieces: list[str]) -> Iterator[str]:
    """HF merges derived from the vocabulary, ranked by the id of the merged piece.

    Every split of a piece into two known pieces becomes a merge, which is how HF converts sentencepiece
    BPE models; it makes ``tokenizer.json`` and ``tokenizer.model`` segment text the same way.
    """
    ids = {piece: i for i, piece in enumerate(pieces)}
    for result_id in range(_FIRST_NORMAL_ID, len(pieces)):
        piece = pieces[result_id]
        splits = [
            (ids[piece[:k]], ids[piece[k:]])
            for k in range(1, len(piece))
            if piece[:k] in ids and piece[k:] in ids
        ]
        for left, right in sorted(splits):
            yield f"{pieces[left]} {pieces[right]}"


def _llama_tokenizer(pieces: list[str]) -> Tokenizer:
    """The tokenizer as HF converts LLaMA's (the legacy layout: a Prepend normalizer, no pre-tokenizer),
    with LLaVA's three image tokens added as 32000-32002; ``to_str()`` is ``tokenizer.json``."""
    unk, bos, _ = _SPECIALS
    tok = Tokenizer(models.BPE(vocab={piece: i for i, piece in enumerate(pieces)},
                               merges=[tuple(merge.split(" ")) for merge in _merges(pieces)],
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, 1)])
    # Matched on raw text and never split; the specials keep their ids 0-2, the image tokens follow the vocab.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*_SPECIALS, *IMAGE_TOKENS)])
    return tok


def _sentencepiece_model(pieces: list[str]) -> bytes:
    """Serialized sentencepiece ``ModelProto`` (BPE, byte fallback) with the same pieces and ids.

    Scores fall with the id, so sentencepiece merges in the same priority order as ``tokenizer.json``.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # protobuf gencode; import only when writing

    kind = sp_pb2.ModelProto.SentencePiece
    proto = sp_pb2.ModelProto()
    for i, piece in enumerate(pieces):
        entry = proto.pieces.add()
        entry.piece = piece
        if i == 0:
            entry.type, entry.score = kind.UNKNOWN, 0.0
        elif i < len(_SPECIALS):
            entry.type, entry.score = kind.CONTROL, 0.0
        elif i < _FIRST_NORMAL_ID:
            entry.type, entry.score = kind.BYTE, 0.0
        else:
            entry.type, entry.score = kind.NORMAL, float(_FIRST_NORMAL_ID - i)

    trainer = proto.trainer_spec
    trainer.model_prefix = "tokenizer"
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = VOCAB_SIZE
    trainer.character_coverage = 0.99995
    trainer.max_sentencepiece_length = 16
    trainer.split_digits = True
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = _SPECIALS

    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString(deterministic=True)


def _special(content: str) -> dict[str, Any]:
    """An AddedToken as ``save_pretrained`` wrote LLaMA specials in 2023."""
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _tokenizer_config() -> dict[str, Any]:
    """``tokenizer_config.json`` of LLaVA-7B-v1: slow LlamaTokenizer, BOS only, 2048 context."""
    unk, bos, eos = _SPECIALS
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", **_special(bos)},
        "clean_up_tokenization_spaces": False,
        "eos_token": {"__type": "AddedToken", **_special(eos)},
        "model_max_length": 2048,
        "pad_token": None,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": {"__type": "AddedToken", **_special(unk)},
    }


def _special_tokens_map() -> dict[str, Any]:
    """``special_tokens_map.json``; LLaVA v1 training pads with ``<unk>``."""
    unk, bos, eos = _SPECIALS
    return {
        "bos_token": _special(bos),
        "eos_token": _special(eos),
        "pad_token": unk,
        "unk_token": _special(unk),
    }


def _dump_json(obj: Any, *, sort_keys: bool) -> bytes:
    """Stable UTF-8 JSON bytes (2-space indent like ``save_pretrained``), so equal inputs give equal files."""
    return (json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=sort_keys) + "\n").encode("utf-8")


def _write_all(folder: Path, files: Iterable[tuple[str, bytes]]) -> None:
    """Write each file completely, replacing older copies."""
    for name, data in files:
        (folder / name).write_bytes(data)


def _has_sentencepiece() -> bool:
    import importlib.util

    return importlib.util.find_spec("sentencepiece") is not None


def write_llama_tokenizer(folder: str | os.PathLike[str], *, seed: int = 0) -> None:
    """Write the five LLaVA-7B-v1 tokenizer files into the existing ``folder``.

    Files are byte-identical for equal ``seed``; the seed only changes the filler part of the vocabulary.
    ``tokenizer.model`` (sentencepiece's copy, which the engine never reads) is written only where
    sentencepiece is installed (the ``test`` extra).
    """
    pieces = _build_vocab(seed)
    added = {token: VOCAB_SIZE + i for i, token in enumerate(IMAGE_TOKENS)}
    _write_all(
        Path(folder),
        [
            ("tokenizer.json", _dump_json(json.loads(_llama_tokenizer(pieces).to_str()), sort_keys=False)),
            *([("tokenizer.model", _sentencepiece_model(pieces))] if _has_sentencepiece() else []),
            ("tokenizer_config.json", _dump_json(_tokenizer_config(), sort_keys=True)),
            ("special_tokens_map.json", _dump_json(_special_tokens_map(), sort_keys=True)),
            ("added_tokens.json", _dump_json(added, sort_keys=True)),
        ],
    )
