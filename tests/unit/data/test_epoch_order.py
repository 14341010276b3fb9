"""A one-pass training dataset over several epochs (data/pipeline.py EpochOrder): each epoch of positions visits
every row exactly once, in an order seeded by (seed, epoch); a pass that starts at a resumed run's sample count gives
the rows that positions would have given from the start."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from towerlab.data.pipeline import EpochOrder


def same(rows: dict) -> dict:
    return rows


def order(n: int, seed: int, start: int = 0) -> EpochOrder:
    o = EpochOrder(None, n, seed, start, same)
    o._table = pa.table({"image": [bytes([i]) for i in range(n)], "caption": [f"c{i}" for i in range(n)],
                         "label": list(range(n))})
    return o


def test_each_epoch_visits_every_row_once_in_its_own_seeded_order():
    n = 37
    rows = order(n, seed=3).rows(np.arange(4 * n))
    epochs = rows.reshape(4, n)
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert len({tuple(e) for e in epochs}) == 4  # a new order every epoch
    assert (order(n, seed=3).rows(np.arange(4 * n)) == rows).all()  # the seed repeats it
    assert not (order(n, seed=4).rows(np.arange(4 * n)) == rows).all()


def test_a_pass_that_starts_later_gives_the_rows_of_those_positions():
    n, start = 20, 47  # mid-epoch 2
    whole = order(n, seed=1).rows(np.arange(5 * n))
    later = order(n, seed=1, start=start)
    got = later(({"id": np.arange(10)}))
    assert got["label"].tolist() == whole[start:start + 10].tolist()
    # the columns the preprocessor gets are the table's rows at those indices, as numpy
    assert got["caption"].tolist() == [f"c{i}" for i in whole[start:start + 10]]
    assert got["image"].tolist() == [bytes([i]) for i in whole[start:start + 10]]


def test_positions_straddling_an_epoch_boundary():
    n = 10
    o = order(n, seed=0)
    whole = o.rows(np.arange(3 * n))
    batch = np.arange(7, 14)  # the end of epoch 0 and the start of epoch 1
    assert o.rows(batch).tolist() == whole[7:14].tolist()
    assert order(n, seed=0).rows(batch[::-1]).tolist() == whole[7:14][::-1].tolist()  # any order of positions


def test_pickled_without_its_rows():
    import pickle

    o = order(5, seed=0)
    o.rows(np.arange(5))
    state = pickle.loads(pickle.dumps(o)).__dict__
    assert state["_table"] is None and state["_perms"] == {}
