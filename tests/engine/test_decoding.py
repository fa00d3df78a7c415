"""The decoder's own layer path: packed weights and the compiled one-token step (its CUDA form)."""

from __future__ import annotations

import torch
from conftest import guide, make_image, prompt_inputs
from reference import reference_generate

from mgie_engine.decoding import GreedyDecoder
from mgie_engine.images import prepare_image
from mgie_engine.language import NO_REPEAT_NGRAM
from mgie_engine.pipeline import MgiePipeline
from mgie_engine.run_check import keep_checked as _keep_checked
from mgie_engine.run_check import run_guesses as _run_guesses


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_packing_makes_the_modules_weights_views_and_keeps_stock_forward(tiny_models):
    llm = tiny_models.llm
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        before = llm(input_ids=ids).logits
    decoder = GreedyDecoder(llm, NO_REPEAT_NGRAM, graphs=False)
    decoder.pack()
    for layer, weights in zip(llm.model.layers, decoder._weights, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        wqkv, wgu = weights[1], weights[6]
        assert {_storage(attn.q_proj.weight), _storage(attn.k_proj.weight), _storage(attn.v_proj.weight)} == {_storage(wqkv)}
        assert {_storage(mlp.gate_proj.weight), _storage(mlp.up_proj.weight)} == {_storage(wgu)}
        assert wqkv.shape[0] == attn.q_proj.out_features + attn.k_proj.out_features + attn.v_proj.out_features
    with torch.no_grad():
        after = llm(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_weights_that_moved_are_packed_again_and_graphs_dropped(tiny_models):
    llm = tiny_models.llm
    decoder = GreedyDecoder(llm, NO_REPEAT_NGRAM, graphs=False)
    decoder.pack()
    decoder._buffers(1, 8, 4)
    packed = decoder._weights[0][1]
    q = llm.model.layers[0].self_attn.q_proj
    q.weight.data = q.weight.data.clone()  # what a move between host and card does to a parameter
    decoder.pack()
    assert not decoder._shapes
    assert decoder._weights[0][1] is not packed
    assert _storage(q.weight) == _storage(decoder._weights[0][1])
    torch.testing.assert_close(decoder._weights[0][1][:q.out_features], q.weight, rtol=0, atol=0)


def test_compiled_step_decodes_like_stock_generate(tiny_models_babbling):
    """The compiled layer (what CUDA replays) keeps generate's tokens and states; here on the CPU."""
    models = tiny_models_babbling
    pipe = MgiePipeline(models, max_side=64)
    pipe.language.decoder = GreedyDecoder(models.llm, NO_REPEAT_NGRAM, graphs=False, compile_layers=True)
    image = prepare_image(make_image(48, 64, 9), 64, models.vae_scale_factor)
    history = (("make the sky a sunset", "The sky turns orange."),)
    guidance = guide(pipe, image, "make it night", history)
    ids, embeds = prompt_inputs(pipe, image, "make it night", history)
    seq, states = reference_generate(models, ids, embeds)
    assert len(guidance.new_token_ids) == 96
    assert list(guidance.new_token_ids) == seq[len(ids):len(ids) + 96]
    torch.testing.assert_close(guidance.prompt_embeds, models.edit_head(states.unsqueeze(0), models.img_embeds),
                               rtol=1e-4, atol=1e-5)


def test_a_step_that_cannot_be_compiled_or_captured_falls_back_to_eager(tiny_models_babbling, caplog):
    """No CUDA graph here (a CPU) and a compiled layer that fails: the decode still ends, eagerly, with
    generate's tokens, and says so once in the log."""
    models = tiny_models_babbling
    pipe = MgiePipeline(models, max_side=64)
    decoder = GreedyDecoder(models.llm, NO_REPEAT_NGRAM, graphs=True)

    def broken(*args):
        raise RuntimeError("inductor is not available here")

    decoder._step_layer = broken
    pipe.language.decoder = decoder
    image = prepare_image(make_image(64, 48, 4), 64, models.vae_scale_factor)
    with caplog.at_level("ERROR", logger="mgie_engine.decoding"):
        guidance = guide(pipe, image, "make it night")
        again = guide(pipe, image, "make it day")
    ids, embeds = prompt_inputs(pipe, image, "make it night")
    seq, _ = reference_generate(models, ids, embeds)
    assert list(guidance.new_token_ids) == seq[len(ids):len(ids) + len(guidance.new_token_ids)]
    assert again.new_token_ids and not decoder.graphs
    assert sum("decoding eagerly" in r.message for r in caplog.records) == 1


def _counted(decoder: GreedyDecoder) -> dict[str, int]:
    """Count the decoder's one-token steps and run checks (each a pass over the weights)."""
    calls = {"step": 0, "check": 0}
    step, verify = decoder._step, decoder._verify

    def counted_step(b):
        calls["step"] += 1
        step(b)

    def counted_verify(b):
        calls["check"] += 1
        verify(b)

    decoder._step, decoder._verify = counted_step, counted_verify
    return calls


def _babble(models, max_new: int, run=()):
    """Decode one prompt of the babbling model for ``max_new`` tokens: rows, states and pass counts."""
    pipe = MgiePipeline(models, max_side=64)
    image = prepare_image(make_image(64, 48, 5), 64, models.vae_scale_factor)
    ids, embeds = prompt_inputs(pipe, image, "make the lake frozen")
    decoder = GreedyDecoder(models.llm, NO_REPEAT_NGRAM, graphs=False)
    calls = _counted(decoder)
    with torch.inference_mode():
        rows, states = decoder.decode(torch.tensor([ids]), embeds, torch.ones(1, len(ids), dtype=torch.long),
                                      max_new, lambda row: False, run=run)
    return rows[0], states[0, :len(ids) + max_new - 1].clone(), calls


def test_a_run_that_holds_is_checked_in_one_pass_with_generates_tokens(tiny_models_babbling):
    """Once a row writes the run's first token, the next six are checked at once: six steps become one
    pass, and the tokens and states are those of decoding token by token."""
    plain, plain_states, plain_calls = _babble(tiny_models_babbling, 40)
    assert plain_calls == {"step": 39, "check": 0}
    run = plain[10:18]
    assert not set(run[:-1]) & set(plain[:10])  # the run starts at token 10, as [IMG0] does in an answer
    rows, states, calls = _babble(tiny_models_babbling, 40, run=run)
    assert rows == plain
    assert calls == {"step": 33, "check": 1}
    torch.testing.assert_close(states, plain_states, rtol=1e-4, atol=1e-5)


def test_a_run_the_model_leaves_keeps_only_the_models_own_picks(tiny_models_babbling):
    """Guesses that stop matching what the model picks: the picks up to there are kept, the rest comes
    token by token, and the answer is still generate's."""
    plain, plain_states, _ = _babble(tiny_models_babbling, 40)
    wrong = [t for t in range(5, 200) if t not in plain][:5]
    run = plain[10:13] + wrong  # the model writes run[0..2], then not run[3]
    rows, states, calls = _babble(tiny_models_babbling, 40, run=run)
    assert rows == plain
    assert calls == {"step": 37, "check": 1}  # the check kept two tokens: the in-flight one's pick and the next
    torch.testing.assert_close(states, plain_states, rtol=1e-4, atol=1e-5)


def test_the_visual_tokens_of_an_answer_are_checked_in_one_pass(tiny_models):
    """The planted answer ends in [IMG0]..[IMG7]: the engine checks [IMG2]..[IMG7] in one pass and its
    guidance equals stock generate's (tests/engine/test_parity.py holds the images to the reference)."""
    models = tiny_models
    pipe = MgiePipeline(models, max_side=64)
    calls = _counted(pipe.language.decoder)
    image = prepare_image(make_image(64, 48, 3), 64, models.vae_scale_factor)
    guidance = guide(pipe, image, "make it night")
    ids, embeds = prompt_inputs(pipe, image, "make it night")
    seq, states = reference_generate(models, ids, embeds)
    new = list(guidance.new_token_ids)
    assert new == seq[len(ids):len(ids) + len(new)] and new[-8:] == list(models.token_ids.img)
    assert calls["check"] == 1 and calls["step"] == len(new) - 1 - 6
    torch.testing.assert_close(guidance.prompt_embeds, models.edit_head(states.unsqueeze(0), models.img_embeds),
                               rtol=1e-4, atol=1e-5)


def test_rows_of_a_batch_move_together_by_what_every_unfinished_row_holds():
    """Guesses per row from where it is in the run, and the shared advance after a check."""
    run = [90, 91, 92, 93, 94, 95, 96, 97]
    rows = [[5, 90], [5, 6], [90, 91, 92, 93]]
    assert _run_guesses(rows, [False, False, False], run, 6) is None  # row 1 is not in the run
    guesses = _run_guesses(rows, [False, True, False], run, 6)
    assert guesses == [[92, 93, 94, 95, 96], [97] * 5, [95, 96, 97, 97, 97]]
    # Row 0 (91 in flight) holds all six picks; row 2 (94 in flight) ends at 97 after three.
    picks = [[92, 93, 94, 95, 96, 97], [1, 2, 3, 4, 5, 6], [95, 96, 97, 2, 2, 2]]
    rows = [[5, 90, 91], [5, 6], [90, 91, 92, 93, 94]]
    done = [False, True, False]
    assert _keep_checked(rows, done, guesses, picks, lambda row: row[-1] == 97) == 0  # both end inside it
    assert rows == [[5, 90, 91, 92, 93, 94, 95, 96, 97], [5, 6], [90, 91, 92, 93, 94, 95, 96, 97]]
    assert done == [True, True, True]
    # Nothing ends: row 0's guess fails at its third pick, so both rows move by three.
    picks = [[92, 93, 50, 51, 52, 53], [0] * 6, [95, 96, 97, 60, 61, 62]]
    rows = [[5, 90, 91], [5, 6], [90, 91, 92, 93, 94]]
    done = [False, True, False]
    assert _keep_checked(rows, done, guesses, picks, lambda row: False) == 3
    assert rows == [[5, 90, 91, 92, 93, 50], [5, 6], [90, 91, 92, 93, 94, 95, 96, 97]]


def test_a_run_check_that_cannot_run_falls_back_to_token_by_token(tiny_models, caplog):
    """The run check's compiled layer fails: the answer is still generate's, decoded step by step, the
    cache mask is put back, and the log says so once."""
    models = tiny_models
    pipe = MgiePipeline(models, max_side=64)

    def broken(*args):
        raise RuntimeError("inductor is not available here")

    pipe.language.decoder._check_layer = broken
    calls = _counted(pipe.language.decoder)
    image = prepare_image(make_image(64, 48, 3), 64, models.vae_scale_factor)
    with caplog.at_level("ERROR", logger="mgie_engine.decoding"):
        guidance = guide(pipe, image, "make it night")
        guide(pipe, image, "make it day")
    ids, embeds = prompt_inputs(pipe, image, "make it night")
    seq, states = reference_generate(models, ids, embeds)
    new = list(guidance.new_token_ids)
    assert new == seq[len(ids):len(ids) + len(new)] and new[-8:] == list(models.token_ids.img)
    assert calls["check"] == 1 and not pipe.language.decoder._checks
    torch.testing.assert_close(guidance.prompt_embeds, models.edit_head(states.unsqueeze(0), models.img_embeds),
                               rtol=1e-4, atol=1e-5)
    assert sum("run check" in r.message for r in caplog.records) == 1


def test_a_run_check_never_reaches_past_the_token_limit(tiny_models_babbling):
    """A check only runs when all its picks fall within ``max_new``: at the last place it fits it still
    runs and ends the answer exactly at the limit; one token later it does not run."""
    plain, plain_states, _ = _babble(tiny_models_babbling, 18)
    assert not set(plain[10:17]) & set(plain[:10])  # nothing triggers a check before the run starts
    rows, states, calls = _babble(tiny_models_babbling, 18, run=plain[10:18])
    assert rows == plain and calls == {"step": 11, "check": 1}  # its picks are tokens 12..17, the last ones
    torch.testing.assert_close(states, plain_states, rtol=1e-4, atol=1e-5)
    rows, _, calls = _babble(tiny_models_babbling, 18, run=plain[11:18] + [0])
    assert rows == plain and calls == {"step": 17, "check": 0}


def test_the_installed_transformers_is_one_the_llama_layer_was_checked_against():
    """llama_layer.py re-implements LlamaDecoderLayer's arithmetic; a transformers release it was not checked
    against may change that arithmetic without any error. Fail loudly, saying what to check."""
    import transformers

    from mgie_engine.llama_layer import CHECKED_TRANSFORMERS, transformers_checked

    assert transformers_checked(transformers.__version__), (
        f"transformers {transformers.__version__} is outside the versions mgie_engine/llama_layer.py was checked "
        f"against ({CHECKED_TRANSFORMERS[0]} to {CHECKED_TRANSFORMERS[-1]}). Compare LlamaDecoderLayer, "
        "LlamaAttention, LlamaRMSNorm and apply_rotary_pos_emb in transformers/models/llama/modeling_llama.py "
        "with llama_layer.layer_function, run tests/engine/test_decoding.py and tests/engine/test_parity.py (and the GPU parity "
        "in bench/mgie_bench.py), then add the version to CHECKED_TRANSFORMERS.")


def test_the_version_check_knows_the_range_it_was_checked_in():
    from mgie_engine.llama_layer import transformers_checked

    assert transformers_checked("5.17.0") and transformers_checked("5.25.0") and transformers_checked("5.20.1.dev0")
    assert not transformers_checked("5.26.0") and not transformers_checked("4.57.1") and not transformers_checked("6.0.0")


def test_installs_stay_within_the_transformers_releases_the_layer_was_checked_against():
    import tomllib
    from pathlib import Path

    from packaging.specifiers import SpecifierSet

    from mgie_engine.llama_layer import CHECKED_TRANSFORMERS

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    [requirement] = [d for d in project["dependencies"] if d.startswith("transformers")]
    allowed = SpecifierSet(requirement.removeprefix("transformers"))
    (major, minor) = CHECKED_TRANSFORMERS[1]
    assert f"{major}.{minor}.9" in allowed and f"{major}.{minor + 1}.0" not in allowed
