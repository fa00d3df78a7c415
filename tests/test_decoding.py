"""The decoder's own layer path: packed weights and the compiled one-token step (its CUDA form)."""

from __future__ import annotations

import torch
from conftest import make_image
from reference import reference_generate

from mgie_engine.decoding import GreedyDecoder
from mgie_engine.images import prepare_image
from mgie_engine.pipeline import NO_REPEAT_NGRAM, MgiePipeline


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
    pipe._decoder = GreedyDecoder(models.llm, NO_REPEAT_NGRAM, graphs=False, compile_layers=True)
    image = prepare_image(make_image(48, 64, 9), 64, models.vae_scale_factor)
    history = (("make the sky a sunset", "The sky turns orange."),)
    guidance = pipe.run_language_model(image, "make it night", history)
    ids, embeds = pipe.prompt_inputs(image, "make it night", history)
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
    pipe._decoder = decoder
    image = prepare_image(make_image(64, 48, 4), 64, models.vae_scale_factor)
    with caplog.at_level("ERROR", logger="mgie_engine.decoding"):
        guidance = pipe.run_language_model(image, "make it night")
        again = pipe.run_language_model(image, "make it day")
    ids, embeds = pipe.prompt_inputs(image, "make it night")
    seq, _ = reference_generate(models, ids, embeds)
    assert list(guidance.new_token_ids) == seq[len(ids):len(ids) + len(guidance.new_token_ids)]
    assert again.new_token_ids and not decoder.graphs
    assert sum("decoding eagerly" in r.message for r in caplog.records) == 1
