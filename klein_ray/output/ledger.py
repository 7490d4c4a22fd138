"""The ledger: the only place that decides a row is done, and the commit protocol that makes it so.

**Deciding.** ``judge`` reads a row's marker (and HEADs its image) and asks the one predicate
(``markers.commit_problem``): readable, the row's own id and image key, the image stored with
the size and sha256 named. Every caller goes through it: the worker's skip check, resume (rows
outside the checkpoint), ``status``, ``verify``, ``render --verify``. ``committed_rows`` lists
the committed rows with their records: the checkpoint's (a cache of markers the predicate
passed when committed) plus the markers outside it.

**The invariant: once a row's marker exists, the image it names never changes, whoever writes
late.** Every write of the protocol is conditional, so a write that lands late (a zombie worker
of a killed run, a request stuck in a proxy, a process paused between two lines) changes nothing
once the row is committed:

1. The image is created only if absent (``If-None-Match``), carrying its sha256 and the
   fingerprint of the render inputs in the object's own metadata (atomic with the content).
2. If the key is taken, the stored image is read (HEAD) and
   - it is ours (same sha256): a retried write whose reply was lost;
   - it has our fingerprint: a leftover of an attempt at the same inputs (a lost worker, a
     killed run): adopted as it is, never rewritten;
   - a marker names it: the row is committed by someone else; theirs stands;
   - otherwise (a leftover of other inputs, or a foreign object): replaced only if it is still
     the version read (``If-Match``), so a leftover never blocks its row for good.
3. The marker is created only if absent. If it exists: it names our image (our own earlier
   attempt) or an intact image (another writer committed: theirs stands, ours is ``already``);
   a marker that is unreadable or names an image that is not stored is repaired, again only if
   it is still the version read.
Races end in a few passes because every pass sees a write that succeeded; ``CommitConflict``
(retried by the driver as a store error) after that.

**Epochs fence stale writers.** Every image and marker carries the epoch of the lease its
writer's run held (``output.lease``: each driver that takes the lease gets a higher one). A
writer never replaces anything a newer epoch wrote, marker, placeholder or image: it stops with
``Superseded``. So a zombie of an earlier run (a killed driver's worker, a paused driver whose
lease was taken over) cannot undo what the current run writes, even with DIFFERENT render
inputs (an edited manifest); the current run replaces what older epochs left, at the version it
read. What no conditional write can stop is a stale writer creating a key nobody has written
yet; what it commits then is a render of the row as its run saw it, and the row's ``inputs``
say so: if the row has changed since, the next run finds it stale and renders it again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from klein_ray.output import layout
from klein_ray.output.checkpoint import Checkpoint, DoneSet, Origin
from klein_ray.output.layout import image_key, meta_key
from klein_ray.output.markers import (
    CommittedRow,
    Verdict,
    commit_problem,
    epoch_of,
    identity_problem,
    image_epoch,
    own_image_keys,
    parse_marker,
    sha_of,
)
from klein_ray.storage import AlreadyExists, ConditionFailed, NotFound, Store, VersionChanged
from klein_ray.types import IMAGE_EXTENSIONS, RowResult

PASSES = 4  # each failed pass means another writer's write succeeded in between


def placeholder(epoch: int) -> bytes:
    """A marker that commits nothing: a repair (or a stale row's re-render) is under way."""
    return json.dumps({"repairing": True, "epoch": epoch}).encode() + b"\n"


class CommitConflict(Exception):
    """Other writers kept changing the row while we committed; nothing of ours is final."""


class Superseded(CommitConflict):
    """A newer epoch (a run that took the lease since) wrote this row: ours stops, unwritten."""


@dataclass(frozen=True)
class Receipt:
    image_key: str
    meta_key: str
    sha256: str
    bytes: int
    already: bool = False  # the row was committed by another attempt; this one wrote nothing final
    adopted: bool = False  # the image is a leftover of an attempt at the same inputs


class Ledger:
    def __init__(self, store: Store, run_id: str = "", epoch: int = 0, set_aside: bool = False):
        self.store = store
        self.epoch = epoch  # the lease epoch every write of this ledger carries (0: none yet)
        self.checkpoint = Checkpoint(store, run_id, set_aside=set_aside)

    # -- deciding ----------------------------------------------------------------------

    def done(self) -> DoneSet:
        """Rows known committed, from the compact checkpoint (a few requests, not a listing).
        The checkpoint names only rows the predicate passed when they were committed. Every id
        in memory: large outputs are read through ``checkpoint.scan`` (docs/scale.md)."""
        return self.checkpoint.load()

    def record(self, result: RowResult, origin: Origin | None = None) -> None:
        """Add a committed row to the checkpoint (flushed in parts), with where in the manifest
        it came from when known."""
        self.checkpoint.record(result, origin)

    def output_is_empty(self) -> bool:
        """No marker and no image under OUT (two listing requests): nothing to check or adopt."""
        return all(next(iter(self.store.list(p)), None) is None for p in (layout.META, layout.IMAGES))

    def committed(self, row_id: str) -> dict[str, Any] | None:
        """The row's marker if it commits the row (the predicate, image checked by HEAD)."""
        meta = self.read_meta(row_id)
        return meta if meta is not None and self._problem(row_id, meta) is None else None

    def committed_rows(self, outside: Collection[str] | None = None) -> Iterator[CommittedRow]:
        """Every committed row with its record: the rows the checkpoint names, then the rows
        outside it whose marker commits them (the predicate: a GET and a HEAD each). Those are
        the ids in ``outside`` when given (a few, looked up one by one), else every marker under
        ``meta/`` not in the checkpoint (found by listing: one request per 1,000 markers)."""
        seen: set[str] = set()
        for record in self.checkpoint.records():
            if record["id"] not in seen:
                seen.add(record["id"])
                yield CommittedRow(**record)
        if outside is None:
            outside = sorted(i for i in self.marker_ids() if i not in seen)
        for _, verdict in self.judge_all([i for i in outside if i not in seen]):
            if isinstance(verdict, CommittedRow):
                yield verdict

    def judge_all(self, ids: list[str], deep: bool = False,
                  threads: int = 16) -> Iterator[tuple[str, CommittedRow | Verdict]]:
        """Each row's verdict by the predicate, in ``ids``' order, ``threads`` requests at once:
        its record if committed, else why not (with the marker's version judged)."""
        with ThreadPoolExecutor(threads, thread_name_prefix="klein-ray-ledger") as pool:
            yield from zip(ids, pool.map(lambda i: self.judge(i, deep), ids))

    def judge(self, row_id: str, deep: bool = False) -> CommittedRow | Verdict:
        """The predicate for one row: its record if committed, else a ``Verdict`` saying why not
        and which version of its marker was judged ('' if none: what a repair replaces)."""
        return self._judged(row_id, deep)[0]

    def judge_marker(self, row_id: str) -> tuple[CommittedRow, dict[str, Any]] | Verdict:
        """``judge``, with the marker it judged when the row is committed: readers that copy the
        marker's fields (exporters) get the very version the predicate passed, in one read."""
        verdict, meta = self._judged(row_id, False)
        if isinstance(verdict, CommittedRow):
            assert meta is not None  # (a committed row's marker parsed)
            return verdict, meta
        return verdict

    def _judged(self, row_id: str, deep: bool) -> tuple[CommittedRow | Verdict, dict[str, Any] | None]:
        try:
            current = self.store.get_versioned(meta_key(row_id))
        except (NotFound, ValueError):  # ValueError: an id that cannot be a key has no marker
            return Verdict(row_id, "no marker (the checkpoint names the row, meta/ does not)", "", present=False), None
        meta = parse_marker(current.data)
        problem = (self._problem(row_id, meta, deep) if meta is not None
                   else "marker is not valid JSON naming an image (key, sha256, bytes)")
        if problem is not None:
            return Verdict(row_id, problem, current.etag), None
        assert meta is not None  # (no problem means the marker parsed)
        image = meta["image"]
        return CommittedRow(row_id, image["key"], image["sha256"], image["bytes"], meta_key(row_id),
                            current.etag, _text(meta, "inputs"), _text(meta, "setup")), meta

    def marker_ids(self) -> Iterator[str]:
        """Ids that have a marker object (readable or not), by listing ``meta/``."""
        for obj in self.store.list(layout.META):
            row_id = layout.id_of_meta_key(obj.key)
            if row_id is not None:
                yield row_id

    def read_meta(self, row_id: str) -> dict[str, Any] | None:
        """The row's marker, or None if absent or unreadable (a damaged marker commits nothing)."""
        try:
            return parse_marker(self.store.get(meta_key(row_id)))
        except (NotFound, ValueError):
            return None

    def _problem(self, row_id: str, meta: dict[str, Any], deep: bool = False) -> str | None:
        """``commit_problem`` for a parsed marker, reading what it needs of the image (nothing
        when the marker is not the row's own)."""
        problem = identity_problem(row_id, meta)
        if problem is not None:
            return problem
        info = self.store.head(meta["image"]["key"])
        data = None
        if deep and info is not None:
            try:
                data = self.store.get(meta["image"]["key"])
            except NotFound:
                info = None
        return commit_problem(row_id, meta, info, data)

    # -- committing --------------------------------------------------------------------

    def commit(self, row_id: str, fmt: str, image: bytes, content_type: str,
               meta: dict[str, Any], fingerprint: str = "", repair: str | None = None,
               output_was_empty: bool = False) -> Receipt:
        """Commit ``image`` as the row's image, or find the row committed already.

        ``fingerprint`` names the render inputs (a leftover with the same one is adopted).
        ``repair`` is for a row ``verify`` found broken: the version of its marker then ('' for
        none). The repair first claims the row by replacing exactly that version with a
        placeholder (which commits nothing); then image and marker are replaced whatever they
        hold. If the marker moved on since (another repair, a retry of this one, a late attempt
        of a killed run), the claim fails and this is an ordinary commit: a repair never
        replaces a row someone else made sound. Leftovers of the row in other formats are removed
        once it commits, unless ``output_was_empty`` (no image was there when the job began).
        """
        sha = hashlib.sha256(image).hexdigest()
        ours = Receipt(image_key(row_id, fmt), meta_key(row_id), sha, len(image))
        tags = {"sha256": sha, "fingerprint": fingerprint, "epoch": str(self.epoch)}
        repairing = repair is not None and self._claim(ours.meta_key, repair)
        # Every commit's marker differs from every other's, so that a version (etag: a hash of
        # the content) once replaced never comes back (ABA) to let a late conditional write in.
        token = uuid.uuid4().hex
        for _ in range(PASSES):
            placed = self._place(ours, image, content_type, tags, repairing)
            if placed is None:
                continue
            stored, wrote = placed
            if stored.already:
                return stored
            body = _marker_body(meta, stored, content_type, token, self.epoch)
            try:
                self.store.put(ours.meta_key, body, content_type="application/json", if_absent=True)
            except AlreadyExists:
                settled = self._settle(stored, wrote, body, repairing)
                if settled is None:
                    continue
                return settled
            if not output_was_empty:
                self._drop_other_formats(row_id, stored.image_key)
            return stored
        raise CommitConflict(f"{ours.meta_key}: other writers kept changing the row; retry")

    def _claim(self, key: str, version: str) -> bool:
        """Replace the marker judged broken or stale (exactly that version) with a placeholder."""
        body = placeholder(self.epoch)
        try:
            if version:
                self.store.put(key, body, content_type="application/json", if_match=version)
            else:
                self.store.put(key, body, content_type="application/json", if_absent=True)
        except ConditionFailed:
            return False
        return True

    def _place(self, ours: Receipt, image: bytes, content_type: str, tags: dict[str, str],
               repair: bool) -> tuple[Receipt, bool] | None:
        """Step 1 and 2: the image the marker will name, and whether we wrote it; None if the
        store changed under us (look again)."""
        try:
            self.store.put(ours.image_key, image, content_type=content_type, metadata=tags, if_absent=True)
            return ours, True
        except AlreadyExists:
            pass
        info = self.store.head(ours.image_key)
        if info is None:
            return None  # removed since: create again
        self._fence(image_epoch(info), ours.image_key)
        stored_sha = sha_of(info)
        if not repair:  # (a repair rewrites even identical-looking bytes: they may be damaged)
            if stored_sha == ours.sha256:
                return ours, False  # our own write landed (its reply was lost), or the same bytes
            same_inputs = bool(tags["fingerprint"]) and (info.metadata or {}).get("fingerprint") == tags["fingerprint"]
            if stored_sha and same_inputs:
                return replace(ours, sha256=stored_sha, bytes=info.size, adopted=True), False
            named = self.read_meta(_row_of(ours))
            if named and named["image"]["key"] == ours.image_key and named["image"]["sha256"] == stored_sha:
                return _theirs(ours, named), False
        try:
            self.store.put(ours.image_key, image, content_type=content_type, metadata=tags,
                           if_match=info.etag)
        except VersionChanged:
            return None
        return ours, True

    def _settle(self, stored: Receipt, wrote: bool, body: bytes, repair: bool) -> Receipt | None:
        """Step 3, the marker exists: whose is it, and is the row it describes intact?"""
        try:
            current = self.store.get_versioned(stored.meta_key)
        except NotFound:
            return None  # removed since: create again
        self._fence(epoch_of(current.data), stored.meta_key)
        named = parse_marker(current.data)
        if named and (named["image"]["key"], named["image"]["sha256"]) == (stored.image_key, stored.sha256):
            # Our bytes: this row's commit is ours (an earlier attempt of this run whose marker
            # landed, e.g. on a worker lost before it answered). An adopted leftover whose marker
            # someone else wrote: theirs.
            return replace(stored, already=stored.adopted and current.data != body)
        if named and not repair and self._problem(_row_of(stored), named) is None:
            if wrote and named["image"]["key"] != stored.image_key:
                self._drop(stored.image_key)  # ours in another format: one image per id
            return _theirs(stored, named)
        try:  # a broken marker: make it name our image, if it is still what we read
            self.store.put(stored.meta_key, body, content_type="application/json", if_match=current.etag)
        except VersionChanged:
            return None
        if named and named["image"]["key"] in own_image_keys(_row_of(stored)) - {stored.image_key}:
            self._drop(named["image"]["key"])  # the row's own image in another format; never another row's
        return stored

    def _fence(self, written_in: int, key: str) -> None:
        """Never replace what a newer epoch wrote: the run that wrote it owns the row now."""
        if written_in > self.epoch:
            raise Superseded(f"{key} was written by a newer run (epoch {written_in}; this writer's "
                             f"is {self.epoch}): it is that run's row now")

    def _drop_other_formats(self, row_id: str, kept: str) -> None:
        """A format change between runs must not leave two images for one id: leftovers of
        this row in other formats are removed once the marker names ``kept``. Only where an
        earlier attempt could have left one (the output was not empty when the job began)."""
        for ext in sorted(set(IMAGE_EXTENSIONS.values())):
            key = f"{layout.IMAGES}{row_id}.{ext}"
            if key != kept:
                self._drop(key)

    def _drop(self, key: str) -> None:
        info = self.store.head(key)
        if info is not None:
            try:
                self.store.delete(key, if_match=info.etag)
            except VersionChanged:
                pass  # changed since we looked: not ours to remove


def _marker_body(meta: dict[str, Any], stored: Receipt, content_type: str, token: str, epoch: int) -> bytes:
    # The marker is the row's own whatever ``meta`` says: its id is the one the key names.
    record = dict(meta, commit=token, id=_row_of(stored), epoch=epoch)
    record["image"] = {"key": stored.image_key, "sha256": stored.sha256, "bytes": stored.bytes,
                       "content_type": content_type}
    if stored.adopted:
        record["image"]["adopted"] = True  # rendered by an earlier attempt at the same inputs
    # allow_nan=False: a NaN would make the marker invalid JSON, and so the row never done.
    return json.dumps(record, sort_keys=True, indent=1, default=str, allow_nan=False).encode()


def _theirs(ours: Receipt, named: dict[str, Any]) -> Receipt:
    image = named["image"]
    return Receipt(image["key"], ours.meta_key, image["sha256"], image["bytes"], already=True)


def _row_of(receipt: Receipt) -> str:
    return layout.id_of_meta_key(receipt.meta_key) or ""


def _text(meta: dict[str, Any], field: str) -> str | None:
    value = meta.get(field)
    return value if isinstance(value, str) and value else None
