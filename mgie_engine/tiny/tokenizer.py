"""Tiny, deterministic stand-in for the LLaVA-7B-v1 (LLaMA) tokenizer files shipped with MGIE.

The released ``tsujuifu/ml-mgie`` folder ``LLaVA-7B-v1/`` holds five tokenizer files.  Tests of the model
loader need the same files, with the same ids for everything the engine relies on (specials, byte
fallback, the three image tokens at 32000-32002), but without downloading 500 KB of real vocabulary.
So :func:`write_llama_tokenizer` trains a small BPE on a built-in English corpus, pads the vocabulary
to exactly 32000 pieces with seeded filler, and writes ``tokenizer.json`` (legacy HF LLaMA layout),
``tokenizer.model`` (sentencepiece BPE proto with the same ids), ``tokenizer_config.json``,
``special_tokens_map.json`` and ``added_tokens.json``.
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

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

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

# Image-editing instructions in the style MGIE receives from users.
_INSTRUCTIONS = """\
make the sky a sunset
turn the day into night
give him a beard
give her red hair
add a rainbow over the mountains
remove the car from the street
make it look like a painting by Van Gogh
turn the cat into a tiger
put a hat on the dog
make the water look frozen
change the season to winter
add snow to the trees
make the photo black and white
make it brighter
make the colors more vivid
turn the grass blue
add fireworks in the sky
replace the apple with an orange
make the man smile
make the woman look older
make him look younger
add sunglasses to the girl
remove the people in the background
make the house look abandoned
turn the lake into a desert
add a full moon
make it rain
add fog over the city
make the building taller
put a crown on the king
make the flowers purple
change the dress to blue
add a boat on the river
turn the car into a bicycle
make it look like a cartoon
make it look like an old photograph
add a dragon flying over the castle
remove the text from the sign
make the background blurry
add lightning to the storm
make the dog wear a scarf
give the statue a golden color
turn the forest into autumn
make the leaves orange and yellow
add a reflection in the window
make the room look cozy
add candles on the table
turn the lights off
make the kitchen modern
add a fireplace
change the sky to pink
make the clouds darker
add a sailboat near the shore
make the beach crowded
remove the trash from the park
make the road wet
add a red umbrella
turn him into a robot
make her hair curly
add freckles to her face
make the eyes green
give the bird bright feathers
make the sun bigger
add stars to the night sky
make it look like a watercolor
make it look like a pencil sketch
turn the photo into a comic book page
add a cup of coffee on the desk
make the cake chocolate
add strawberries on top
remove the glasses
give the man a mustache
make the horse white
turn the horse into a unicorn
add wings to the pig
make the mountain snowy
turn summer into spring
add cherry blossoms
make the street look like Paris
add a train on the bridge
make the bridge made of gold
change the wall color to green
add a painting on the wall
make the sofa leather
make the shirt striped
add a tie
make it look vintage
add a neon glow
make it look like a video game
turn the city into ruins
make everything underwater
add fish swimming around
make the ocean calm
add big waves
make the fire larger
put out the fire
add smoke from the chimney
make the tree bare
add apples to the tree
make the field of wheat golden
turn the clock to midnight
add a shadow under the chair
make the picture sharper
increase the contrast
reduce the saturation
make the skin tan
add a tattoo on his arm
give the child a balloon
make the balloon red
add a kite in the sky
make the desert green
add a cactus
make the sand white
turn the puppy into a kitten
make the kitten sleep
add a pair of boots
make the jacket yellow
make it look like it was taken at dawn
add a soft warm light
make the scene spooky
add a ghost in the hallway
make the pumpkin glow
decorate the room for Christmas
add presents under the tree
make the bread look fresh
remove the crumbs
make the teeth whiter
open his eyes
close the door
open the window
add curtains
let the cat wear a bow tie
make the sky look like outer space
add planets in the background
turn the moon into the earth
make the astronaut float
add a flag on the moon
"""

# General English so that common words and subwords get real merges.
_SENTENCES = """\
The quick brown fox jumps over the lazy dog.
A picture is worth a thousand words, but a good edit can say even more.
She opened the window and let the cool morning air fill the room.
The children played in the park until the sun went down.
We walked along the beach and collected shells in a small bucket.
He painted the fence white and then sat down to rest in the shade.
The old lighthouse stood on the rocks at the edge of the sea.
Every evening the city lights turn on one by one.
My grandmother keeps a garden full of roses, tulips, and sunflowers.
The train was late, so we waited on the platform and talked about the weather.
In winter the lake freezes and people skate across the ice.
The museum has paintings from many different centuries and countries.
Please describe the image in detail and explain what is happening.
The photograph shows a family having a picnic under a large oak tree.
There is a red car parked in front of a small yellow house.
The man is wearing a blue jacket, a gray scarf, and black shoes.
The woman is holding an umbrella while walking through the rain.
Two dogs are running across a green field chasing a ball.
A cat is sleeping on the windowsill in the warm afternoon sun.
The mountains in the distance are covered with snow.
Clouds gathered over the valley and soon it began to rain.
The bakery on the corner sells fresh bread every morning.
They built a wooden bridge across the river last summer.
The teacher asked the students to write a short story about their holidays.
It is important to drink water and get enough sleep.
The assistant should answer the question clearly and politely.
I would like to change the color of the background to something brighter.
Could you make the image look more realistic and natural?
The sunset painted the sky with shades of orange, pink, and purple.
At night the stars shine brightly above the quiet village.
The flowers in the vase were arranged by a local artist.
A small boat drifted slowly down the river.
The forest was dark and full of tall pine trees.
The street was crowded with people shopping for the festival.
She smiled when she saw the birthday cake with candles on top.
He fixed the old bicycle and rode it to school.
The kitchen smelled of coffee, cinnamon, and warm apples.
The storm knocked down several trees near the road.
After the rain a bright rainbow appeared over the hills.
The castle on the hill has four towers and a large gate.
The robot walked into the room and greeted everyone.
Artificial intelligence can help people edit their photos quickly.
The model looks at the image and the instruction, and then it imagines the result.
This image shows a beautiful landscape with a lake and a forest.
The user wants to see what the picture would look like in another style.
Let me think about how the scene would change.
The result should keep the original composition while following the instruction.
The sky would become darker and the lights of the buildings would be visible.
The leaves would turn red and yellow, and some would fall to the ground.
The person would have a thick beard and look a little older.
The water would look calm and reflect the colors of the sunset.
The snow would cover the roofs, the cars, and the streets.
The photo would look like an oil painting with thick brush strokes.
The colors would be warmer and the shadows would be softer.
What is the weather like today?
Where did you put the keys?
How many apples are there on the table?
Why is the sky blue during the day and black at night?
Which one do you like better, the red one or the green one?
When will the next bus arrive at the station?
Who painted this picture of the sea?
I think the second version looks much better than the first.
Thank you for your help, it was very useful.
Sure, here is a detailed description of the edited image.
Of course, I can help you with that.
The answer depends on the lighting, the angle, and the subject of the photo.
First, identify the main object; second, change its color; third, adjust the light.
Her brother's dog isn't allowed on the couch, but it doesn't care.
They're going to the concert tonight, aren't they?
It's a long way to the top of the hill, so we'll need water.
The price went up by 20 percent in 2023, from 15 dollars to 18 dollars.
Call me at 9:30 tomorrow morning or after 5 in the afternoon.
The recipe needs 2 eggs, 3 cups of flour, and 1 cup of milk.
Chapter 12 begins on page 245.
The meeting is scheduled for Monday, June 3rd, at 10:00.
Note: the file must be saved before the program exits.
Warning: do not touch the hot surface!
Question: what color is the car? Answer: the car is red.
Use a soft brush (size 12) and paint the edges gently.
The list includes apples, bananas, cherries, grapes, and lemons.
He said, "I will be there soon," and hung up the phone.
She asked, "Is it going to snow tomorrow?"
The sign read: "Closed for repairs; open again next week."
Visit the website at example.com for more information.
The temperature dropped to -5 degrees last night.
A + B = C, and 3 * 4 = 12, while 10 / 2 = 5.
Use the #hashtag and @mention to reach more people.
The score was 3-1 at half time & 4-2 at the end.
Her email address is anna_smith@example.org.
The path is /home/user/images/photo_01.png on the server.
Prices: $5, $10, and $20; discounts up to 50%.
Press Ctrl+C to copy and Ctrl+V to paste [text] into the {box}.
The pipe | symbol, the tilde ~, the caret ^ and the backtick ` are rare.
Python uses the <= and >= operators for comparisons.
This is the end of the story; the heroes lived happily ever after.
Bright colors, strong contrast, and sharp details make a photo stand out.
Soft light from the window falls on the table and the chairs.
The garden looks wonderful in spring when everything is in bloom.
People gathered around the fire to tell stories and sing songs.
The airplane flew above the clouds toward the setting sun.
A lonely tree stands in the middle of a wide green meadow.
The waves crashed against the rocks and sprayed white foam.
Deep in the jungle there are colorful birds and huge butterflies.
The desert stretches for miles under the burning sun.
The little girl drew a house, a tree, and a big yellow sun.
Old photographs often look faded and slightly brown.
Modern cameras can capture amazing detail even in low light.
The painter mixed blue and yellow to make green.
The portrait shows a young woman with long dark hair.
The city skyline glows with lights after sunset.
Fresh snow makes the whole world look clean and quiet.
The dog wagged its tail happily when its owner came home.
Cats love to sit in boxes and watch birds through the window.
Horses grazed peacefully in the field beside the farmhouse.
The fisherman pulled his net out of the water at dawn.
The astronaut looked back at the blue planet from space.
"""


def _corpus_lines() -> list[str]:
    """All training lines: the MGIE prompt template per instruction, the instructions, and plain English."""
    instructions = _INSTRUCTIONS.splitlines()
    prompts = [
        f"{SYSTEM_PROMPT} USER: what will this image be like if '{text}' ASSISTANT:" for text in instructions
    ]
    capitalized = [text[0].upper() + text[1:] + "." for text in instructions]
    return prompts + instructions + capitalized + _SENTENCES.splitlines()


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


def _added_token(token_id: int, content: str) -> dict[str, Any]:
    """One ``added_tokens`` entry of ``tokenizer.json``; matched on raw text, never split."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _tokenizer_json(pieces: list[str]) -> dict[str, Any]:
    """``tokenizer.json`` in the legacy layout of HF-converted LLaMA tokenizers (Prepend normalizer, no pre-tokenizer)."""
    bos = _SPECIALS[1]
    added = [_added_token(i, t) for i, t in enumerate(_SPECIALS)]
    added += [_added_token(VOCAB_SIZE + i, t) for i, t in enumerate(IMAGE_TOKENS)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {
            "type": "Sequence",
            "normalizers": [
                {"type": "Prepend", "prepend": SPACE},
                {"type": "Replace", "pattern": {"String": " "}, "content": SPACE},
            ],
        },
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": bos, "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {bos: {"id": bos, "ids": [1], "tokens": [bos]}},
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": _SPECIALS[0],
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "vocab": {piece: i for i, piece in enumerate(pieces)},
            "merges": list(_merges(pieces)),
        },
    }


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


def write_llama_tokenizer(folder: str | os.PathLike[str], *, seed: int = 0) -> None:
    """Write the five LLaVA-7B-v1 tokenizer files into the existing ``folder``.

    Files are byte-identical for equal ``seed``; the seed only changes the filler part of the vocabulary.
    """
    pieces = _build_vocab(seed)
    added = {token: VOCAB_SIZE + i for i, token in enumerate(IMAGE_TOKENS)}
    _write_all(
        Path(folder),
        [
            (
                "tokenizer.json",
                _dump_json(_tokenizer_json(pieces), sort_keys=False),
            ),  # vocab stays in id order
            ("tokenizer.model", _sentencepiece_model(pieces)),
            ("tokenizer_config.json", _dump_json(_tokenizer_config(), sort_keys=True)),
            ("special_tokens_map.json", _dump_json(_special_tokens_map(), sort_keys=True)),
            ("added_tokens.json", _dump_json(added, sort_keys=True)),
        ],
    )
