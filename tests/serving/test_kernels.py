"""The compiled kernels' tie order (serving/pipeline/kernels.py): equal scores come out
in id order whether `IdOrder` covers their codes (ordered in the kernel) or not (left to
the caller), so the order never depends on when the id order was last rebuilt."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.pipeline.candidates import best
from serving.pipeline.codes import IdOrder
from serving.pipeline.kernels import best_entries, neighbour_sums, top_rows

# ids whose order is not the codes' order (so ordering by code would be caught)
IDS = [f"item-{(n * 37) % 101:03d}-{chr(97 + n % 26)}" for n in range(100)]
pairs = st.lists(
    st.tuples(st.integers(0, 99), st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.0 / 3.0, 2.0, -0.5])),
    max_size=300,
)


def settled(order: list[int], runs: list[list[int]], key: list[str]) -> list[int]:
    """The caller's half: the runs the kernel left, in id order."""
    for start, stop in runs:
        order[start:stop] = sorted(order[start:stop], key=key.__getitem__)
    return order


def partial_rank(covered: int) -> np.ndarray:
    """An `IdOrder` built when only the first ``covered`` codes existed."""
    order = IdOrder()
    return order.of(IDS[:covered]) if covered >= 64 else order.rank


@settings(max_examples=300, deadline=None)
@given(pairs=pairs, n=st.integers(1, 60), covered=st.sampled_from([0, 64, 80, 100]))
def test_neighbour_sums_order_ties_by_id(
    pairs: list[tuple[int, float]], n: int, covered: int
) -> None:
    code = np.array([c for c, _ in pairs], dtype=np.int32)
    contribution = np.array([w for _, w in pairs], dtype=np.float64)
    slot = np.full(len(IDS), -1, np.int64)
    items, sums, runs = neighbour_sums(code, contribution, slot, n, True, partial_rank(covered))
    assert (slot == -1).all()  # left as found
    scores: dict[str, float] = {}
    for c, w in pairs:
        scores[IDS[c]] = scores.get(IDS[c], 0.0) + w
    expected = best({i: s for i, s in scores.items() if s > 0}, n)
    # (n or fewer: all of them in the order of their first contribution, as `best` keeps
    # a dict it need not cut)
    got = [IDS[c] for c in settled(items.tolist(), runs.tolist(), IDS)][:n]
    assert got == list(expected)
    by_item = dict(zip([IDS[c] for c in items.tolist()], sums.tolist(), strict=True))
    assert all(by_item[i] == expected[i] for i in got)


@settings(max_examples=300, deadline=None)
@given(pairs=pairs, n=st.integers(1, 60), covered=st.sampled_from([0, 64, 80, 100]))
def test_best_entries_order_ties_by_id(
    pairs: list[tuple[int, float]], n: int, covered: int
) -> None:
    codes = np.array([c for c, _ in pairs], dtype=np.int64)
    values = np.array([w for _, w in pairs], dtype=np.float64)
    slot = np.full(len(IDS), -1, np.int64)
    chosen, runs = best_entries(codes, values, slot, n, True, partial_rank(covered))
    assert (slot == -1).all()
    best_of: dict[str, float] = {}
    for c, w in pairs:
        if IDS[c] not in best_of or w > best_of[IDS[c]]:
            best_of[IDS[c]] = w
    expected = best(best_of, n)
    key = [IDS[c] for c in codes.tolist()]  # an entry's id
    got = [key[e] for e in settled(chosen.tolist(), runs.tolist(), key)][:n]
    assert got == list(expected)
    assert [values[e] for e in chosen.tolist()[:n]] == list(expected.values())


@settings(max_examples=300, deadline=None)
@given(
    scored=st.lists(
        st.tuples(
            st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.0 / 3.0, 2.0, -0.5]),
            st.sampled_from([0.0, 1.0, 3.0]),
        ),
        max_size=100,
    ),
    n=st.integers(1, 60),
    covered=st.sampled_from([0, 64, 80, 100]),
)
def test_top_rows_cut_by_key_then_id(
    scored: list[tuple[float, float]], n: int, covered: int
) -> None:
    """The shortlist's cut keeps the rows `_top` keeps (key, then, id), whenever it says
    it decided; it declines only for a tie across the cut holding an uncovered code."""
    from serving.pipeline.shortlist import _top

    codes = np.arange(len(scored), dtype=np.int64)[::-1].copy()  # row r holds code m-1-r
    key = np.array([k for k, _ in scored])
    then = np.array([t for _, t in scored])
    rows = np.arange(len(scored), dtype=np.int64)
    chosen, decided = top_rows(rows, key, then, codes, partial_rank(covered), n)
    ids = [IDS[c] for c in codes.tolist()]
    expected = _top(
        dict(zip(ids, key.tolist(), strict=True)), dict(zip(ids, then.tolist(), strict=True)), n
    )
    if decided:
        assert sorted(ids[r] for r in chosen.tolist()) == sorted(expected)
    else:
        assert covered < 100
        assert len(scored) > n
