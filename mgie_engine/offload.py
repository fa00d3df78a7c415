"""Stage residency for small cards: one stage's big models on the GPU at a time.

On a 16 GB card the 12.6 GiB LLM and the 2 GiB UNet + VAE do not fit together with their
activations (15.4 GiB at batch 1). With ``MGIE_OFFLOAD=1`` both groups keep their weights in pinned
host memory; a stage copies its group in and the other group's GPU copies are dropped. The host
copy is the master (inference never changes a weight), so nothing is copied back.

Copies are made per storage, not per tensor: parameters that are views of one block (the decoder's
packed q/k/v and gate/up matrices) stay views of one block on the card, so a move neither splits
them nor needs a re-pack (which, under a tight memory cap, would also fragment the allocator).
"""

from __future__ import annotations

import torch


def _whole_storage(t: torch.Tensor) -> torch.Tensor:
    """A flat tensor over all of t's storage (t's dtype), of which t is a view."""
    size = t.untyped_storage().nbytes() // t.element_size()
    return t.detach().new_empty(0).set_(t.untyped_storage(), 0, (size,), (1,))


class StageResidency:
    """Switches which group of modules has its weights on the device."""

    def __init__(self, groups: dict[str, list[torch.nn.Module]], device: torch.device) -> None:
        self.device = device
        pin = device.type == "cuda"
        # Per group: (flat host master, [(tensor, shape, stride, offset) viewing it]).
        self._host: dict[str, list[tuple[torch.Tensor, list[tuple]]]] = {}
        for name, modules in groups.items():
            blocks: dict[int, tuple[torch.Tensor, list[tuple]]] = {}
            for module in modules:
                for tensor in [*module.parameters(), *module.buffers()]:
                    key = tensor.untyped_storage().data_ptr()
                    if key not in blocks:
                        host = _whole_storage(tensor).to("cpu", copy=True)
                        blocks[key] = (host.pin_memory() if pin else host, [])
                    blocks[key][1].append((tensor, tensor.shape, tensor.stride(), tensor.storage_offset()))
            self._host[name] = list(blocks.values())
        self.active: str | None = None
        for blocks in self._host.values():
            self._point(blocks, [host for host, _ in blocks])

    @staticmethod
    def _point(blocks: list[tuple[torch.Tensor, list[tuple]]], flats: list[torch.Tensor]) -> None:
        for (_, views), flat in zip(blocks, flats, strict=True):
            for tensor, shape, stride, offset in views:
                tensor.data = flat.as_strided(shape, stride, offset)

    def use(self, group: str) -> bool:
        """Make ``group`` resident (and every other group host-only); True if anything moved."""
        if group == self.active:
            return False
        for name, blocks in self._host.items():  # free the leaving group's GPU copies before copying in:
            if name != group:                     # both at once is exactly what does not fit
                self._point(blocks, [host for host, _ in blocks])
        blocks = self._host[group]
        self._point(blocks, [host.to(self.device, non_blocking=True, copy=True) for host, _ in blocks])
        self.active = group
        return True
