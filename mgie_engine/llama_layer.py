"""One Llama decoder layer as a function of tensors, and the packed weights it reads.

This re-implements ``transformers.models.llama.modeling_llama.LlamaDecoderLayer`` (RMSNorm, rotary
embeddings via transformers' own ``apply_rotary_pos_emb``, grouped-query SDPA attention, SiLU MLP) with
the same rounding, so that decoding.py can compile and graph it with its own KV cache. It was checked
(the parity tests: tokens and hidden states equal to stock ``generate``) against the transformers
versions in ``CHECKED_TRANSFORMERS``; tests/engine/test_decoding.py fails on any other, since a new release may
change the layer's arithmetic (norm placement, rotary layout, attention scaling) without an error here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

# (major, minor) of the transformers releases this layer was checked against: 5.17 on the GPU bench host
# (bench/results), 5.24 and 5.25 in the CPU test runs. Between them nothing in LlamaDecoderLayer's arithmetic changed
# (5.25's modeling_llama.py is 5.24's, byte for byte). pyproject.toml keeps installs inside this range.
CHECKED_TRANSFORMERS = ((5, 17), (5, 25))


def transformers_checked(version: str) -> bool:
    """Whether transformers ``version`` lies in the checked range (inclusive, by major and minor)."""
    major, minor = (int(part) for part in version.split(".")[:2])
    return CHECKED_TRANSFORMERS[0] <= (major, minor) <= CHECKED_TRANSFORMERS[-1]


def layer_parameters(layer: nn.Module) -> list[torch.Tensor]:
    """The layer's linear weights and biases (their addresses tell whether the packing still holds)."""
    attn, mlp = layer.self_attn, layer.mlp
    linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return [p for m in linears for p in (m.weight, m.bias) if p is not None]


def _rows_view(parts: list[torch.Tensor]) -> torch.Tensor | None:
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
    weight = _rows_view([m.weight for m in linears])
    bias = _rows_view([m.bias for m in linears]) if has_bias else None
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


def packed_weights(layer: nn.Module) -> tuple:
    """The tensors ``layer_function`` takes for one layer, after packing q/k/v and gate/up."""
    attn, mlp = layer.self_attn, layer.mlp
    wqkv, bqkv = _pack_into_one((attn.q_proj, attn.k_proj, attn.v_proj))
    wgu, bgu = _pack_into_one((mlp.gate_proj, mlp.up_proj))
    return (layer.input_layernorm.weight, wqkv, bqkv, attn.o_proj.weight, attn.o_proj.bias,
            layer.post_attention_layernorm.weight, wgu, bgu, mlp.down_proj.weight, mlp.down_proj.bias)


def layer_function(llm) -> Callable:
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
