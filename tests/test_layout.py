import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from charnn.data.layout import LayoutError, plan_rows, plan_shards, validation_rows, worker_rows
from charnn.data.sources import assign_splits


@st.composite
def layouts(draw):
    world = draw(st.integers(1, 4))
    rows = world * draw(st.integers(1, 6))
    seq_len = draw(st.integers(1, 12))
    tokens = draw(st.integers(rows * seq_len + 1, rows * seq_len * 8 + 50))
    return tokens, rows, seq_len, world


@given(layouts())
def test_rows_reproduce_the_stream_and_continue_each_other(case):
    tokens, rows, seq_len, _ = case
    stream = np.arange(tokens)
    layout = plan_rows(tokens, rows, seq_len)
    assert layout.row_length % seq_len == 0 and layout.row_length >= seq_len
    assert layout.row_length == ((tokens - 1) // (rows * seq_len)) * seq_len
    row_data = [stream[slice(*layout.row_span(r))] for r in range(rows)]
    assert all(len(r) == layout.row_length + 1 for r in row_data)
    joined = np.concatenate([r[:-1] for r in row_data] + [row_data[-1][-1:]])
    assert np.array_equal(joined, stream[: layout.tokens_used()])
    for r in range(rows - 1):
        assert row_data[r][-1] == row_data[r + 1][0]


@given(layouts())
def test_workers_own_disjoint_rows_that_cover_all(case):
    _, rows, _, world = case
    owned = [set(worker_rows(rows, world, w)) for w in range(world)]
    assert set().union(*owned) == set(range(rows))
    assert sum(len(o) for o in owned) == rows


@given(layouts(), st.integers(1, 500))
@settings(max_examples=200)
def test_each_shard_belongs_to_one_worker_and_shards_cover_every_step(case, shard_tokens):
    tokens, rows, seq_len, world = case
    layout = plan_rows(tokens, rows, seq_len)
    plans = plan_shards(layout, world, shard_tokens)
    for w in range(world):
        mine = [p for p in plans if p.worker == w]
        assert all(p.rows == worker_rows(rows, world, w) for p in mine)
        steps = [s for p in mine for s in p.steps]
        assert steps == list(range(layout.steps))
    assert len({p.name("train") for p in plans}) == len(plans)


def test_too_small_corpus_and_uneven_workers_are_clear_errors():
    with pytest.raises(LayoutError, match="too small for one step"):
        plan_rows(100, 10, 10)
    with pytest.raises(LayoutError, match="each worker needs a row"):
        worker_rows(2, 3, 0)
    assert [worker_rows(10, 3, w) for w in range(3)] == [range(0, 4), range(4, 7), range(7, 10)]
    with pytest.raises(LayoutError, match="validation split"):
        validation_rows(5, 8, 10, 2)
    assert validation_rows(1000, 8, 10, 2) == 8
    assert validation_rows(51, 8, 10, 2) == 4


def test_split_rule_is_stable_when_documents_are_added():
    keys = [f"play-{i}.txt" for i in range(40)]
    before = assign_splits(keys, 0.2)
    after = assign_splits(keys + [f"new-{i}.txt" for i in range(40)], 0.2)
    assert "val" in before.values() and "train" in before.values()
    assert all(after[k] == before[k] for k in keys)


def test_split_rule_never_leaves_validation_empty():
    for n in range(2, 6):
        splits = assign_splits([f"d{i}" for i in range(n)], 0.01)
        assert "val" in splits.values() and "train" in splits.values()
    assert assign_splits(["only.txt"], 0.1) == {"only.txt": "both"}
