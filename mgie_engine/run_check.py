"""The [IMG]-run check: once a row is inside MGIE's run [IMG0]..[IMG7], the rest is checked in one pass.

The guessed tokens are fed at once and each position's greedy pick compared with the next guess
(``_verify``), which reads the weights once instead of six times. Only picks the model itself makes are
kept (``keep_checked``), so the tokens are generate's whether or not the guess holds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from . import device_turns
from .decode_buffers import DecodeBuffers

log = logging.getLogger(__name__)

IsDone = Callable[[list[int]], bool]


class RunCheck:
    """GreedyDecoder's run check (a mixin: it runs the decoder's own layers on its buffers)."""

    def _verify(self, b: DecodeBuffers) -> None:
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

    def _accept(self, b: DecodeBuffers, advance: int) -> None:
        """Keep the first ``advance`` picks of the last check, as that many steps would have left things."""
        c = int(b.column)
        b.ids[:, c + 1:c + 1 + advance] = b.picks[:, :advance]
        b.key_ok[:, c + advance:c + b.checked] = False
        b.token.copy_(b.picks[:, advance - 1])
        b.position.add_(advance)
        b.column.add_(advance)

    def _queue_check(self, b: DecodeBuffers, guesses: list[list[int]]) -> bool:
        """Queue ``_verify`` with these guesses (recorded as a graph on CUDA); False if it cannot run."""
        b.guesses.copy_(torch.tensor(guesses, dtype=torch.long))
        saved = b.key_ok.clone()
        try:
            if self.graphs and (b.verify_graph is not None or device_turns.may_record(b.ids.device)):
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


def run_guesses(rows: list[list[int]], done: list[bool], run: Sequence[int], checked: int) -> list[list[int]] | None:
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


def keep_checked(rows: list[list[int]], done: list[bool], guesses: list[list[int]], picks: list[list[int]],
                  is_done: IsDone) -> int:
    """Add each unfinished row's picks that hold (the first always does; the next only while the guess fed
    there equals the pick before it). Rows that stay unfinished all move by the same count, the least any
    of them holds, since the cache's columns are shared; that count is returned (0 when all are done)."""
    kept_by_row: dict[int, tuple[list[int], int | None]] = {}
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
        kept_by_row[r] = (good, ends)
    open_lengths = [len(good) for good, ends in kept_by_row.values() if ends is None]
    advance = min(open_lengths) if open_lengths else 0
    for r, (good, ends) in kept_by_row.items():
        rows[r].extend(good[:ends] if ends is not None else good[:advance])
        done[r] = ends is not None
    return advance
