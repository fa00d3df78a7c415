"""Eager GPU work replayed as CUDA graphs: the kernels eager mode picks, launched once instead of one by one.

At one job the GPU waits for the CPU in every part of an edit that runs op by op (CLIP, the edit head,
a lone VAE decode: launch bound; bench/NOTES.md, "Graphed eager calls"). A recorded graph replays the same kernels on
the same addresses, so its results are the eager call's, bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

from . import device_turns

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Recorded:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output: torch.Tensor


class GraphedCall:
    """``fn(*tensors) -> tensor`` recorded once per input shape, then replayed.

    Inputs are copied into the recording's own tensors and the output is cloned out, so callers see an
    ordinary function. The recordings share one memory pool: each replay finishes with the clone before
    the next one starts, so one recording's scratch memory can be another's. The ``keep`` most recent
    shapes are kept. On CPU, when ``enabled`` is False, and after a recording fails (logged once), ``fn``
    just runs; so it does, without recording, in a thread that may not record now (device_turns.py).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], name: str, keep: int = 8, enabled: bool = True,
                 mark: Callable[..., None] | None = None) -> None:
        self.fn, self.name, self.keep, self.enabled = fn, name, keep, enabled
        self.mark = mark  # applied to the recording's own inputs (a compiled fn's dynamic-size marks)
        self._recorded: OrderedDict[tuple, _Recorded] = OrderedDict()
        self._pool: tuple | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled or not inputs[0].is_cuda:
            return self.fn(*inputs)
        key = tuple((tuple(x.shape), x.stride(), x.dtype, x.device) for x in inputs)
        recorded = self._recorded.get(key)
        if recorded is None:
            if not device_turns.may_record(inputs[0].device):  # the device compiles in the background
                return self.fn(*inputs)
            try:
                recorded = self._record(inputs)
            except Exception:  # never worse than eager: say so once, then run eagerly from now on
                log.exception("could not record %s as a CUDA graph; running it eagerly", self.name)
                self.forget()
                self.enabled = False
                return self.fn(*inputs)
            while len(self._recorded) >= self.keep:
                self._recorded.popitem(last=False)
            self._recorded[key] = recorded
        else:
            self._recorded.move_to_end(key)
        for mine, given in zip(recorded.inputs, inputs, strict=True):
            mine.copy_(given)
        recorded.graph.replay()
        return recorded.output.clone()

    def forget(self) -> None:
        """Drop every recording (the weights they read have moved, or memory is wanted back)."""
        self._recorded.clear()
        self._pool = None

    def _record(self, inputs: tuple[torch.Tensor, ...]) -> _Recorded:
        mine = [x.clone() for x in inputs]
        if self.mark is not None:
            self.mark(*mine)
        # One eager call first, on a side stream as CUDA graph recording wants: lazy initialisation
        # (cuBLAS workspaces, cuDNN plans, a first compile) must not happen while recording.
        side = torch.cuda.Stream(device=mine[0].device)
        side.wait_stream(torch.cuda.current_stream(mine[0].device))
        with torch.cuda.stream(side):
            self.fn(*mine)
        torch.cuda.current_stream(mine[0].device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: another worker thread's CUDA calls (one per GPU) do not break this recording.
        with device_turns.capturing(mine[0].device), \
                torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = self.fn(*mine)
        return _Recorded(graph=graph, inputs=mine, output=output)
