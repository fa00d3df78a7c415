"""Decoding as CUDA graph replays: a recorded prefill per shape, and the one-token step (or run check)."""

from __future__ import annotations

import logging

import torch

from . import device_turns
from .decode_buffers import DecodeBuffers

log = logging.getLogger(__name__)


class DecodeGraphs:
    """GreedyDecoder's graph recording (a mixin: it records the decoder's own prefill, step and check)."""

    def _prefill_replayed(self, b: DecodeBuffers, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """``_prefill`` as a CUDA graph replay, the same kernels as eager. A shape's first prefill runs
        eagerly; its second is the recording's warm-up run and records the graph (so a shape seen once, as
        under offload where buffers go at every stage change, never pays for a recording); later ones replay."""
        b.prefills += 1
        if b.prefill_graph is None and (b.prefills < 2 or not device_turns.may_record(ids.device)):
            self._prefill(b, ids, embeds, mask)
            return
        if b.prefill_graph is None:
            try:
                prompt = (ids.clone(), embeds.clone(), mask.clone())
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._prefill(b, *prompt)  # this call's prefill; recording below runs nothing
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with device_turns.capturing(ids.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    self._prefill(b, *prompt)
                b.prompt, b.prefill_graph = prompt, graph
            except Exception:  # never worse than eager: log once, prefill eagerly from now on
                log.exception("could not record the prefill as a CUDA graph; running it eagerly")
                self._prefill_graphs = False
                self._prefill(b, ids, embeds, mask)
            return
        for mine, given in zip(b.prompt, (ids, embeds, mask), strict=True):
            mine.copy_(given)
        b.prefill_graph.replay()

    def _capture(self, b: DecodeBuffers, check: bool = False) -> None:
        """Record one step (or the run check) as a CUDA graph, after a warm-up call whose effects are put
        back; the K/V and states it wrote lie past the current column, where nothing reads yet."""
        work = self._verify if check else self._step
        buffers = (b.position, b.column, b.key_ok, b.ids, b.token)
        saved = [buf.clone() for buf in buffers]
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                work(b)
            torch.cuda.current_stream().wait_stream(side)
        finally:  # recording runs nothing, so only this warm-up call has effects to put back
            for buf, value in zip(buffers, saved, strict=True):
                buf.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with device_turns.capturing(b.ids.device), torch.cuda.graph(graph):
            work(b)
        if check:
            b.verify_graph = graph
        else:
            b.graph = graph
