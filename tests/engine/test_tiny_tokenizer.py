"""The tiny LLaVA-7B-v1 tokenizer must load and behave like the released one where the engine relies on it."""

from __future__ import annotations

import json
import string
import time
from pathlib import Path

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from mgie_engine.tiny.tokenizer import write_llama_tokenizer

FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: what will this image be like if "
    "'make the sky a sunset'\n<im_start>" + "<im_patch>" * 4 + "<im_end> ASSISTANT:"
)
ENGLISH = [
    "hello world",
    "make the sky a sunset",
    "Turn the day into night, then give him a beard!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading and trailing spaces  ",
    "Numbers: 3.14159 and 2048; ratio 16:9.",
    "Zebras quizzically xylophone (jumping) over {brackets} & <angles> ~ `ticks` | pipes \\ slashes",
    "line one\nline two\ttabbed",
    string.ascii_letters + string.digits + string.punctuation,
]
UNICODE = "日本語 ünïcödé 🙂"
IMG_TOKENS = [f"[IMG{i}]" for i in range(8)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok_seed0")
    start = time.perf_counter()
    write_llama_tokenizer(path, seed=0)
    assert time.perf_counter() - start < 10.0
    return path


@pytest.fixture(scope="module")
def tok(folder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp(folder: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def _vocab_in_id_order(folder: Path) -> list[str]:
    vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    pieces = sorted(vocab, key=vocab.__getitem__)
    assert [vocab[p] for p in pieces] == list(range(32000))
    return pieces


def test_same_seed_is_byte_identical(folder: Path, tmp_path: Path) -> None:
    write_llama_tokenizer(tmp_path, seed=0)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name


def test_other_seed_changes_only_filler(folder: Path, tmp_path: Path) -> None:
    write_llama_tokenizer(tmp_path, seed=1)
    ours, theirs = _vocab_in_id_order(folder), _vocab_in_id_order(tmp_path)
    differing = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b]
    assert len(differing) > 20000
    assert ours[:1000] == theirs[:1000]  # specials, bytes and the learned pieces do not depend on the seed
    assert ours[-90:] == theirs[-90:]  # nor do the single-character pieces
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()


def test_side_files(folder: Path) -> None:
    assert json.loads((folder / "added_tokens.json").read_text()) == {
        "<im_patch>": 32000,
        "<im_start>": 32001,
        "<im_end>": 32002,
    }
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "LlamaTokenizer"
    assert (config["add_bos_token"], config["add_eos_token"]) == (True, False)
    assert (config["model_max_length"], config["padding_side"]) == (2048, "right")
    special = json.loads((folder / "special_tokens_map.json").read_text())
    assert [special[k]["content"] for k in ("bos_token", "eos_token", "unk_token")] == [
        "<s>",
        "</s>",
        "<unk>",
    ]


def test_tokenizer_json_layout(folder: Path) -> None:
    data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = data["model"]
    assert (model["type"], model["byte_fallback"], model["fuse_unk"], model["unk_token"]) == (
        "BPE",
        True,
        True,
        "<unk>",
    )
    assert [n["type"] for n in data["normalizer"]["normalizers"]] == ["Prepend", "Replace"]
    assert data["pre_tokenizer"] is None
    assert [d["type"] for d in data["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert [(t["id"], t["content"], t["special"]) for t in data["added_tokens"]] == [
        (0, "<unk>", True),
        (1, "<s>", True),
        (2, "</s>", True),
        (32000, "<im_patch>", True),
        (32001, "<im_start>", True),
        (32002, "<im_end>", True),
    ]
    pieces = _vocab_in_id_order(folder)
    assert pieces[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    # ":" and "." are lone pieces that no merge can ever absorb.
    assert not [p for p in pieces[259:] if len(p) > 1 and (":" in p or "." in p)]
    assert not [m for m in model["merges"] if ":" in m or "." in m]


def test_ids_and_sizes(tok: Tokenizer) -> None:
    assert tok.get_vocab_size(with_added_tokens=True) == 32003
    assert tok.get_vocab_size(with_added_tokens=False) == 32000
    expected = {"<unk>": 0, "<s>": 1, "</s>": 2, "<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002}
    assert {t: tok.token_to_id(t) for t in expected} == expected


def test_bos_is_prepended(tok: Tokenizer) -> None:
    ids = tok.encode("hello world").ids
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tok.encode("hello world", add_special_tokens=False).ids == ids[1:]


def test_mgie_prompt(tok: Tokenizer) -> None:
    ids = tok.encode(PROMPT).ids
    assert ids[0] == 1
    assert ids.count(32000) == 4 and ids.count(32001) == 1 and ids.count(32002) == 1
    start = ids.index(32001)
    assert ids[start : start + 6] == [32001, 32000, 32000, 32000, 32000, 32002]
    assert ids[-1] == tok.token_to_id(":")
    assert tok.encode("USER:", add_special_tokens=False).tokens[-1] == ":"
    # Legacy LLaMA quirk kept on purpose: the Prepend normalizer runs on every segment between added tokens,
    # so " ASSISTANT:" after <im_end> becomes "▁▁ASSISTANT:" and decodes with two spaces.
    tokens = tok.encode(PROMPT).tokens
    assert tokens[tokens.index("<im_end>") + 1] == "\u2581\u2581"
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT.split("<im_start>")[0] + "  ASSISTANT:"


@pytest.mark.parametrize("text", [*ENGLISH, UNICODE])
def test_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=True) == text


def test_byte_fallback_only_for_non_ascii(tok: Tokenizer) -> None:
    english = tok.encode(" ".join(ENGLISH[:-2]) + " " + ENGLISH[-1], add_special_tokens=False).tokens
    assert not [t for t in english if t.startswith("<0x")]
    assert {t for t in tok.encode(UNICODE).tokens if t.startswith("<0x")} >= {"<0xE6>", "<0x97>", "<0xF0>"}
    for char in string.ascii_letters + string.digits + string.punctuation:
        assert tok.token_to_id(char) is not None, char


def test_img_tokens_are_added_after_image_tokens(folder: Path) -> None:
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))  # fresh copy: adding tokens mutates it
    assert tok.add_special_tokens(IMG_TOKENS) == 8
    assert [tok.token_to_id(t) for t in IMG_TOKENS] == list(range(32003, 32011))
    ids = tok.encode("a cat[IMG0][IMG1]").ids
    assert ids[-2:] == [32003, 32004]
    assert tok.decode(ids, skip_special_tokens=True) == "a cat"


def test_sentencepiece_model_matches(tok: Tokenizer, sp: spm.SentencePieceProcessor) -> None:
    assert sp.get_piece_size() == 32000
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(32000)] == [tok.id_to_token(i) for i in range(32000)]
    assert sp.is_unknown(0) and sp.is_control(1) and sp.is_control(2)
    assert all(sp.is_byte(i) for i in range(3, 259)) and not sp.is_byte(259)
    for text in [*ENGLISH, UNICODE, PROMPT.split("\n")[0]]:
        assert sp.encode(text) == tok.encode(text, add_special_tokens=False).ids, text
        assert sp.decode(sp.encode(text)) == text


def test_transformers_fast_tokenizer_agrees(folder: Path, tok: Tokenizer) -> None:
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    assert fast(PROMPT)["input_ids"] == tok.encode(PROMPT).ids
    assert len(fast) == 32003


def test_without_sentencepiece_the_files_the_engine_reads_are_still_written(folder: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """sentencepiece is a test extra: without it only tokenizer.model (which nothing at run time reads) is missing."""
    from mgie_engine.tiny import tokenizer

    monkeypatch.setattr(tokenizer, "_has_sentencepiece", lambda: False)
    write_llama_tokenizer(tmp_path, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(FILES) - {"tokenizer.model"})
    for name in set(FILES) - {"tokenizer.model"}:
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes(), name
