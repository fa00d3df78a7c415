"""What one (batch, prompt width) shape decodes in: KV cache, token history, states and its CUDA graphs."""

from __future__ import annotations

import torch


class DecodeBuffers:
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
