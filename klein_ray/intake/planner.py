"""Planning: groups a stream of validated rows into work units of compatible rows.

Rows are compatible when one diffusers call can render them together: same variant, output
size, steps, guidance, reference set (``image=`` is one reference set for the whole call) and
LoRA adapters with their scales (one adapter set is active per call).
Grouping is streaming and bounded: a group is emitted when full, and when too many rows wait in
open groups the oldest group is emitted part-full, so memory stays flat however long the
manifest is and however scattered its rows.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from itertools import islice

from klein_ray.types import RowSpec, WorkUnit

GroupKey = tuple


def unit_key(row: RowSpec) -> GroupKey:
    return (row.variant, row.width, row.height, row.steps, row.guidance, row.references, row.adapters)


class Planner:
    """Turns rows into ``WorkUnit``s no larger than each variant's batch size."""

    def __init__(self, batch_sizes: dict[str, int], max_pending_rows: int = 4096):
        self.batch_sizes = batch_sizes
        self.max_pending_rows = max_pending_rows
        self._groups: OrderedDict[GroupKey, list[RowSpec]] = OrderedDict()
        self._pending = 0
        self._next_id = 0

    @property
    def waiting(self) -> int:
        """Rows held in open groups (never more than ``max_pending_rows`` between calls)."""
        return self._pending

    @property
    def open_groups(self) -> int:
        """Groups started and not yet emitted."""
        return len(self._groups)

    def add(self, row: RowSpec) -> Iterator[WorkUnit]:
        """Take one row; yield any units it completes (or that must leave to bound memory)."""
        key = unit_key(row)
        group = self._groups.setdefault(key, [])
        group.append(row)
        self._pending += 1
        if len(group) >= self.batch_sizes[row.variant]:
            yield self._emit(key)
        while self._pending > self.max_pending_rows:
            yield self._emit(next(iter(self._groups)))

    def flush(self) -> Iterator[WorkUnit]:
        """Emit every open group (end of the manifest)."""
        while self._groups:
            yield self._emit(next(iter(self._groups)))

    def plan(self, rows: Iterable[RowSpec]) -> Iterator[WorkUnit]:
        for row in rows:
            yield from self.add(row)
        yield from self.flush()

    def _emit(self, key: GroupKey) -> WorkUnit:
        rows = self._groups.pop(key)
        self._pending -= len(rows)
        variant, width, height, steps, guidance, references, adapters = key
        unit = WorkUnit(self._next_id, variant, width, height, steps, guidance, references, tuple(rows),
                        adapters=adapters)
        self._next_id += 1
        return unit


def look_ahead(rows: Iterator[RowSpec], limit: int = 2048) -> tuple[list[RowSpec], dict[str, tuple]]:
    """The first ``limit`` rows (to be planned before the rest) and, per variant, the planned
    (width, height, references) seen among them, most common first: the sizes a compiling
    worker warms up for. Rows sized by their reference image (no width/height) are left out:
    their size is known only once the image is read."""
    ahead = list(islice(rows, limit))
    counts: dict[str, Counter] = {}
    for row in ahead:
        if row.width and row.height:
            counts.setdefault(row.variant, Counter())[(row.width, row.height, len(row.references))] += 1
    return ahead, {v: tuple(size for size, _ in c.most_common()) for v, c in counts.items()}
