"""Hidden-state carry across steps and epochs (pure; the collective is passed in).

Within an epoch each row's state flows from step s to step s+1 (truncated BPTT: it is
detached, so gradients stop at the batch edge).  At an epoch boundary the seed's sequencer
shifts the rows by one: in epoch e the state slot k reads row (k + e) mod R.  Here every
worker keeps reading its own rows and the *states* move instead, which is the same thing:
the state that ended row k starts row k+1 in the next epoch.  Row 0 starts from zero: the
one wrap, from the end of the last row back to the start of the text, is the only reset.
``epoch_state: reset`` zeroes every row at each epoch start instead.
"""
from __future__ import annotations

import torch


def epoch_of(step: int, steps_per_epoch: int) -> tuple[int, int]:
    """(epoch, step within the epoch) of a global step counted from 0."""
    return divmod(step, steps_per_epoch)


def roll_rows(states: torch.Tensor, previous_last_row: torch.Tensor | None) -> torch.Tensor:
    """States [layers, B, H] of this worker's rows for the next epoch.

    ``previous_last_row`` is the state that ended the last row of the worker before this
    one ([layers, 1, H]), or None for the worker that holds row 0.
    """
    incoming = torch.zeros_like(states[:, :1]) if previous_last_row is None else previous_last_row
    return torch.cat([incoming, states[:, :-1]], dim=1)


def next_epoch_states(states: torch.Tensor, mode: str, rank: int, gather_last_rows) -> torch.Tensor:
    """States at an epoch start; ``gather_last_rows(t)`` returns every rank's ``t`` in rank order."""
    if mode == "reset":
        return torch.zeros_like(states)
    last_rows = gather_last_rows(states[:, -1:].contiguous())
    return roll_rows(states, last_rows[rank - 1] if rank > 0 else None)
