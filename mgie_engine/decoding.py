"""Greedy decoding of the MGIE prompt, one CUDA graph replay per token.

transformers' ``generate`` spends about half of each 7B decode step in Python between tokens (its
loop, a no-repeat-n-gram rule that reads the tokens back to the CPU, a device sync per token). Here
everything a step needs stays on the GPU (KV cache, token history, positions, attention mask), so a
step is one graph replay and the CPU looks at each token one step behind the GPU, only to decide when
to stop. The arithmetic is ``generate(do_sample=False, no_repeat_ngram_size=N)`` on a left-padded
batch, layer by layer with the model's own weights; the parity test holds it to the stock call.

In eager mode a layer is ~30 small kernels (norms, rotary, cache writes, residuals), ~1000 per token, so
with MGIE_COMPILE on CUDA one layer is a compiled function (norms, rotary and residuals fused around
cuBLAS matmuls; bench/NOTES.md, "Compiled decode layer"). In any case
each layer's q/k/v and gate/up weights are packed into one matrix apiece: the modules' own
parameters become views of it, so nothing is stored twice and stock ``forward`` still works.

A trained MGIE ends its answer with the run [IMG0]..[IMG7]; once a row is inside it, the rest is
checked in one pass (run_check.py). Graph recording is in decode_graphs.py, the layer itself in
llama_layer.py, the buffers a shape decodes in in decode_buffers.py.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch

from . import device_turns
from .decode_buffers import DecodeBuffers
from .decode_graphs import DecodeGraphs
from .errors import JobCancelledError
from .llama_layer import layer_function, layer_parameters, packed_weights
from .run_check import IsDone, RunCheck, keep_checked, run_guesses

log = logging.getLogger(__name__)

# Precision casts kept as eager rounds them, so the tokens stay those of the stock model.
LAYER_COMPILE_OPTIONS = {"emulate_precision_casts": True}
# Prefills of up to this many prompt tokens (batch x width) are replayed as CUDA graphs: below it a
# prefill is launch bound, above it the GPU's own work outlasts the launches (bench/NOTES.md, "Prefill").
PREFILL_GRAPH_TOKENS = 8192


class _TokenReader:
    """The host's view of the tokens: each step's picks copied back (pinned, without waiting), read one
    step behind the GPU into per-row answers that stop where ``is_done`` says."""

    def __init__(self, b: DecodeBuffers, max_new: int, is_done: IsDone) -> None:
        self.b, self.is_done = b, is_done
        self.cuda = b.token.device.type == "cuda"
        self.rows: list[list[int]] = [[] for _ in range(b.n)]
        self.done = [False] * b.n
        self.host = torch.empty(max_new, b.n, dtype=torch.long, pin_memory=self.cuda)
        self.events: dict[int, torch.cuda.Event] = {}

    def fetch(self, k: int) -> None:
        """Queue the copy of the step's token (the k-th new one) to the host."""
        self.host[k].copy_(self.b.token, non_blocking=self.cuda)
        if self.cuda:
            self.events[k] = torch.cuda.Event()
            self.events[k].record()

    def take(self, k: int) -> None:
        """Wait for the k-th token and add it to each unfinished row."""
        if self.cuda:
            self.events[k].synchronize()
        for r, token in enumerate(self.host[k].tolist()):
            if not self.done[r]:
                self.rows[r].append(token)
                self.done[r] = self.is_done(self.rows[r])


class GreedyDecoder(RunCheck, DecodeGraphs):
    """Decodes left-padded prompt batches; keeps a graph for the last few shapes (CUDA only)."""

    def __init__(self, llm, ngram: int, graphs: bool, keep_shapes: int = 2, compile_layers: bool | None = None) -> None:
        self.llm, self.ngram, self.graphs = llm, ngram, graphs
        self.model = llm.model
        self._shapes: OrderedDict[tuple[int, int, int], DecodeBuffers] = OrderedDict()
        self._keep = keep_shapes
        self._weights: list[tuple] = []
        self._fingerprint: tuple[int, ...] = ()
        self._layer = layer_function(llm)
        compile_layers = graphs if compile_layers is None else compile_layers
        # Compiled for the one-token step only; the prefill's width changes per batch and is GEMM bound.
        self._step_layer = torch.compile(self._layer, fullgraph=True, options=LAYER_COMPILE_OPTIONS) \
            if compile_layers else self._layer
        layer = self._layer

        def run_check_layer(*args):  # its own code object, so the run check's width is its own compile
            return layer(*args)

        self._check_layer = torch.compile(run_check_layer, fullgraph=True, options=LAYER_COMPILE_OPTIONS) \
            if compile_layers else layer
        self._checks = True  # False once checking a run failed to compile or record
        self._prefill_graphs = graphs  # False once recording a prefill failed

    def forget_graphs(self) -> None:
        """Drop recorded graphs, buffers and packed weights (the weights they read have moved)."""
        self._shapes.clear()
        self._weights, self._fingerprint = [], ()

    # -- the model, layer by layer ----------------------------------------------------------------
    def pack(self) -> None:
        """Point each layer's q/k/v and gate/up parameters into one matrix apiece (once per placement)."""
        params = [p for layer in self.model.layers for p in layer_parameters(layer)]
        fingerprint = tuple(p.data_ptr() for p in params)
        if fingerprint == self._fingerprint:
            return
        self._shapes.clear()  # recorded graphs read the old addresses
        with torch.inference_mode(False), torch.no_grad():
            self._weights = [packed_weights(layer) for layer in self.model.layers]
        self._fingerprint = tuple(p.data_ptr() for layer in self.model.layers for p in layer_parameters(layer))

    def _forward(self, b: DecodeBuffers, x: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor,
                 mask: torch.Tensor, layer_fn: Callable) -> torch.Tensor:
        """Run x (n, q, hidden) through the model writing K/V at ``columns``; returns last-layer states."""
        cos, sin = self.model.rotary_emb(x, positions)
        for i, weights in enumerate(self._weights):
            x = layer_fn(x, cos, sin, *weights, b.keys[i], b.values[i], columns, mask)
        return self.model.norm(x)

    def _next_token(self, b: DecodeBuffers, state: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return self._pick(b, self.llm.lm_head(state).float(), count)

    def _pick(self, b: DecodeBuffers, scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Greedy pick after banning every token that would repeat an n-gram of ids[:, :count]."""
        n, size = b.n, self.ngram
        if b.width >= size:
            hits = torch.arange(b.length - size + 1, device=scores.device) <= count - size
            for k in range(size - 1):  # the n-gram starting at j begins with the last size-1 tokens
                last = b.ids.gather(1, (count - size + 1 + k).view(1, 1).expand(n, 1))
                hits = hits & (b.ids[:, k:b.length - size + 1 + k] == last)
            banned = torch.zeros_like(scores, dtype=torch.int32).scatter_add_(
                1, b.ids[:, size - 1:], hits.to(torch.int32))
            scores = scores.masked_fill(banned > 0, float("-inf"))
        return scores.argmax(-1)

    def _step(self, b: DecodeBuffers) -> None:
        """One token for every row: feed ids[:, column], write the pick at column + 1. No host sync."""
        col = b.column.view(1)
        token = b.ids.gather(1, col.view(1, 1).expand(b.n, 1))
        b.key_ok.index_fill_(1, col, True)
        mask = b.key_ok[:, None, None, :]
        state = self._forward(b, self.model.embed_tokens(token), b.position.view(b.n, 1), col, mask, self._step_layer)
        b.states.index_copy_(1, col, state)
        b.token.copy_(self._next_token(b, state[:, 0], b.column + 1))
        b.ids.index_copy_(1, col + 1, b.token.view(b.n, 1))
        b.position.add_(1)
        b.column.add_(1)

    def _prefill(self, b: DecodeBuffers, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """The whole prompt in one pass; leaves the first new token at ids[:, width]."""
        n, width = ids.shape
        valid = mask.bool()
        b.ids.zero_()
        b.ids[:, :width] = ids
        b.key_ok.zero_()
        b.key_ok[:, :width] = valid
        positions = (mask.long().cumsum(-1) - 1).masked_fill(~valid, 1)
        causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        # Padding may see itself, or its all-masked rows would turn into NaN and leak through V.
        attend = (causal & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=ids.device)
        attend = torch.cat([attend, attend.new_zeros(n, width, b.length - width)], dim=2)[:, None]
        columns = torch.arange(width, device=ids.device)
        states = self._forward(b, embeds, positions, columns, attend, self._layer)
        b.states[:, :width] = states
        first = self._next_token(b, states[:, -1], b.columns[width])  # no host-to-device copy: recordable
        b.token.copy_(first)
        b.ids[:, width] = first
        b.position.copy_(positions[:, -1] + 1)
        b.column.fill_(width)

    def _buffers(self, n: int, width: int, max_new: int, checked: int = 0) -> DecodeBuffers:
        key = (n, width, max_new, checked)
        if key in self._shapes:
            self._shapes.move_to_end(key)
            return self._shapes[key]
        while len(self._shapes) >= self._keep:
            self._shapes.popitem(last=False)
        self._shapes[key] = DecodeBuffers(self.llm, n, width, max_new, checked)
        return self._shapes[key]


    # -- one batch ----------------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, max_new: int, is_done: IsDone,
               cancel=None, run: Sequence[int] = ()) -> tuple[list[list[int]], torch.Tensor]:
        """New tokens per row (each up to where ``is_done`` said stop) and the last-layer states of
        every position (n, width + max_new, hidden; prompt columns left-padded as given). ``run``: tokens
        that, once a row writes one, follow in order (MGIE's [IMG0]..[IMG7]); they are checked in one pass."""
        checked = len(run) - 2 if len(run) >= 4 else 0
        self.pack()
        b, use_graph = self._prefilled(ids, embeds, mask, max_new, checked)
        tokens = _TokenReader(b, max_new, is_done)
        rows, done = tokens.rows, tokens.done
        tokens.fetch(0)
        queued, taken = 1, 0  # tokens asked of the GPU, tokens read back
        checks_left = 2  # run checks this decode may try; one that fails costs a pass
        while True:
            if queued < max_new:  # queue the next token before reading the last: the GPU never waits for Python
                if use_graph:
                    b.graph.replay()
                else:
                    self._step(b)
                tokens.fetch(queued)
                queued += 1
            if taken == queued:
                break
            tokens.take(taken)
            taken += 1
            if all(done):
                break
            if cancel is not None and cancel.is_set():
                raise JobCancelledError("The edit was cancelled.")
            guesses = run_guesses(rows, done, run, checked) \
                if checks_left and self._checks and queued == taken + 1 and queued + checked <= max_new else None
            if guesses is None or not self._queue_check(b, guesses):
                continue
            checks_left -= 1
            tokens.take(taken)  # the token in flight, which the check's first pick follows
            taken += 1
            picks = b.picks.tolist()
            if all(done):
                break
            advance = keep_checked(rows, done, guesses, picks, is_done)
            if all(done):
                break
            self._accept(b, advance)
            queued = taken = taken + advance
        if tokens.cuda:
            torch.cuda.current_stream().synchronize()
        return rows, b.states

    def _prefilled(self, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, max_new: int,
                   checked: int) -> tuple[DecodeBuffers, bool]:
        """The shape's buffers with the prompt prefilled, and whether steps replay a graph (recorded here on
        a shape's first decode; if recording fails, logged once, decoding goes eager from then on)."""
        n, width = ids.shape
        b = self._buffers(n, width, max_new, checked)
        with torch.profiler.record_function("llm.prefill"):
            if self._prefill_graphs and self.graphs and n * width <= PREFILL_GRAPH_TOKENS:
                self._prefill_replayed(b, ids, embeds, mask)
            else:
                self._prefill(b, ids, embeds, mask)
        # Not recorded, for now, in a thread that may not record while the device compiles (device_turns.py).
        use_graph = self.graphs and max_new > 1 and (b.graph is not None or device_turns.may_record(ids.device))
        if use_graph and b.graph is None:
            try:
                self._capture(b)
            except Exception:  # never worse than eager: log once, decode without graphs from now on
                log.exception("could not compile or capture the decode step; decoding eagerly")
                self.graphs = use_graph = False
                self._step_layer = self._check_layer = self._layer
                self._shapes.clear()
                b = self._buffers(n, width, max_new, checked)
                self._prefill(b, ids, embeds, mask)
        return b, use_graph
