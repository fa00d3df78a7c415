"""The edit head: maps the LLM's eight [IMG] hidden states to the UNet's cross-attention sequence.

Its sizes are read from the checkpoint so the real (4096 -> 512 -> 77x768) and tiny heads are built
by the same code. Parameter names follow the released ``mllm.pt`` (``edit_head.*``).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError

NUM_HEADS = 4  # not recoverable from weight shapes; fixed by the released architecture


class EditHead(nn.Module):
    """MGIE's edit head: a small transformer that turns the eight [IMG] hidden states into UNet conditioning."""

    def __init__(self, llm_width: int, width: int, num_queries: int, out_width: int,
                 encoder_layers: int, decoder_layers: int, ffn_width: int) -> None:
        super().__init__()
        self.llm2hid = nn.Linear(llm_width, width)
        self.query = nn.Parameter(torch.zeros(1, num_queries, width))
        with warnings.catch_warnings():  # "enable_nested_tensor ... norm_first": expected, harmless
            warnings.simplefilter("ignore", UserWarning)
            self.mapper = nn.Transformer(
                d_model=width, nhead=NUM_HEADS, num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers,
                dim_feedforward=ffn_width, dropout=0.0, batch_first=True, norm_first=True,
            )
        self.hid2feat = nn.Linear(width, out_width)

    def forward(self, llm_hidden: torch.Tensor, img_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 8, H) hidden states + the learned [IMG] embeddings -> (B, queries, cross-attention width)."""
        hid = self.llm2hid(llm_hidden + img_embeds)
        hid = self.mapper(hid, self.query.expand(llm_hidden.shape[0], -1, -1))
        return self.hid2feat(hid)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], path: Path) -> EditHead:
        """Build with the sizes the weights imply, then load them strictly."""
        try:
            llm2hid, query, hid2feat = sd["llm2hid.weight"], sd["query"], sd["hid2feat.weight"]
            ffn = sd["mapper.encoder.layers.0.linear1.weight"]
        except KeyError as err:
            raise CheckpointError(f"{path} lacks edit_head.{err.args[0]}; is it MGIE's mllm.pt?") from None
        width, llm_width = llm2hid.shape
        if width % NUM_HEADS:
            raise CheckpointError(f"{path}: edit head width {width} is not divisible by {NUM_HEADS} heads.")

        def count(prefix: str) -> int:
            found = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.layers\.(\d+)\.", k))}
            return max(found) + 1 if found else 0

        head = cls(llm_width=llm_width, width=width, num_queries=query.shape[1], out_width=hid2feat.shape[0],
                   encoder_layers=count("mapper.encoder"), decoder_layers=count("mapper.decoder"),
                   ffn_width=ffn.shape[0])
        try:
            head.load_state_dict(sd, strict=True)
        except RuntimeError as err:
            raise CheckpointError(f"{path}: the edit_head weights do not fit together ({err}).") from err
        return head
