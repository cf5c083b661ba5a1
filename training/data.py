"""The training input: `InteractionLog`, a columnar log of interactions, and its loaders.

Every loader returns the same container: numpy arrays of int codes (users, items, sessions,
event types) plus timestamps and weights, one row per interaction, with the id maps that
turn codes back into strings. Models and the evaluation harness only ever see codes.

Loaders:

- `load_personalize_csv` / `load_items_csv` / `load_users_csv`: Amazon Personalize
  dataset CSVs (``USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE, EVENT_VALUE``; items; users),
  parsed with `streams.schema.Interaction`, `Item` and `User`;
- `load_movielens` (``ratings.csv``, optionally ``movies.csv`` for genres),
  `load_taobao` (UserBehavior: no header, ``user,item,category,behavior,timestamp``),
  `load_yoochoose` (tab-separated ``SessionId ItemId Time`` with a header);
- `training.archive.load_archive` for the S3 archive of raw events.

Sessions: where the source has none (MovieLens, Taobao, Personalize CSVs), a user's
session is cut after ``session_gap_s`` (30 minutes by default) of inactivity, the usual
web-analytics rule.
"""

from __future__ import annotations

import csv
import logging
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from recstream.errors import RecstreamError
from recstream.settings import DEFAULT_EVENT_WEIGHTS
from streams.schema import Event, Interaction, Item, User

__all__ = [
    "DEFAULT_SESSION_GAP_S",
    "TAOBAO_BEHAVIOURS",
    "DataError",
    "InteractionLog",
    "LogBuilder",
    "load_items_csv",
    "load_movielens",
    "load_personalize_csv",
    "load_taobao",
    "load_users_csv",
    "load_yoochoose",
]

log = logging.getLogger(__name__)

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float64]

DEFAULT_SESSION_GAP_S: Final = 1800.0
DEFAULT_WEIGHTS: Final[Mapping[str, float]] = DEFAULT_EVENT_WEIGHTS
"""Used when no `Settings.event_weights` is passed: the same defaults as Settings."""

TAOBAO_BEHAVIOURS: Final[Mapping[str, str]] = {
    "pv": "view",
    "cart": "add_to_cart",
    "fav": "like",
    "buy": "purchase",
}
"""Taobao's behaviour codes → recstream event types (a favourite counts like a like)."""


PERSONALIZE_HEADER: Final = "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE"


class DataError(RecstreamError):
    """An input file or archive cannot be read as the format it should be in."""

    code = "data_error"


class _Vocab:
    """String id → dense int code, in order of first appearance."""

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        for value in ids:
            self.code(value)

    def code(self, value: str) -> int:
        code = self.index.get(value)
        if code is None:
            code = self.index[value] = len(self.ids)
            self.ids.append(value)
        return code


def _ids_array(ids: Sequence[str]) -> npt.NDArray[np.object_]:
    out = np.empty(len(ids), dtype=object)
    out[:] = list(ids)
    return out


@dataclass(frozen=True, eq=False)
class InteractionLog:
    """Interactions as parallel numpy columns, in the order they were loaded.

    ``users[i]``, ``items[i]``, ``sessions[i]`` and ``event_types[i]`` are codes into
    ``user_ids``, ``item_ids``, ``session_ids`` and ``event_type_names``. ``weights[i]`` is
    the event type's weight (times the event value where a loader says so). ``row`` is the
    original row number, the tie-break for equal timestamps. Subsets made with `select`
    keep the id maps, so a model fitted on a training part scores items by the same codes
    as the held-out part uses.
    """

    users: IntArray
    items: IntArray
    sessions: IntArray
    timestamps: FloatArray
    event_types: IntArray
    weights: npt.NDArray[np.float32]
    row: npt.NDArray[np.int64]
    user_ids: npt.NDArray[np.object_]
    item_ids: npt.NDArray[np.object_]
    session_ids: npt.NDArray[np.object_]
    event_type_names: tuple[str, ...]
    item_categories: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))
    """Per item code: its (first) category code, or -1; empty when the source has none."""
    category_ids: npt.NDArray[np.object_] = field(default_factory=lambda: np.zeros(0, dtype=object))
    source: str = ""

    # --- shape -----------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.items.shape[0])

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_sessions(self) -> int:
        return len(self.session_ids)

    @property
    def start(self) -> float | None:
        return float(self.timestamps.min()) if len(self) else None

    @property
    def end(self) -> float | None:
        return float(self.timestamps.max()) if len(self) else None

    def item_index(self) -> dict[str, int]:
        return {str(item): code for code, item in enumerate(self.item_ids)}

    def user_index(self) -> dict[str, int]:
        return {str(user): code for code, user in enumerate(self.user_ids)}

    def category_of(self) -> IntArray:
        """Per item: category code or -1 (all -1 when the source has no categories)."""
        if self.item_categories.shape[0] == self.n_items:
            return self.item_categories
        out = np.full(self.n_items, -1, dtype=np.int32)
        out[: self.item_categories.shape[0]] = self.item_categories
        return out

    # --- subsets and order -------------------------------------------------------------
    def select(self, mask: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> InteractionLog:
        """The rows picked by a boolean mask or an index array; id maps are kept."""
        return replace(
            self,
            users=self.users[mask],
            items=self.items[mask],
            sessions=self.sessions[mask],
            timestamps=self.timestamps[mask],
            event_types=self.event_types[mask],
            weights=self.weights[mask],
            row=self.row[mask],
        )

    def time_order(self) -> npt.NDArray[np.int64]:
        """Row indices sorted by timestamp, ties by original row."""
        return np.lexsort((self.row, self.timestamps)).astype(np.int64)

    def sorted(self) -> InteractionLog:
        return self.select(self.time_order())

    def between(self, start: float | None = None, end: float | None = None) -> InteractionLog:
        """Rows with ``start <= timestamp < end``."""
        mask = np.ones(len(self), dtype=bool)
        if start is not None:
            mask &= self.timestamps >= start
        if end is not None:
            mask &= self.timestamps < end
        return self.select(mask)

    def with_weights(self, weights: Mapping[str, float]) -> InteractionLog:
        """The same log with each row's weight set from its event type."""
        per_type = np.array([weights.get(t, 1.0) for t in self.event_type_names], np.float32)
        if not per_type.size:
            return self
        return replace(self, weights=per_type[self.event_types])

    def user_item_matrix(self, *, binary: bool = False) -> Any:
        """users x items CSR of summed weights (or 1 where any positive interaction).

        Summed weights may be negative (``dislike``, ``hide``): `implicit`'s ALS reads a
        negative entry as negative feedback (preference 0 with confidence ``|x|``). The
        binary matrix (co-occurrence) leaves negative rows out: a dislike says nothing
        about what goes together."""
        from scipy import sparse

        if binary:
            keep = self.weights > 0
            data = np.ones(int(keep.sum()), np.float32)
            users, items = self.users[keep], self.items[keep]
        else:
            data, users, items = self.weights.astype(np.float32), self.users, self.items
        matrix = sparse.csr_matrix((data, (users, items)), shape=(self.n_users, self.n_items))
        matrix.sum_duplicates()
        matrix.eliminate_zeros()  # a like cancelled by a dislike is no interaction
        if binary:
            matrix.data[:] = 1.0
        return matrix

    def groups(self, by: IntArray) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Time order grouped by ``by`` (users or sessions): (row order, group starts).

        ``order[starts[g]:starts[g+1]]`` are one group's rows, oldest first.
        """
        order = np.lexsort((self.row, self.timestamps, by)).astype(np.int64)
        keys = by[order]
        boundaries = np.flatnonzero(np.diff(keys)) + 1 if len(keys) else np.zeros(0, np.int64)
        starts = np.concatenate(([0], boundaries, [len(keys)])).astype(np.int64)
        return order, starts

    # --- combining ---------------------------------------------------------------------
    def join(self, other: InteractionLog) -> InteractionLog:
        """This log's rows, then ``other``'s; both must share the id maps (parts of one
        log, made with `select`)."""
        if other.item_ids is not self.item_ids or other.user_ids is not self.user_ids:
            raise ValueError("join needs parts of the same log; use concat for separate logs")
        return replace(
            self,
            users=np.concatenate((self.users, other.users)),
            items=np.concatenate((self.items, other.items)),
            sessions=np.concatenate((self.sessions, other.sessions)),
            timestamps=np.concatenate((self.timestamps, other.timestamps)),
            event_types=np.concatenate((self.event_types, other.event_types)),
            weights=np.concatenate((self.weights, other.weights)),
            row=np.concatenate((self.row, other.row)),
        )

    @staticmethod
    def concat(logs: Sequence[InteractionLog], source: str = "") -> InteractionLog:
        """One log holding every row of ``logs`` with merged id maps (rows renumbered)."""
        if not logs:
            raise ValueError("concat needs at least one log")
        users, items, sessions, types = _Vocab(), _Vocab(), _Vocab(), _Vocab()
        cats = _Vocab()
        item_cat: dict[int, int] = {}
        cols: dict[str, list[Any]] = {k: [] for k in ("u", "i", "s", "e", "t", "w")}
        for part in logs:
            umap = np.array([users.code(str(x)) for x in part.user_ids], np.int32)
            imap = np.array([items.code(str(x)) for x in part.item_ids], np.int32)
            smap = np.array([sessions.code(str(x)) for x in part.session_ids], np.int32)
            emap = np.array([types.code(x) for x in part.event_type_names], np.int32)
            part_cats = part.category_of()
            for code, cat in enumerate(part_cats):
                if cat >= 0 and int(imap[code]) not in item_cat:
                    item_cat[int(imap[code])] = cats.code(str(part.category_ids[cat]))
            cols["u"].append(umap[part.users] if len(umap) else part.users)
            cols["i"].append(imap[part.items] if len(imap) else part.items)
            cols["s"].append(smap[part.sessions] if len(smap) else part.sessions)
            cols["e"].append(emap[part.event_types] if len(emap) else part.event_types)
            cols["t"].append(part.timestamps)
            cols["w"].append(part.weights)
        n = sum(len(p) for p in logs)
        categories = np.full(len(items.ids), -1, np.int32)
        for item, cat in item_cat.items():
            categories[item] = cat
        return InteractionLog(
            users=np.concatenate(cols["u"]).astype(np.int32),
            items=np.concatenate(cols["i"]).astype(np.int32),
            sessions=np.concatenate(cols["s"]).astype(np.int32),
            timestamps=np.concatenate(cols["t"]).astype(np.float64),
            event_types=np.concatenate(cols["e"]).astype(np.int32),
            weights=np.concatenate(cols["w"]).astype(np.float32),
            row=np.arange(n, dtype=np.int64),
            user_ids=_ids_array(users.ids),
            item_ids=_ids_array(items.ids),
            session_ids=_ids_array(sessions.ids),
            event_type_names=tuple(types.ids),
            item_categories=categories if item_cat else np.zeros(0, np.int32),
            category_ids=_ids_array(cats.ids),
            source=source or "+".join(p.source for p in logs),
        )


class LogBuilder:
    """Accumulates rows as strings and builds an `InteractionLog`.

    Rows without a session get one by the inactivity rule (``session_gap_s``) when built.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        session_gap_s: float = DEFAULT_SESSION_GAP_S,
        source: str = "",
    ) -> None:
        self.weights = dict(DEFAULT_WEIGHTS if weights is None else weights)
        self.session_gap_s = session_gap_s
        self.source = source
        self._users, self._items, self._sessions = _Vocab(), _Vocab(), _Vocab()
        self._types, self._cats = _Vocab(), _Vocab()
        self._item_cat: dict[int, int] = {}
        # Compact typed buffers (4-8 bytes a value, not a Python object each), so a log
        # of tens of millions of rows loads in memory proportional to its columns.
        self._u = array("i")
        self._i = array("i")
        self._s = array("i")  # -1: derive from the inactivity gap
        self._e = array("i")
        self._t = array("d")
        self._w = array("f")

    def add(
        self,
        user: str,
        item: str,
        timestamp: float,
        event_type: str = "view",
        *,
        session: str | None = None,
        value: float | None = None,
        category: str | None = None,
    ) -> None:
        """One interaction; ``value`` multiplies the type's weight when given (e.g. a price
        or a count), ``category`` is remembered for the item (its first one wins)."""
        item_code = self._items.code(item)
        self._u.append(self._users.code(user))
        self._i.append(item_code)
        self._s.append(-1 if session is None else self._sessions.code(session))
        self._e.append(self._types.code(event_type))
        self._t.append(timestamp)
        weight = self.weights.get(event_type, 1.0)
        self._w.append(weight if value is None else weight * value)
        if category is not None and item_code not in self._item_cat:
            self._item_cat[item_code] = self._cats.code(category)

    def add_event(self, event: Event) -> None:
        """An archived `Event` (events without an item are skipped: nothing to learn)."""
        if event.item_id is None:
            return
        category = event.properties.get("category")
        self.add(
            event.user_id if event.user_id is not None else f"session:{event.session_id}",
            event.item_id,
            event.timestamp,
            event.event_type,
            session=event.session_id,
            category=None if category is None else str(category),
        )

    def set_category(self, item: str, category: str) -> None:
        code = self._items.index.get(item)
        if code is not None:
            self._item_cat[code] = self._cats.code(category)

    def __len__(self) -> int:
        return len(self._i)

    def build(self) -> InteractionLog:
        users = np.frombuffer(self._u, np.int32).copy()
        sessions = np.frombuffer(self._s, np.int32).copy()
        timestamps = np.frombuffer(self._t, np.float64).copy()
        rows = np.arange(len(users), dtype=np.int64)
        session_ids = list(self._sessions.ids)
        missing = sessions < 0
        if missing.any():
            # Cut each user's session-less rows into sessions at gaps > session_gap_s.
            idx = rows[missing]
            order = idx[np.lexsort((idx, timestamps[idx], users[idx]))]
            u, t = users[order], timestamps[order]
            new = np.ones(len(order), dtype=bool)
            new[1:] = (u[1:] != u[:-1]) | (t[1:] - t[:-1] > self.session_gap_s)
            numbers = np.cumsum(new) - 1
            base = len(session_ids)
            sessions[order] = (base + numbers).astype(np.int32)
            firsts = order[new]
            session_ids += [f"{self._users.ids[users[r]]}#{int(timestamps[r])}" for r in firsts]
        categories = np.full(len(self._items.ids), -1, np.int32)
        for item, cat in self._item_cat.items():
            categories[item] = cat
        return InteractionLog(
            users=users,
            items=np.frombuffer(self._i, np.int32).copy(),
            sessions=sessions,
            timestamps=timestamps,
            event_types=np.frombuffer(self._e, np.int32).copy(),
            weights=np.frombuffer(self._w, np.float32).copy(),
            row=rows,
            user_ids=_ids_array(self._users.ids),
            item_ids=_ids_array(self._items.ids),
            session_ids=_ids_array(session_ids),
            event_type_names=tuple(self._types.ids),
            item_categories=categories if self._item_cat else np.zeros(0, np.int32),
            category_ids=_ids_array(self._cats.ids),
            source=self.source,
        )


# --- loaders ------------------------------------------------------------------------------


def _open_checked(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} file {str(path)!r} does not exist; pass the right path")
    return path


def _bad_row(path: Path, line: int, problem: str, fix: str) -> DataError:
    return DataError(f"{path}:{line}: {problem}; {fix}")


def load_personalize_csv(
    path: Path,
    *,
    weights: Mapping[str, float] | None = None,
    items_csv: Path | None = None,
    session_gap_s: float = DEFAULT_SESSION_GAP_S,
    use_event_value: bool = False,
) -> InteractionLog:
    """A Personalize interactions CSV (header ``USER_ID,ITEM_ID,TIMESTAMP[,EVENT_TYPE,
    EVENT_VALUE]``), plus categories from an items CSV when given.

    ``use_event_value`` multiplies each row's type weight by its EVENT_VALUE (when set).
    """
    builder = LogBuilder(weights, session_gap_s=session_gap_s, source=str(path))
    with _open_checked(path, "interactions").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        header = {name.strip().upper() for name in reader.fieldnames or ()}
        missing = {"USER_ID", "ITEM_ID", "TIMESTAMP"} - header
        if missing:
            raise DataError(
                f"{path} lacks the column(s) {sorted(missing)}; a Personalize interactions "
                f"CSV starts with the header {PERSONALIZE_HEADER}"
            )
        for line, raw in enumerate(reader, start=2):
            row = {k.strip().upper(): (v or "").strip() for k, v in raw.items() if k}
            try:
                rec = Interaction.from_csv_row(row)
            except (ValueError, KeyError) as exc:
                raise _bad_row(path, line, str(exc), "fix or remove the row") from exc
            builder.add(
                rec.user_id,
                rec.item_id,
                rec.timestamp,
                rec.event_type,
                value=rec.event_value if use_event_value else None,
            )
    if items_csv is not None:
        for item in load_items_csv(items_csv):
            if item.categories:
                builder.set_category(item.item_id, item.categories[0])
    return builder.build()


def load_items_csv(path: Path) -> list[Item]:
    """A Personalize items CSV (``ITEM_ID`` plus CATEGORIES/BRAND/PRICE/...)."""
    with _open_checked(path, "items").open(newline="", encoding="utf-8") as handle:
        out: list[Item] = []
        for line, raw in enumerate(csv.DictReader(handle), start=2):
            row = {k.strip().upper(): (v or "").strip() for k, v in raw.items() if k}
            try:
                out.append(Item.from_csv_row(row))
            except (ValueError, KeyError) as exc:
                raise _bad_row(path, line, str(exc), "fix or remove the row") from exc
        return out


def load_users_csv(path: Path) -> list[User]:
    """A Personalize users CSV (``USER_ID`` plus attribute columns)."""
    with _open_checked(path, "users").open(newline="", encoding="utf-8") as handle:
        out: list[User] = []
        for line, raw in enumerate(csv.DictReader(handle), start=2):
            row = {k.strip().upper(): (v or "").strip() for k, v in raw.items() if k}
            try:
                out.append(User.from_csv_row(row))
            except (ValueError, KeyError) as exc:
                raise _bad_row(path, line, str(exc), "fix or remove the row") from exc
        return out


def load_movielens(
    ratings: Path,
    *,
    movies: Path | None = None,
    weights: Mapping[str, float] | None = None,
    session_gap_s: float = DEFAULT_SESSION_GAP_S,
) -> InteractionLog:
    """MovieLens ``ratings.csv`` (``userId,movieId,rating,timestamp``). Every rating is an
    implicit positive of type ``like`` with weight 1 (the reference protocol ignores the
    stars); genres come from ``movies.csv`` (default: beside ratings.csv, if there)."""
    ratings = _open_checked(ratings, "MovieLens ratings")
    builder = LogBuilder(
        {"like": 1.0} if weights is None else weights,
        session_gap_s=session_gap_s,
        source=str(ratings),
    )
    with ratings.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:4]] != [
            "userId",
            "movieId",
            "rating",
            "timestamp",
        ]:
            raise DataError(
                f"{ratings} does not start with the MovieLens header "
                "userId,movieId,rating,timestamp; pass a MovieLens ratings.csv"
            )
        for line, row in enumerate(reader, start=2):
            try:
                builder.add(row[0], row[1], float(row[3]), "like")
            except (ValueError, IndexError) as exc:
                raise _bad_row(
                    ratings, line, str(exc), "expected userId,movieId,rating,timestamp"
                ) from exc
    movies = movies if movies is not None else ratings.with_name("movies.csv")
    if movies.is_file():
        with movies.open(newline="", encoding="utf-8") as handle:
            for movie in csv.DictReader(handle):
                genres = Item(item_id=movie["movieId"], categories=movie.get("genres", ""))
                if genres.categories:
                    builder.set_category(movie["movieId"], genres.categories[0])
    return builder.build()


def load_taobao(
    path: Path,
    *,
    weights: Mapping[str, float] | None = None,
    session_gap_s: float = DEFAULT_SESSION_GAP_S,
    window: tuple[float, float] | None = None,
) -> InteractionLog:
    """Taobao UserBehavior (no header: ``user,item,category,behavior,timestamp`` with
    behaviour pv|cart|fav|buy → view|add_to_cart|like|purchase). ``window`` keeps only
    rows with ``start <= timestamp < end`` (e.g. the official 9-day window)."""
    builder = LogBuilder(weights, session_gap_s=session_gap_s, source=str(path))
    with _open_checked(path, "Taobao UserBehavior").open(newline="", encoding="utf-8") as handle:
        for line, row in enumerate(csv.reader(handle), start=1):
            if not row:
                continue
            try:
                user, item, category, behaviour, stamp = row[:5]
                timestamp = float(stamp)
                event_type = TAOBAO_BEHAVIOURS[behaviour]
            except (ValueError, KeyError) as exc:
                raise _bad_row(
                    path,
                    line,
                    f"cannot read {row!r} ({exc!r})",
                    "expected user,item,category,pv|cart|fav|buy,unix seconds (no header)",
                ) from exc
            if window is not None and not window[0] <= timestamp < window[1]:
                continue
            builder.add(user, item, timestamp, event_type, category=category)
    return builder.build()


def load_yoochoose(
    path: Path,
    *,
    weights: Mapping[str, float] | None = None,
) -> InteractionLog:
    """YooChoose clicks as session-rec prepares them: tab-separated, header
    ``SessionId ItemId Time``; every row a ``click``. Sessions are the users too."""
    builder = LogBuilder(weights, source=str(path))
    with _open_checked(path, "YooChoose clicks").open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t")
        header = next(reader, None)
        if header is None:
            return builder.build()
        names = [h.strip() for h in header]
        try:
            s_col, i_col, t_col = (names.index(n) for n in ("SessionId", "ItemId", "Time"))
        except ValueError:
            raise DataError(
                f"{path} does not start with the header SessionId<TAB>ItemId<TAB>Time; pass a "
                "session-rec prepared YooChoose file"
            ) from None
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                session = row[s_col]
                builder.add(session, row[i_col], float(row[t_col]), "click", session=session)
            except (ValueError, IndexError) as exc:
                raise _bad_row(path, line, str(exc), "expected SessionId, ItemId, Time") from exc
    return builder.build()
