"""A rank's batches, step by step through its own rows, with the hidden state each row carries.

Within an epoch a row's state flows from one window to the next (truncated BPTT: the step
detaches it); at an epoch's start the states move one row on, or reset, as ``train.epoch_state``
says (see ``charnn.train.carry``)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from charnn.data.reader import SplitReader
from charnn.train.carry import epoch_of, next_epoch_states
from charnn.train.step import distributed, to_batch


def gather_last_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``t`` in rank order (a collective)."""
    if not distributed():
        return [t]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return out


class Batches:
    def __init__(self, reader: SplitReader, states: torch.Tensor, epoch_state: str, device: torch.device):
        self.reader, self.states, self.epoch_state, self.device = reader, states, epoch_state, device
        self.windows = None

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Inputs and targets [B, T] of global step ``step`` (counted from 0), and its epoch."""
        epoch, in_epoch = epoch_of(step, self.reader.steps)
        if self.windows is None or in_epoch == 0:
            if in_epoch == 0 and step > 0:
                self.states = next_epoch_states(self.states, self.epoch_state, self.reader.rank, gather_last_rows)
            self.windows = self.reader.windows(in_epoch)
        got, window = next(self.windows)
        if got != in_epoch:
            raise RuntimeError(f"rank {self.reader.rank} read the window of step {got}, not {in_epoch}")
        x, y = to_batch(window, self.device)
        return x, y, epoch
