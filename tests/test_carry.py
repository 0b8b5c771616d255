"""Hidden-state carry across steps and epochs, at unit level (no Ray)."""
import torch

from charnn.train.carry import epoch_of, next_epoch_states, roll_rows


def states_of(rows, layers=2, hidden=3):
    """States whose every value names the row they ended: row k -> k + 1."""
    return torch.arange(1, rows + 1, dtype=torch.float32).view(1, rows, 1).expand(layers, rows, hidden).clone()


def split_gather(parts):
    """The all_gather of per-rank last rows, done in one process."""
    return lambda _: [p[:, -1:] for p in parts]


def test_epoch_of_counts_steps_within_epochs():
    assert epoch_of(0, 5) == (0, 0)
    assert epoch_of(7, 5) == (1, 2)


def test_roll_moves_each_rows_state_to_the_next_row_and_zeroes_row_zero():
    rolled = roll_rows(states_of(4), None)
    assert rolled[0, :, 0].tolist() == [0, 1, 2, 3]


def test_roll_across_workers_equals_roll_on_one_worker():
    whole = states_of(6)
    parts = list(whole.split(2, dim=1))
    gathered = split_gather(parts)
    rolled = torch.cat([next_epoch_states(p, "roll", rank, gathered) for rank, p in enumerate(parts)], dim=1)
    assert torch.equal(rolled, roll_rows(whole, None))


def test_slot_k_reads_row_k_plus_e_as_in_the_seed():
    """Follow one state trajectory through epochs: the one that started at row k in epoch 0
    reads row k + e in epoch e, until it falls off the last row."""
    rows = 5
    trajectory_of_row = list(range(rows))  # epoch 0: row r holds trajectory r
    for epoch in range(1, 4):
        ids = torch.tensor(trajectory_of_row, dtype=torch.float32).view(1, rows, 1)
        rolled = roll_rows(ids + 1, None) - 1  # +1/-1 so that "zero" means a fresh state (-1)
        trajectory_of_row = [int(v) for v in rolled[0, :, 0]]
        for row, trajectory in enumerate(trajectory_of_row):
            if trajectory >= 0:
                assert row == (trajectory + epoch) % rows


def test_reset_mode_zeroes_all_states():
    assert not next_epoch_states(states_of(3), "reset", 0, None).any()
