"""Greedy decoding of the MGIE prompt, one CUDA graph replay per token.

transformers' ``generate`` spends about half of each 7B decode step in Python between tokens (its
loop, a no-repeat-n-gram rule that reads the tokens back to the CPU, a device sync per token). Here
everything a step needs stays on the GPU (KV cache, token history, positions, attention mask), so a
step is one graph replay and the CPU looks at each token one step behind the GPU, only to decide when
to stop. The arithmetic is ``generate(do_sample=False, no_repeat_ngram_size=N)`` on a left-padded
batch, layer by layer with the model's own weights; the parity test holds it to the stock call.

A 7B decode step reads ~13 GB of weights, ~4 ms on an H100; in eager mode a layer is also ~30 small
kernels (norms, rotary, cache writes, residuals), ~1000 per token at a few microseconds each. So with
MGIE_COMPILE on CUDA one layer is a compiled function (norms, rotary and residuals fused around cuBLAS
matmuls; H100: 5.8 ms of kernels per token, the LLM stage 0.44 -> 0.35 s). In any case
each layer's q/k/v and gate/up weights are packed into one matrix apiece: the modules' own
parameters become views of it, so nothing is stored twice and stock ``forward`` still works.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
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

    def __init__(self, llm, ngram: int, graphs: bool, keep_shapes: int = 2, compile_layers: bool | None = None) -> None:
        self.llm, self.ngram, self.graphs = llm, ngram, graphs
        self.model = llm.model
        self._shapes: OrderedDict[tuple[int, int, int], _Buffers] = OrderedDict()
        self._keep = keep_shapes
        self._weights: list[tuple] = []
        self._fingerprint: tuple[int, ...] = ()
        self._layer = _layer_function(llm)
        compile_layers = graphs if compile_layers is None else compile_layers
        # Compiled for the one-token step only; the prefill's width changes per batch and is GEMM bound.
        # Precision casts are kept as eager rounds them, so the tokens stay those of the stock model.
        self._step_layer = torch.compile(self._layer, fullgraph=True, options={"emulate_precision_casts": True}) \
            if compile_layers else self._layer

    def forget_graphs(self) -> None:
        """Drop recorded graphs, buffers and packed weights (the weights they read have moved)."""
        self._shapes.clear()
        self._weights, self._fingerprint = [], ()

    # -- the model, layer by layer ----------------------------------------------------------------
    def pack(self) -> None:
        """Point each layer's q/k/v and gate/up parameters into one matrix apiece (once per placement)."""
        params = [p for layer in self.model.layers for p in _layer_parameters(layer)]
        fingerprint = tuple(p.data_ptr() for p in params)
        if fingerprint == self._fingerprint:
            return
        self._shapes.clear()  # recorded graphs read the old addresses
        with torch.inference_mode(False), torch.no_grad():
            self._weights = [_packed_weights(layer) for layer in self.model.layers]
        self._fingerprint = tuple(p.data_ptr() for layer in self.model.layers for p in _layer_parameters(layer))

    def _forward(self, b: _Buffers, x: torch.Tensor, positions: torch.Tensor, columns: torch.Tensor,
                 mask: torch.Tensor, layer_fn: Callable) -> torch.Tensor:
        """Run x (n, q, hidden) through the model writing K/V at ``columns``; returns last-layer states."""
        cos, sin = self.model.rotary_emb(x, positions)
        for i, weights in enumerate(self._weights):
            x = layer_fn(x, cos, sin, *weights, b.keys[i], b.values[i], columns, mask)
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
        state = self._forward(b, self.model.embed_tokens(token), b.position.view(b.n, 1), col, mask, self._step_layer)
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
        self.pack()
        b = self._buffers(n, width, max_new)
        self._prefill(b, ids, embeds, mask)
        use_graph = self.graphs and max_new > 1
        if use_graph and b.graph is None:
            try:
                self._capture(b)
            except Exception:  # never worse than eager: log once, decode without graphs from now on
                log.exception("could not compile or capture the decode step; decoding eagerly")
                self.graphs = use_graph = False
                self._step_layer = self._layer
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
        states = self._forward(b, embeds, positions, columns, attend, self._layer)
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


# -- one decoder layer as a function of tensors ------------------------------------------------------
def _layer_parameters(layer: nn.Module) -> list[torch.Tensor]:
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return [p for m in linears for p in (m.weight, m.bias) if p is not None]


def _joined(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """The tensor that ``parts`` are consecutive row blocks of, if they are (no copy); else None."""
    first = parts[0]
    offset = first.storage_offset()
    for t in parts:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset or t.shape[1:] != first.shape[1:]):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in parts)
    return first.detach().new_empty(0).set_(first.untyped_storage(), first.storage_offset(),
                                            (rows, *first.shape[1:]), first.stride())


def _pack_into_one(linears: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several linears fed the same input; theirs become views of it.
    Already packed (or moved as one block by ``offload.StageResidency``): just the view."""
    has_bias = linears[0].bias is not None
    weight = _joined([m.weight for m in linears])
    bias = _joined([m.bias for m in linears]) if has_bias else None
    if weight is not None and (bias is not None or not has_bias):
        return weight, bias
    weight = torch.cat([m.weight for m in linears])
    bias = torch.cat([m.bias for m in linears]) if has_bias else None
    row = 0
    for m in linears:
        rows = m.weight.shape[0]
        m.weight.data = weight[row:row + rows]
        if has_bias:
            m.bias.data = bias[row:row + rows]
        row += rows
    return weight, bias


def _packed_weights(layer: nn.Module) -> tuple:
    """The tensors ``_layer_function`` takes for one layer, after packing q/k/v and gate/up."""
    attn, mlp = layer.self_attn, layer.mlp
    wqkv, bqkv = _pack_into_one((attn.q_proj, attn.k_proj, attn.v_proj))
    wgu, bgu = _pack_into_one((mlp.gate_proj, mlp.up_proj))
    return (layer.input_layernorm.weight, wqkv, bqkv, attn.o_proj.weight, attn.o_proj.bias,
            layer.post_attention_layernorm.weight, wgu, bgu, mlp.down_proj.weight, mlp.down_proj.bias)


def _layer_function(llm) -> Callable:
    """A Llama decoder layer (LlamaDecoderLayer's arithmetic, same rounding) over explicit tensors,
    writing this call's keys and values into the layer's cache at ``columns``."""
    cfg, first = llm.config, llm.model.layers[0]
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    groups, scaling = heads // kv_heads, first.self_attn.scaling
    eps, act = first.input_layernorm.variance_epsilon, first.mlp.act_fn
    split_qkv = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    inter = cfg.intermediate_size

    def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    def layer(x, cos, sin, ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wdown, bdown, keys, values, columns, mask):
        n, q = x.shape[:2]
        query, key, value = F.linear(rms_norm(x, ln1), wqkv, bqkv).split(split_qkv, dim=-1)
        query = query.view(n, q, heads, head_dim).transpose(1, 2)
        key = key.view(n, q, kv_heads, head_dim).transpose(1, 2)
        value = value.view(n, q, kv_heads, head_dim).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        keys.index_copy_(2, columns, key)
        values.index_copy_(2, columns, value)
        all_keys, all_values = keys, values
        if groups > 1:
            all_keys = keys.repeat_interleave(groups, dim=1)
            all_values = values.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(query, all_keys, all_values, attn_mask=mask, scale=scaling)
        x = x + F.linear(out.transpose(1, 2).reshape(n, q, -1), wo, bo)
        gate, up = F.linear(rms_norm(x, ln2), wgu, bgu).split([inter, inter], dim=-1)
        return x + F.linear(act(gate) * up, wdown, bdown)

    return layer
