"""The ledger: the only place that decides a row is done, and the commit protocol that makes it so.

**The predicate** (``commit_problem``, the one function every caller asks: the worker's skip
check, resume, ``status``, ``verify`` and ``render --verify``): a row is committed exactly when
``meta/{id}.json`` is readable, says it is the row's (its ``id``), names the row's own image key
(``images/{id}.{ext}``), and that image is stored with the size and sha256 the marker names
(shallow: the sha256 the image carries in its own metadata; deep: its bytes hashed). Anything
else commits nothing, whatever the checkpoint says; ``committed_rows`` lists the rows that are
committed, with their records, from the checkpoint plus the markers outside it.

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

What conditional writes cannot close on S3 (no transaction spans two keys): two writers with
DIFFERENT fingerprints at once, i.e. a zombie of an earlier run whose manifest or config was
changed for this id, racing this run's writer before its marker lands. Each may replace the
other's uncommitted image (each at the version it read), and the marker that lands last may
be repaired to name the zombie's image: the row ends consistent (marker and image agree) but
may hold the old inputs' render, or, if a writer dies between its image and its marker repair,
broken; ``verify`` reports the latter and ``render --verify`` repairs it. A fencing epoch per
lease in every image and marker would close it; not done. Same-input zombies (the usual case:
a lost worker, a killed run resumed) cannot cause it: they adopt, they never replace.
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
from klein_ray.output.checkpoint import Checkpoint, DoneSet
from klein_ray.output.layout import image_key, meta_key
from klein_ray.storage import AlreadyExists, ConditionFailed, NotFound, ObjectInfo, Store, VersionChanged, check_key
from klein_ray.types import IMAGE_EXTENSIONS, RowResult

PASSES = 4  # each failed pass means another writer's write succeeded in between
REPAIRING = b'{"repairing": true}\n'  # a marker that commits nothing: a repair is under way


class CommitConflict(Exception):
    """Other writers kept changing the row while we committed; nothing of ours is final."""


@dataclass(frozen=True)
class Receipt:
    image_key: str
    meta_key: str
    sha256: str
    bytes: int
    already: bool = False  # the row was committed by another attempt; this one wrote nothing final
    adopted: bool = False  # the image is a leftover of an attempt at the same inputs


@dataclass(frozen=True)
class CommittedRow:
    """A committed row's record: where its marker and image are, and the image's identity."""

    id: str
    image_key: str
    sha256: str
    bytes: int
    meta_key: str


@dataclass(frozen=True)
class Verdict:
    """Why a row is not committed, and the version of its marker that was judged ('' if there
    is none): a repair replaces the row only while the marker is still that version."""

    id: str
    problem: str
    marker_version: str = ""
    present: bool = True  # a marker object exists (readable or not)


def own_image_keys(row_id: str) -> set[str]:
    """The keys a row's image may have: ``images/{id}.{ext}`` for each output format."""
    return {image_key(row_id, fmt) for fmt in IMAGE_EXTENSIONS}


def identity_problem(row_id: str, marker: dict[str, Any]) -> str | None:
    """Whether a (parsed) marker is the row's own: its id, and an image key of the row's."""
    named = marker.get("id")
    if named != row_id:
        return f"the marker is row {named!r}'s, not this row's" if isinstance(named, str) else \
            "the marker names no row id"
    if marker["image"]["key"] not in own_image_keys(row_id):
        return f"the marker names {marker['image']['key']}, which is not this row's image"
    return None


def commit_problem(row_id: str, marker: dict[str, Any] | None, image: ObjectInfo | None,
                   data: bytes | None = None) -> str | None:
    """THE predicate: why ``marker`` (parsed; None if absent or unreadable) does not commit the
    row ``row_id`` given what is stored at the image key it names (``image``, None if nothing;
    ``data``: the image's bytes when checking deep), or None when it does."""
    if marker is None:
        return "no readable marker naming an image (key, sha256, bytes)"
    problem = identity_problem(row_id, marker)
    if problem is not None:
        return problem
    named = marker["image"]
    if image is None:
        return f"{named['key']} is missing"
    if image.size != named["bytes"]:
        return f"{named['key']} is {image.size} bytes, the marker says {named['bytes']}"
    sha = _sha_of(image)
    if sha is None:
        return f"{named['key']} carries no sha256 of its own (written by another tool?)"
    if sha != named["sha256"]:
        return f"{named['key']} is another image than the one the marker names (sha256 differs)"
    if data is not None and hashlib.sha256(data).hexdigest() != named["sha256"]:
        return f"{named['key']}: its bytes do not hash to the sha256 the marker names"
    return None


class Ledger:
    def __init__(self, store: Store, run_id: str = ""):
        self.store = store
        self.checkpoint = Checkpoint(store, run_id)

    # -- deciding ----------------------------------------------------------------------

    def done(self) -> DoneSet:
        """Rows known committed, from the compact checkpoint (a few requests, not a listing).
        The checkpoint names only rows the predicate passed when they were committed."""
        return self.checkpoint.load()

    def record(self, result: RowResult) -> None:
        """Add a committed row to the checkpoint (flushed in parts)."""
        self.checkpoint.record(result)

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
        try:
            current = self.store.get_versioned(meta_key(row_id))
        except (NotFound, ValueError):  # ValueError: an id that cannot be a key has no marker
            return Verdict(row_id, "no marker (the checkpoint names the row, meta/ does not)", "", present=False)
        meta = _parse_marker(current.data)
        problem = (self._problem(row_id, meta, deep) if meta is not None
                   else "marker is not valid JSON naming an image (key, sha256, bytes)")
        if problem is not None:
            return Verdict(row_id, problem, current.etag)
        image = meta["image"]  # type: ignore[index]
        return CommittedRow(row_id, image["key"], image["sha256"], image["bytes"], meta_key(row_id))

    def marker_ids(self) -> Iterator[str]:
        """Ids that have a marker object (readable or not), by listing ``meta/``."""
        for obj in self.store.list(layout.META):
            row_id = layout.id_of_meta_key(obj.key)
            if row_id is not None:
                yield row_id

    def read_meta(self, row_id: str) -> dict[str, Any] | None:
        """The row's marker, or None if absent or unreadable (a damaged marker commits nothing)."""
        try:
            return _parse_marker(self.store.get(meta_key(row_id)))
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
        tags = {"sha256": sha, "fingerprint": fingerprint}
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
            body = _marker_body(meta, stored, content_type, token)
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
        """Replace the broken marker ``verify`` saw (exactly that version) with a placeholder."""
        try:
            if version:
                self.store.put(key, REPAIRING, content_type="application/json", if_match=version)
            else:
                self.store.put(key, REPAIRING, content_type="application/json", if_absent=True)
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
        stored_sha = _sha_of(info)
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
        named = _parse_marker(current.data)
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
        if named and named["image"]["key"] != stored.image_key:
            self._drop(named["image"]["key"])
        return stored

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


def _parse_marker(raw: bytes) -> dict[str, Any] | None:
    """The marker if it is JSON naming an image we could have written (a key under images/, a
    sha256, a size), else None: such a marker commits nothing."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    image = meta.get("image") if isinstance(meta, dict) else None
    if not isinstance(image, dict) or not {"key", "sha256", "bytes"} <= image.keys():
        return None
    key, sha, size = image["key"], image["sha256"], image["bytes"]
    if not (isinstance(key, str) and key.startswith(layout.IMAGES) and _safe(key)):
        return None
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        return None
    return meta


def _safe(key: str) -> bool:
    try:
        check_key(key)
    except ValueError:
        return False
    return True


def _marker_body(meta: dict[str, Any], stored: Receipt, content_type: str, token: str) -> bytes:
    # The marker is the row's own whatever ``meta`` says: its id is the one the key names.
    record = dict(meta, commit=token, id=_row_of(stored))
    record["image"] = {"key": stored.image_key, "sha256": stored.sha256, "bytes": stored.bytes,
                       "content_type": content_type}
    if stored.adopted:
        record["image"]["adopted"] = True  # rendered by an earlier attempt at the same inputs
    # allow_nan=False: a NaN would make the marker invalid JSON, and so the row never done.
    return json.dumps(record, sort_keys=True, indent=1, default=str, allow_nan=False).encode()


def _theirs(ours: Receipt, named: dict[str, Any]) -> Receipt:
    image = named["image"]
    return Receipt(image["key"], ours.meta_key, image["sha256"], image["bytes"], already=True)


def _sha_of(info: ObjectInfo) -> str | None:
    return info.content_sha256 or (info.metadata or {}).get("sha256")


def _row_of(receipt: Receipt) -> str:
    return layout.id_of_meta_key(receipt.meta_key) or ""
