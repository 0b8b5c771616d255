"""A retrain's fine-tune reads what is new: its plan (pure) and a run that starts at a later step."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from charnn.cli.retrain import plan_fine_tune
from charnn.data.layout import LayoutError
from charnn.train.batches import Batches
from charnn.train.collectives import ProcessGroup


@given(st.lists(st.integers(1, 40), min_size=1, max_size=8), st.data(), st.integers(1, 400),
       st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9]))
def test_the_plan_reads_the_new_steps_once_then_replays_older_text(steps, data, max_steps, replay):
    first_new = data.draw(st.integers(0, len(steps)))
    is_new = [i >= first_new for i in range(len(steps))]
    plan = plan_fine_tune(steps, is_new, max_steps, replay)
    new_steps = sum(steps[first_new:])
    total = sum(steps)
    assert plan.new_steps == new_steps and plan.steps == max_steps
    # the steps it reads, as the run's Batches read them: from first_step on, round the split
    read = [(plan.first_step + i) % total for i in range(plan.steps)]
    new_read = [s for s in read[:plan.new_steps_read] if s >= total - new_steps]
    assert len(new_read) == plan.new_steps_read == len(set(new_read))
    # the new steps read end at the split's end: what follows wraps round to step 0, the oldest text
    assert plan.first_step + plan.new_steps_read == total or plan.new_steps_read == 0
    if max_steps * (1 - replay) >= new_steps + 1:
        assert plan.new_steps_read == new_steps  # enough steps: every new step is read
    assert plan.steps - plan.new_steps_read >= round(replay * plan.steps)  # and at least the replay share


def test_one_new_segment_of_40_steps_is_read_whole_then_older_text():
    plan = plan_fine_tune([300, 120, 40], [False, False, True], 300, 0.25)
    assert (plan.steps, plan.first_step, plan.new_steps, plan.new_steps_read) == (300, 420, 40, 40)
    short = plan_fine_tune([300, 120, 40], [False, False, True], 20, 0.25)
    assert (short.steps, short.new_steps_read, short.first_step) == (20, 15, 445)  # the new text's last 15


@dataclass
class FakeReader:
    """SplitReader's interface over an in-memory split: step s of row r holds 10*r + s."""

    steps: int
    rank: int = 0
    rows: range = range(2)
    opened: list = None

    def windows(self, start_step: int = 0):
        self.opened = (self.opened or []) + [start_step]
        for step in range(start_step, self.steps):
            yield step, np.array([[10 * r + step] * 4 for r in self.rows], np.uint8)


def test_a_run_that_starts_at_a_later_step_reads_on_and_wraps_to_step_0():
    reader = FakeReader(steps=5)
    states = torch.ones(1, 2, 3)
    batches = Batches(reader, states, "reset", ProcessGroup(), first_step=3)
    epochs, firsts = [], []
    for step in range(5):
        x, _, epoch = batches.at(step)
        epochs.append(epoch)
        firsts.append(int(x[0, 0]))
    assert firsts == [3, 4, 0, 1, 2] and epochs == [0, 0, 1, 1, 1]
    assert reader.opened == [3, 0]
    assert torch.equal(batches.states, torch.zeros(1, 2, 3))  # the wrap is an epoch start (reset)


def test_a_first_step_outside_the_split_is_one_clear_error():
    with pytest.raises(LayoutError, match="train.first_step=5 is outside the train split's 5 steps"):
        Batches(FakeReader(steps=5), torch.zeros(1, 2, 3), "roll", ProcessGroup(), first_step=5)
