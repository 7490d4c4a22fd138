"""A byte per manifest row, by position: what a run knows of each row without a string per row.

``RowMarks`` holds one numpy ``uint8`` array per manifest file (a byte per row: 100 MB for
100 million rows, whatever the ids). Its bits say where a row stands against the checkpoint
(``DONE``, ``STALE``, ``OUTDATED``: at most one, once resolved), whether its id occurs more
than once in the manifest (``DUP``), and scratch bits the builders use (``HIT``, ``MULTI``:
how many checkpoint records named the row; ``FAILED``: the last run's errors named it).
Callers read slices of it next to the manifest's record batches, vectorised.
"""

from __future__ import annotations

import numpy as np

DONE, STALE, OUTDATED, DUP, HIT, MULTI, FAILED = 1, 2, 4, 8, 16, 32, 64
STANDING = DONE | STALE | OUTDATED


class RowMarks:
    def __init__(self, sizes: list[int]):
        self.files = [np.zeros(n, np.uint8) for n in sizes]

    @property
    def rows(self) -> int:
        return sum(len(a) for a in self.files)

    def slice(self, file: int, start: int, n: int) -> np.ndarray:
        """The marks of rows ``start .. start + n`` of file ``file`` (a view)."""
        return self.files[file][start:start + n]

    def count(self, bits: int, without: int = 0) -> int:
        """Rows with any of ``bits`` set and none of ``without``."""
        return sum(int(np.count_nonzero((a & bits) & ~(a & without) if without else a & bits))
                   for a in self.files)

    def set(self, file: int, rows: np.ndarray, bits: int) -> None:
        self.files[file][rows] |= np.uint8(bits)

    def clear(self, bits: int) -> None:
        for a in self.files:
            a &= np.uint8(~bits & 0xFF)

    def hit(self, file: int, rows: np.ndarray, state: int) -> None:
        """Checkpoint records name these rows with ``state``: a row named twice (here, or
        before) is marked ``MULTI``, for ``disputed``."""
        marks = self.files[file]
        if not len(rows):
            return
        seen = rows[(marks[rows] & HIT) != 0]
        if len(seen):
            marks[seen] |= MULTI
        if len(rows) > 1 and not bool(np.all(rows[1:] > rows[:-1])):  # repeats within rows
            ordered = np.sort(rows)
            marks[ordered[1:][ordered[1:] == ordered[:-1]]] |= MULTI
        marks[rows] |= np.uint8(HIT | state)

    def disputed(self, file: int) -> np.ndarray:
        """Rows that records name with different standings (a row rendered again and recorded
        twice, the older record not merged away yet): the newest record decides them."""
        marks = self.files[file]
        standing = marks & STANDING
        return np.flatnonzero(((marks & MULTI) != 0) & (standing & (standing - 1) != 0))

    def settle(self, file: int, rows: np.ndarray, states: np.ndarray) -> None:
        """Disputed rows decided: each gets exactly ``states`` (its newest record's)."""
        marks = self.files[file]
        marks[rows] = (marks[rows] & np.uint8(~STANDING & 0xFF)) | states.astype(np.uint8)
