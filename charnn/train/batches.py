"""A rank's batches, step by step through its own rows, with the hidden state each row carries.

Within an epoch a row's state flows from one window to the next (truncated BPTT: the step
detaches it); at an epoch's start the states move one row on, or reset, as ``train.epoch_state``
says (see ``charnn.train.carry``).  A run may start reading at a later step of the split
(``train.first_step``): it starts there from zero states, as at a document's start."""
from __future__ import annotations

import torch

from charnn.data.layout import LayoutError
from charnn.data.reader import SplitReader
from charnn.train.carry import epoch_of, next_epoch_states
from charnn.train.collectives import Collectives
from charnn.train.step import to_batch


class Batches:
    def __init__(self, reader: SplitReader, states: torch.Tensor, epoch_state: str, group: Collectives,
                 first_step: int = 0):
        """``group``: the ranks whose rows pass their states on at an epoch start (on ``group.device``);
        ``first_step``: the split's step that the run's step 0 reads (``train.first_step``)."""
        if not 0 <= first_step < reader.steps:
            raise LayoutError(f"train.first_step={first_step} is outside the train split's {reader.steps} steps; "
                              f"give a step below {reader.steps}")
        self.reader, self.states, self.epoch_state, self.group = reader, states, epoch_state, group
        self.first_step, self.windows = first_step, None

    def at(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Inputs and targets [B, T] of the run's step ``step`` (counted from 0), and its epoch."""
        position = step + self.first_step
        epoch, in_epoch = epoch_of(position, self.reader.steps)
        if self.windows is None or in_epoch == 0:
            if in_epoch == 0 and position > 0:
                self.states = next_epoch_states(self.states, self.epoch_state, self.reader.rank, self.group.all_gather)
            self.windows = self.reader.windows(in_epoch)
        got, window = next(self.windows)
        if got != in_epoch:
            raise RuntimeError(f"rank {self.reader.rank} read the window of step {got}, not {in_epoch}")
        x, y = to_batch(window, self.group.device)
        return x, y, epoch
