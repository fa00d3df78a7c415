"""Greedy decoding of the MGIE prompt, one CUDA graph replay per token.

transformers' ``generate`` spends about half of each 7B decode step in Python between tokens (its
loop, a no-repeat-n-gram rule that reads the tokens back to the CPU, a device sync per token). Here
everything a step needs stays on the GPU (KV cache, token history, positions, attention mask), so a
step is one graph replay and the CPU looks at each token one step behind the GPU, only to decide when
to stop. The arithmetic is ``generate(do_sample=False, no_repeat_ngram_size=N)`` on a left-padded
batch, layer by layer with the model's own modules; the parity test holds it to the stock call.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .errors import JobCancelledError

log = logging.getLogger(__name__)

IsDone = Callable[[list[int]], bool]


class _Buffers:
    """What one (batch, prompt width) shape decodes in: KV cache, tokens, states, its graph."""

    def __init__(self, llm, n: int, width: int, max_new: int) -> None:
        cfg, p = llm.config, next(llm.parameters())
        self.n, self.width, self.length = n, width, width + max_new
        heads = cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = (n, heads, self.length, head_dim)
        self.keys = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=p.device, dtype=p.dtype) for _ in range(cfg.num_hidden_layers)]
        self.ids = torch.zeros(n, self.length, device=p.device, dtype=torch.long)
        self.key_ok = torch.zeros(n, self.length, device=p.device, dtype=torch.bool)
        self.states = torch.zeros(n, self.length, cfg.hidden_size, device=p.device, dtype=p.dtype)
        self.position = torch.zeros(n, device=p.device, dtype=torch.long)  # of the token fed next
        self.column = torch.zeros((), device=p.device, dtype=torch.long)  # cache column it goes to
        self.token = torch.zeros(n, device=p.device, dtype=torch.long)  # the step's output
        self.graph: torch.cuda.CUDAGraph | None = None


class GreedyDecoder:
    """Decodes left-padded prompt batches; keeps a graph for the last few shapes (CUDA only)."""

    def __init__(self, llm, ngram: int, graphs: bool, keep_shapes: int = 2) -> None:
        self.llm, self.ngram, self.graphs = llm, ngram, graphs
        self.model = llm.model
        self._shapes: OrderedDict[tuple[int, int, int], _Buffers] = OrderedDict()
        self._keep = keep_shapes

    def forget_graphs(self) -> None:
        """Drop recorded graphs and buffers (the weights they read have moved)."""
        self._shapes.clear()

    # -- the model, layer by layer ----------------------------------------------------------------
    def _forward(self, b: _Buffers, x: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        """Run x (n, q, hidden) through the model writing K/V at ``columns``; returns last-layer states."""
        n, q = x.shape[:2]
        cos, sin = self.model.rotary_emb(x, positions)
        for i, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            shape = (n, q, -1, attn.head_dim)
            query = attn.q_proj(h).view(shape).transpose(1, 2)
            key = attn.k_proj(h).view(shape).transpose(1, 2)
            value = attn.v_proj(h).view(shape).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            b.keys[i].index_copy_(2, columns, key)
            b.values[i].index_copy_(2, columns, value)
            keys, values = b.keys[i], b.values[i]
            if attn.num_key_value_groups > 1:
                keys = keys.repeat_interleave(attn.num_key_value_groups, dim=1)
                values = values.repeat_interleave(attn.num_key_value_groups, dim=1)
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attn.scaling)
            x = x + attn.o_proj(out.transpose(1, 2).reshape(n, q, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.norm(x)

    def _next_token(self, b: _Buffers, state: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Greedy pick after banning every token that would repeat an n-gram of ids[:, :count]."""
        scores = self.llm.lm_head(state).float()
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

    def _step(self, b: _Buffers) -> None:
        """One token for every row: feed ids[:, column], write the pick at column + 1. No host sync."""
        col = b.column.view(1)
        token = b.ids.gather(1, col.view(1, 1).expand(b.n, 1))
        b.key_ok.index_fill_(1, col, True)
        mask = b.key_ok[:, None, None, :]
        state = self._forward(b, self.model.embed_tokens(token), b.position.view(b.n, 1), col, mask)
        b.states.index_copy_(1, col, state)
        b.token.copy_(self._next_token(b, state[:, 0], b.column + 1))
        b.ids.index_copy_(1, col + 1, b.token.view(b.n, 1))
        b.position.add_(1)
        b.column.add_(1)

    # -- one batch ----------------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, max_new: int, is_done: IsDone,
               cancel=None) -> tuple[list[list[int]], torch.Tensor]:
        """New tokens per row (each up to where ``is_done`` said stop) and the last-layer states of
        every position (n, width + max_new, hidden; prompt columns left-padded as given)."""
        n, width = ids.shape
        b = self._buffers(n, width, max_new)
        self._prefill(b, ids, embeds, mask)
        use_graph = self.graphs and max_new > 1
        if use_graph and b.graph is None:
            try:
                self._capture(b)
            except Exception:  # never worse than eager: log once, decode without graphs from now on
                log.exception("could not capture the decode step as a CUDA graph; decoding eagerly")
                self.graphs = use_graph = False
                self._shapes.clear()
                b = self._buffers(n, width, max_new)
                self._prefill(b, ids, embeds, mask)
        rows: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        cuda = b.token.device.type == "cuda"
        host = torch.empty(max_new, n, dtype=torch.long, pin_memory=cuda)
        events = []

        def fetch(k: int) -> None:
            host[k].copy_(b.token, non_blocking=cuda)
            if cuda:
                events.append(torch.cuda.Event())
                events[-1].record()

        fetch(0)
        for k in range(1, max_new + 1):
            if k < max_new:  # queue token k before reading token k - 1: the GPU never waits for Python
                if use_graph:
                    b.graph.replay()
                else:
                    self._step(b)
                fetch(k)
            if cuda:
                events[k - 1].synchronize()
            for r, token in enumerate(host[k - 1].tolist()):
                if not done[r]:
                    rows[r].append(token)
                    done[r] = is_done(rows[r])
            if all(done):
                break
            if cancel is not None and cancel.is_set():
                raise JobCancelledError("The edit was cancelled.")
        if cuda:
            torch.cuda.current_stream().synchronize()
        return rows, b.states

    def _buffers(self, n: int, width: int, max_new: int) -> _Buffers:
        key = (n, width, max_new)
        if key in self._shapes:
            self._shapes.move_to_end(key)
            return self._shapes[key]
        while len(self._shapes) >= self._keep:
            self._shapes.popitem(last=False)
        self._shapes[key] = _Buffers(self.llm, n, width, max_new)
        return self._shapes[key]

    def _prefill(self, b: _Buffers, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> None:
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
        states = self._forward(b, embeds, positions, columns, attend)
        b.states[:, :width] = states
        first = self._next_token(b, states[:, -1], torch.tensor(width, device=ids.device))
        b.token.copy_(first)
        b.ids[:, width] = first
        b.position.copy_(positions[:, -1] + 1)
        b.column.fill_(width)

    def _capture(self, b: _Buffers) -> None:
        """Record one step as a CUDA graph (after a warm-up step whose effects are put back)."""
        saved = (b.position.clone(), b.column.clone(), b.key_ok.clone(), b.ids.clone(), b.token.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._step(b)
        torch.cuda.current_stream().wait_stream(side)
        for buf, value in zip((b.position, b.column, b.key_ok, b.ids, b.token), saved, strict=True):
            buf.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step(b)
        b.graph = graph
