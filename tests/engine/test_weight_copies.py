"""The fast weight load (staged copies from the memory-mapped files, cast on the device) gives exactly the
tensors of the plain one. On a CPU the staged path runs the same chunking and casting code as on CUDA,
without pinned buffers and streams."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_settings

from mgie_engine.models import load_models
from mgie_engine.weight_copies import WeightCopier


def _tensors(models) -> dict[str, torch.Tensor]:
    parts = {"llm": models.llm, "projector": models.projector, "vision": models.vision,
             "edit_head": models.edit_head, "unet": models.unet, "vae": models.vae}
    return {f"{part}.{name}": t for part, module in parts.items()
            for name, t in itertools.chain(module.named_parameters(), module.named_buffers())}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])  # fp32: every fp16 tensor of the files is cast; fp16: none is
def test_staged_load_gives_the_plain_loads_tensors(tiny_paths, monkeypatch, dtype):
    import mgie_engine.weight_copies as copies

    monkeypatch.setattr(copies, "STAGING_BYTES", 1000)  # most tensors take several chunks and end in a partial one
    settings = tiny_settings(tiny_paths, dtype=dtype)
    plain, staged = _tensors(load_models(settings, staged=False)), _tensors(load_models(settings, staged=True))
    assert plain.keys() == staged.keys() and len(plain) > 100
    for key, value in plain.items():
        assert staged[key].dtype == value.dtype and torch.equal(staged[key], value), key
    assert any(v.numel() * v.element_size() > 3000 for v in plain.values())
    weights = [k for k in staged if k.startswith(("llm.", "unet.")) and "rotary_emb" not in k]  # inv_freq stays fp32
    assert {staged[k].dtype for k in weights} == {settings.torch_dtype()}


def test_copier_places_every_kind_of_tensor_as_to_does():
    gen = torch.Generator().manual_seed(0)
    tensors = {"matrix": torch.randn(37, 53, generator=gen).half(), "scalar": torch.tensor(2.5, dtype=torch.float16),
               "ints": torch.arange(1000), "transposed": torch.randn(20, 30, generator=gen).t(),
               "empty": torch.empty(0, 4), "bf16": torch.randn(300, generator=gen).bfloat16()}
    with WeightCopier(torch.device("cpu"), torch.float32, staged=True, threads=3, staging_bytes=64) as copier:
        placed = copier.place(tensors)
        assert copier.bytes_copied == sum(t.numel() * t.element_size() for t in tensors.values())
    assert list(placed) == list(tensors)
    for key, value in tensors.items():
        expected = value.to(torch.float32) if value.is_floating_point() else value
        assert placed[key].dtype == expected.dtype and torch.equal(placed[key], expected), key
    assert placed["ints"].dtype == torch.int64
