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

A trained MGIE ends its answer with the run [IMG0]..[IMG7]. Once a row is inside that run, the rest
is checked in one pass (``_verify``: the guessed tokens fed at once, each position's greedy pick
compared with the next guess), which reads the weights once instead of six times. Only picks that
the model itself makes are kept, so the tokens are generate's whether or not the guess holds.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .errors import JobCancelledError

log = logging.getLogger(__name__)

IsDone = Callable[[list[int]], bool]
# Precision casts kept as eager rounds them, so the tokens stay those of the stock model.
LAYER_COMPILE_OPTIONS = {"emulate_precision_casts": True}
# Prefills of up to this many prompt tokens (batch x width) are replayed as CUDA graphs. Eager, a batch-1
# prefill's ~1300 kernels took 71 ms of wall time for 13.6 ms of GPU work on the bench host (H100 beside
# a 2.1 GHz Xeon); beyond ~8k tokens the GPU's own work outlasts the launches, and a recording would only
# hold memory (its activations: ~0.7 GB at 8k tokens).
PREFILL_GRAPH_TOKENS = 8192


class _Buffers:
    """What one (batch, prompt width) shape decodes in: KV cache, tokens, states, its graph."""

    def __init__(self, llm, n: int, width: int, max_new: int, checked: int = 0) -> None:
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
        self.prefills = 0  # prefills run in these buffers; the second one records the prefill's graph
        self.prefill_graph: torch.cuda.CUDAGraph | None = None
        self.prompt: tuple[torch.Tensor, ...] = ()  # the prefill graph's inputs: ids, embeds, mask
        # The run check: a real token plus ``checked - 1`` guesses fed in one pass, a pick per position.
        self.checked = checked
        self.guesses = torch.zeros(n, max(checked - 1, 0), device=p.device, dtype=torch.long)
        self.picks = torch.zeros(n, checked, device=p.device, dtype=torch.long)
        self.offsets = torch.arange(checked, device=p.device)
        self.columns = torch.arange(self.length, device=p.device)
        self.verify_graph: torch.cuda.CUDAGraph | None = None


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
        return self._pick(b, self.llm.lm_head(state).float(), count)

    def _pick(self, b: _Buffers, scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
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

    def _verify(self, b: _Buffers) -> None:
        """Feed ids[:, column] and the guesses after it in one pass; ``picks[:, j]`` is the greedy token
        after position column + j given everything before it. The column and positions stay: the host
        decides what holds and ``_accept`` moves them past it."""
        cols = b.column + b.offsets
        b.ids.index_copy_(1, cols[1:], b.guesses)
        tokens = b.ids.index_select(1, cols)
        b.key_ok.index_fill_(1, cols, True)
        mask = b.key_ok[:, None, None, :] & (b.columns[None, :] <= cols[:, None])[None, None]
        positions = b.position[:, None] + b.offsets[None, :]
        state = self._forward(b, self.model.embed_tokens(tokens), positions, cols, mask, self._check_layer)
        b.states.index_copy_(1, cols, state)
        scores = self.llm.lm_head(state).float()
        for j in range(b.checked):
            b.picks[:, j] = self._pick(b, scores[:, j], b.column + j + 1)

    def _accept(self, b: _Buffers, advance: int) -> None:
        """Keep the first ``advance`` picks of the last check, as that many steps would have left things."""
        c = int(b.column)
        b.ids[:, c + 1:c + 1 + advance] = b.picks[:, :advance]
        b.key_ok[:, c + advance:c + b.checked] = False
        b.token.copy_(b.picks[:, advance - 1])
        b.position.add_(advance)
        b.column.add_(advance)

    # -- one batch ----------------------------------------------------------------------------------
    def decode(self, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor, max_new: int, is_done: IsDone,
               cancel=None, run: Sequence[int] = ()) -> tuple[list[list[int]], torch.Tensor]:
        """New tokens per row (each up to where ``is_done`` said stop) and the last-layer states of
        every position (n, width + max_new, hidden; prompt columns left-padded as given). ``run``: tokens
        that, once a row writes one, follow in order (MGIE's [IMG0]..[IMG7]); they are checked in one pass."""
        n, width = ids.shape
        checked = len(run) - 2 if len(run) >= 4 else 0
        self.pack()
        b = self._buffers(n, width, max_new, checked)
        with torch.profiler.record_function("llm.prefill"):
            if self._prefill_graphs and self.graphs and n * width <= PREFILL_GRAPH_TOKENS:
                self._prefill_replayed(b, ids, embeds, mask)
            else:
                self._prefill(b, ids, embeds, mask)
        use_graph = self.graphs and max_new > 1
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
        rows: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        cuda = b.token.device.type == "cuda"
        host = torch.empty(max_new, n, dtype=torch.long, pin_memory=cuda)
        events: dict[int, torch.cuda.Event] = {}

        def fetch(k: int) -> None:
            host[k].copy_(b.token, non_blocking=cuda)
            if cuda:
                events[k] = torch.cuda.Event()
                events[k].record()

        def take(k: int) -> None:
            if cuda:
                events[k].synchronize()
            for r, token in enumerate(host[k].tolist()):
                if not done[r]:
                    rows[r].append(token)
                    done[r] = is_done(rows[r])

        fetch(0)
        queued, taken = 1, 0  # tokens asked of the GPU, tokens read back
        checks_left = 2  # run checks this decode may try; one that fails costs a pass
        while True:
            if queued < max_new:  # queue the next token before reading the last: the GPU never waits for Python
                if use_graph:
                    b.graph.replay()
                else:
                    self._step(b)
                fetch(queued)
                queued += 1
            if taken == queued:
                break
            take(taken)
            taken += 1
            if all(done):
                break
            if cancel is not None and cancel.is_set():
                raise JobCancelledError("The edit was cancelled.")
            guesses = _run_guesses(rows, done, run, checked) \
                if checks_left and self._checks and queued == taken + 1 and queued + checked <= max_new else None
            if guesses is None or not self._queue_check(b, guesses):
                continue
            checks_left -= 1
            take(taken)  # the token in flight, which the check's first pick follows
            taken += 1
            picks = b.picks.tolist()
            if all(done):
                break
            advance = _keep_checked(rows, done, guesses, picks, is_done)
            if all(done):
                break
            self._accept(b, advance)
            queued = taken = taken + advance
        if cuda:
            torch.cuda.current_stream().synchronize()
        return rows, b.states

    def _queue_check(self, b: _Buffers, guesses: list[list[int]]) -> bool:
        """Queue ``_verify`` with these guesses (recorded as a graph on CUDA); False if it cannot run."""
        b.guesses.copy_(torch.tensor(guesses, dtype=torch.long))
        saved = b.key_ok.clone()
        try:
            if self.graphs:
                if b.verify_graph is None:
                    self._capture(b, check=True)
                b.verify_graph.replay()
            else:
                self._verify(b)
            return True
        except Exception:  # never worse than token by token: log once and stop checking runs
            log.exception("could not compile or record the run check; decoding token by token")
            self._checks = False
            b.key_ok.copy_(saved)
            return False

    def _buffers(self, n: int, width: int, max_new: int, checked: int = 0) -> _Buffers:
        key = (n, width, max_new, checked)
        if key in self._shapes:
            self._shapes.move_to_end(key)
            return self._shapes[key]
        while len(self._shapes) >= self._keep:
            self._shapes.popitem(last=False)
        self._shapes[key] = _Buffers(self.llm, n, width, max_new, checked)
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
        first = self._next_token(b, states[:, -1], b.columns[width])  # no host-to-device copy: recordable
        b.token.copy_(first)
        b.ids[:, width] = first
        b.position.copy_(positions[:, -1] + 1)
        b.column.fill_(width)

    def _prefill_replayed(self, b: _Buffers, ids: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> None:
        """``_prefill`` as a CUDA graph replay, the same kernels as eager. A shape's first prefill runs
        eagerly; its second is the recording's warm-up run and records the graph (so a shape seen once, as
        under offload where buffers go at every stage change, never pays for a recording); later ones replay."""
        b.prefills += 1
        if b.prefill_graph is None and b.prefills < 2:
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
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
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

    def _capture(self, b: _Buffers, check: bool = False) -> None:
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
        with torch.cuda.graph(graph):
            work(b)
        if check:
            b.verify_graph = graph
        else:
            b.graph = graph


def _run_guesses(rows: list[list[int]], done: list[bool], run: Sequence[int], checked: int) -> list[list[int]] | None:
    """Per row, the ``checked - 1`` tokens the run says come after the one in flight; None unless every
    unfinished row's last token is inside the run and at least one has guesses left to check."""
    if not checked:
        return None
    filler = run[-1]
    guesses, useful = [], False
    for row, finished in zip(rows, done, strict=True):
        if finished:
            guesses.append([filler] * (checked - 1))
            continue
        if not row or row[-1] not in run[:-1]:
            return None
        at = list(run).index(row[-1])
        rest = list(run[at + 2:at + 1 + checked])
        useful = useful or bool(rest)
        guesses.append(rest + [filler] * (checked - 1 - len(rest)))
    return guesses if useful else None


def _keep_checked(rows: list[list[int]], done: list[bool], guesses: list[list[int]], picks: list[list[int]],
                  is_done: IsDone) -> int:
    """Add each unfinished row's picks that hold (the first always does; the next only while the guess fed
    there equals the pick before it). Rows that stay unfinished all move by the same count, the least any
    of them holds, since the cache's columns are shared; that count is returned (0 when all are done)."""
    held: dict[int, tuple[list[int], int | None]] = {}
    for r, row in enumerate(rows):
        if done[r]:
            continue
        good = [picks[r][0]]
        for j in range(1, len(picks[r])):
            if guesses[r][j - 1] != picks[r][j - 1]:
                break
            good.append(picks[r][j])
        trial, ends = list(row), None
        for i, token in enumerate(good):
            trial.append(token)
            if is_done(trial):
                ends = i + 1
                break
        held[r] = (good, ends)
    going = [len(good) for good, ends in held.values() if ends is None]
    advance = min(going) if going else 0
    for r, (good, ends) in held.items():
        rows[r].extend(good[:ends] if ends is not None else good[:advance])
        done[r] = ends is not None
    return advance


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
