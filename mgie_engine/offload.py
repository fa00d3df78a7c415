"""Stage residency for small cards: one stage's big models on the GPU at a time.

On a 16 GB card the 12.6 GiB LLM and the 2 GiB UNet + VAE do not fit together with their
activations (15.4 GiB at batch 1). With ``MGIE_OFFLOAD=1`` both groups keep their weights in pinned
host memory; a stage copies its group in and the other group's GPU copies are dropped. The host
copy is the master (inference never changes a weight), so nothing is copied back.
"""

from __future__ import annotations

import torch


class StageResidency:
    """Switches which group of modules has its weights on the device."""

    def __init__(self, groups: dict[str, list[torch.nn.Module]], device: torch.device) -> None:
        self.device = device
        pin = device.type == "cuda"
        self._host: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for name, modules in groups.items():
            pairs = []
            for module in modules:
                for tensor in [*module.parameters(), *module.buffers()]:
                    host = tensor.detach().to("cpu", copy=True)
                    pairs.append((tensor, host.pin_memory() if pin else host))
            self._host[name] = pairs
        self.active: str | None = None
        for pairs in self._host.values():
            for tensor, host in pairs:
                tensor.data = host

    def use(self, group: str) -> bool:
        """Make ``group`` resident (and every other group host-only); True if anything moved."""
        if group == self.active:
            return False
        for name, pairs in self._host.items():  # free the leaving group's GPU copies before copying in:
            if name != group:                    # both at once is exactly what does not fit
                for tensor, host in pairs:
                    tensor.data = host
        for tensor, host in self._host[group]:
            tensor.data = host.to(self.device, non_blocking=True, copy=True)
        self.active = group
        return True
