"""Item ids as dense integer codes, so a source can work on its lists as arrays.

Category popularity merges up to five live lists of 200 items a request: each item's
best score over the lists. As a loop of dictionary updates that was ~1,000 Python steps a
request; with every list's members numbered once per read (`Table`, kept with the list),
it is one compiled call (serving/pipeline/kernels.py). The sources hand the shortlist
their candidates in this numbering too, and it decodes only the few it keeps.

(Session 8 tried the shortlist over numpy arrays: at a pool of ~700 pairs numpy's
per-call overhead ate the gain. Session 12 compiled the loop instead:
docs/serving-speed.md.)

The numbering grows with the items the lists hold (about the catalog). To keep memory
bounded whatever ids arrive, a full `Interner` is replaced by a new, empty one; arrays
coded by the old one say so (`Table.interner`) and are coded again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_CODES", "Codes", "IdOrder", "Interner", "Scratch", "Table", "Values"]

MAX_CODES = 2_000_000
"""Ids one `Interner` numbers before it is replaced."""

Codes = np.ndarray[Any, np.dtype[np.int64]]
Values = np.ndarray[Any, np.dtype[np.float64]]


class IdOrder:
    """Each code's place in the id order of a numbering's ids, for the kernels to put
    equal scores in id order without the ids (serving/pipeline/kernels.py). Sorting the
    ids costs ~2 ms per 10,000, so it is redone only when the numbering has grown by an
    eighth (at least 64 ids) since: codes numbered since are not covered, and the ties
    that hold one are ordered by the caller, by id, as before."""

    __slots__ = ("rank",)

    def __init__(self) -> None:
        self.rank: Codes = np.zeros(0, np.int64)

    def of(self, ids: Sequence[str]) -> Codes:
        covered = len(self.rank)
        if len(ids) - covered >= max(64, covered // 8):
            order = sorted(range(len(ids)), key=ids.__getitem__)
            rank = np.empty(len(ids), np.int64)
            rank[order] = np.arange(len(ids))
            self.rank = rank
        return self.rank


class Scratch:
    """A code → slot map the kernels borrow (serving/pipeline/kernels.py): one entry
    per code of a numbering, all -1 between calls (a kernel resets what it sets). Grown
    with the numbering by half again, so reallocated a few dozen times in its life, not
    once per new id."""

    __slots__ = ("_map",)

    def __init__(self) -> None:
        self._map: Codes = np.full(0, -1, np.int64)

    def covering(self, codes: int) -> Codes:
        """The map, with an entry for each of the first ``codes`` codes at least."""
        if len(self._map) < codes:
            self._map = np.full(codes + codes // 2 + 64, -1, np.int64)
        return self._map


class Interner:
    """Item id ↔ code, dense from 0, in order of first sight."""

    __slots__ = ("_scratch", "code", "ids", "order")

    def __init__(self) -> None:
        self.code: dict[str, int] = {}
        self.ids: list[str] = []
        self.order = IdOrder()
        self._scratch = Scratch()

    @property
    def full(self) -> bool:
        return len(self.ids) >= MAX_CODES

    def encode(self, items: Sequence[str]) -> Codes:
        """The codes of ``items`` (numbering the new ones)."""
        code = self.code
        ids = self.ids
        for item in items:
            if item not in code:
                code[item] = len(ids)
                ids.append(item)
        return np.fromiter(map(code.__getitem__, items), np.int64, len(items))

    def decode(self, codes: Iterable[int]) -> list[str]:
        return list(map(self.ids.__getitem__, codes))

    def scratch(self) -> Codes:
        """The kernels' code → slot map (`Scratch`) for this numbering's codes."""
        return self._scratch.covering(len(self.ids))


@dataclass(frozen=True, slots=True)
class Table:
    """One list's (member, score) rows as arrays, in the list's order."""

    interner: Interner
    codes: Codes
    values: Values

    def __len__(self) -> int:
        return len(self.codes)
