"""MGIE_OFFLOAD: the LLM and the UNet/VAE take turns on the device, and edits do not change."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_image, tiny_settings

from mgie_engine.models import load_models
from mgie_engine.offload import StageResidency
from mgie_engine.pipeline import EditRequest, MgiePipeline
from mgie_engine.settings import EngineSettings


def test_only_the_active_group_has_device_copies_and_weights_never_change():
    a, b = torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2))
    before = {id(t): t.detach().clone() for m in (a, b) for t in [*m.parameters(), *m.buffers()]}
    residency = StageResidency({"a": [a], "b": [b]}, torch.device("cpu"))
    host = {id(t): t.data_ptr() for m in (a, b) for t in [*m.parameters(), *m.buffers()]}

    assert residency.use("a") and not residency.use("a")
    assert all(t.data_ptr() != host[id(t)] for t in a.parameters())  # a fresh device copy
    assert all(t.data_ptr() == host[id(t)] for t in [*b.parameters(), *b.buffers()])  # b is host-only
    assert residency.use("b")
    assert all(t.data_ptr() == host[id(t)] for t in a.parameters())
    for m in (a, b):
        for t in [*m.parameters(), *m.buffers()]:
            assert torch.equal(t.detach(), before[id(t)])


def test_the_setting_is_read_from_the_environment():
    assert EngineSettings.from_env({"MGIE_OFFLOAD": "1"}).offload
    assert not EngineSettings.from_env({}).offload


def test_offloaded_edits_equal_resident_ones(tiny_paths, tiny_models):
    offloaded = MgiePipeline(load_models(tiny_settings(tiny_paths, offload=True)), max_side=64, offload=True)
    resident = MgiePipeline(tiny_models, max_side=64)
    request = EditRequest(image=make_image(64, 48, 5), instruction="make it snowy", seed=3, steps=4)
    for _ in range(2):  # language -> diffusion -> language again: the groups swap back and forth
        got, want = offloaded(request), resident(request)
        assert got.expressive_instruction == want.expressive_instruction
        assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
        request = EditRequest(image=got.image, instruction="now add a moon", seed=4, steps=4)
    assert offloaded.residency.active == "diffusion"


def test_the_leaving_group_is_freed_before_the_next_one_is_copied_in(monkeypatch):
    """Both groups on the card at once is what a 16 GB card cannot hold (the first GPU run did that)."""
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    residency = StageResidency({"a": [a], "b": [b]}, torch.device("cpu"))
    host = {id(t): t.data_ptr() for m in (a, b) for t in m.parameters()}
    residency.use("b")
    seen = []
    original = torch.Tensor.to

    def watching(self, *args, **kwargs):
        seen.append(all(t.data_ptr() == host[id(t)] for t in b.parameters()))  # b already host-only?
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", watching)
    residency.use("a")  # the first group in order: copying it in first would overlap with b
    monkeypatch.undo()
    assert seen and all(seen)


def test_packed_weights_move_as_one_block_and_need_no_repack(tiny_paths):
    """The decoder's packed q/k/v stay views of one block across moves, so packing again is only a view."""
    models = load_models(tiny_settings(tiny_paths, offload=True))
    pipe = MgiePipeline(models, max_side=64, offload=True)
    attn = models.llm.model.layers[0].self_attn
    for group in ("language", "diffusion", "language"):
        pipe.residency.use(group)
        storages = {p.untyped_storage().data_ptr() for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)}
        assert len(storages) == 1
    before = attn.q_proj.weight.data_ptr()
    pipe.language.decoder.pack()
    assert attn.q_proj.weight.data_ptr() == before  # nothing was copied
    assert pipe.language.decoder._weights[0][1].data_ptr() == before
    torch.testing.assert_close(pipe.language.decoder._weights[0][1][:attn.q_proj.out_features], attn.q_proj.weight)


def test_views_of_one_storage_stay_views_of_one_copy():
    block = torch.arange(24.0).reshape(6, 4)
    a, b = torch.nn.Linear(4, 2, bias=False), torch.nn.Linear(4, 4, bias=False)
    a.weight.data, b.weight.data = block[:2], block[2:]
    residency = StageResidency({"x": [a, b], "y": [torch.nn.Linear(2, 2)]}, torch.device("cpu"))
    residency.use("x")
    assert a.weight.untyped_storage().data_ptr() == b.weight.untyped_storage().data_ptr()
    assert b.weight.storage_offset() == 8
    assert torch.equal(torch.cat([a.weight, b.weight]), block)


def test_the_decoder_lets_go_of_the_leaving_copies_before_a_move(tiny_paths):
    """Its packed weights are views of the LLM's device copies: held across a move, they would keep the
    LLM on the card next to the group coming in (the second GPU run: out of memory under a 15 GiB cap)."""
    pipe = MgiePipeline(load_models(tiny_settings(tiny_paths, offload=True)), max_side=64, offload=True)
    assert pipe.language.decoder._weights == []  # the residency took the weights to the host at start
    held_at_moves = []
    use = pipe.residency.use

    def recording(group):
        held_at_moves.append((group, len(pipe.language.decoder._weights)))
        return use(group)

    pipe.residency.use = recording
    request = EditRequest(image=make_image(64, 48, 5), instruction="make it snowy", seed=3, steps=2)
    pipe(request)
    pipe(EditRequest(image=make_image(48, 64, 6), instruction="now add a moon", seed=4, steps=2))
    assert [g for g, _ in held_at_moves] == ["language", "diffusion", "language", "diffusion"]
    assert all(held == 0 for _, held in held_at_moves)
