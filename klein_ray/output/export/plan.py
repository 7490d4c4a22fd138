"""The export's plan and records: what a shard is made of, where its files go, and the stats
marker that says it is complete.

**Membership** is fixed by the manifest's row order, nothing else: shard ``k`` holds the rows
at manifest positions ``[k*N, (k+1)*N)`` (``N`` = ``rows_per_shard``), and there are
``ceil(rows / N)`` shards whatever is committed yet, so shard numbers never have gaps and the
Parquet files' ``-of-NNNNN`` total is known before the first shard is written.

**Parts.** ``max_shard_bytes`` caps a shard's size. A shard whose samples would pass it is
written as several files (parts), split greedily in row order by each sample's size: a pure
function of the shard's committed rows, so the same rows always give the same parts. One
sample larger than the cap is a part of its own.

**Layout under DEST** (every name the export owns; nothing else is ever written or removed):

```
{k:05d}.tar  ({k:05d}_{p}.tar for parts)                 webdataset shards
data/train-{k:05d}-of-{K:05d}.parquet  (...-{p}.parquet)   parquet shards
_shards/{k:05d}.parquet      every manifest row of shard k: status, stage, error, file
_shards/{k:05d}_stats.json   shard k's marker: written last; names its inputs and files
shardindex.json              the shard list (wids' index format), rewritten at the end
README.md                    the dataset card, rewritten at the end
```

**The inputs digest** names everything a shard's files are made of: the plan's settings, and
per row its position, id, status, image sha256, metadata and recorded failure. A shard whose
marker names the current digest (and whose files are present at their sizes) is complete and
skipped; any change (a row committed, repaired, re-rendered, failed) rebuilds that shard only.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from klein_ray.config import StorageConfig

FORMAT_VERSION = 1  # bump when a shard's bytes change for the same rows: every shard is rebuilt
FORMATS = ("webdataset", "parquet")
DEFAULT_ROWS_PER_SHARD = 1000
DEFAULT_MAX_SHARD_BYTES = 1 << 30  # 1 GiB: past it a shard is split into parts

SHARDS = "_shards/"
INDEX = "shardindex.json"
CARD = "README.md"
# The names the export owns (see the module docstring): only these are ever removed.
OWNED = re.compile(r"^(\d{5}(_\d+)?\.tar|data/train-\d{5}-of-\d{5}(-\d+)?\.parquet"
                   r"|_shards/\d{5}(_stats\.json|\.parquet))$")


@dataclass(frozen=True)
class ExportPlan:
    """One export: from which output, to where, in which format and shard sizes."""

    format: str  # "webdataset" | "parquet"
    source: str  # OUT: the klein-ray output
    dest: str  # DEST: a directory or s3:// prefix
    total_rows: int  # rows in the manifest: fixes the shard count
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    storage: StorageConfig = field(default_factory=StorageConfig)

    @property
    def shards(self) -> int:
        return max(1, math.ceil(self.total_rows / self.rows_per_shard))

    def settings(self) -> dict[str, Any]:
        """What every shard's bytes depend on besides its rows (part of each inputs digest)."""
        return {"format_version": FORMAT_VERSION, "format": self.format, "rows_per_shard": self.rows_per_shard,
                "max_shard_bytes": self.max_shard_bytes, "shards": self.shards}


@dataclass(frozen=True)
class RowFailure:
    """Why the latest render failed a row (its errors table)."""

    stage: str
    error_type: str
    message: str


@dataclass(frozen=True)
class ShardRow:
    """One manifest row as the export sees it (the command reads the manifest, not this room)."""

    position: int  # in manifest order over all its files, from 0
    id: str | None
    manifest_file: str
    manifest_row: int
    digest: str  # the row's values now: a commit rendered from others is stale
    rejected: str | None = None  # why render refuses the row outright (a duplicate id, no id)
    failure: RowFailure | None = None


@dataclass(frozen=True)
class ShardTask:
    """What one task builds: shard ``index`` of ``plan``, with its rows (picklable: Ray ships it)."""

    plan: ExportPlan
    index: int
    rows: tuple[ShardRow, ...]


@dataclass(frozen=True)
class ShardFile:
    name: str  # key under DEST
    nsamples: int
    filesize: int
    sha256: str


@dataclass(frozen=True)
class ShardStats:
    """A shard's completion marker (``_shards/{k}_stats.json``), written after its files."""

    index: int
    inputs: str  # the inputs digest the files were built from
    settings: dict[str, Any]
    rows: int  # manifest rows in the shard
    samples: int  # rows exported (committed)
    stale: int  # exported, but rendered from values the manifest no longer has
    failed: int
    pending: int
    rejected: int
    files: tuple[ShardFile, ...]
    table: ShardFile  # the per-shard table
    extensions: tuple[str, ...] = ()  # image extensions of its samples

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, raw: bytes) -> ShardStats | None:
        """The marker, or None if it is not one (damaged, or of another version): rebuilt."""
        try:
            found = json.loads(raw)
            return cls(**{**found, "files": tuple(ShardFile(**f) for f in found["files"]),
                          "table": ShardFile(**found["table"]), "extensions": tuple(found["extensions"])})
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(frozen=True)
class ShardResult:
    stats: ShardStats
    built: bool  # False: complete already, skipped


def data_names(plan: ExportPlan, index: int, parts: int) -> list[str]:
    """The keys of shard ``index``'s files, one per part."""
    suffixes = [""] if parts == 1 else [f"_{p}" for p in range(parts)]
    if plan.format == "webdataset":
        return [f"{index:05d}{s}.tar" for s in suffixes]
    stem = f"data/train-{index:05d}-of-{plan.shards:05d}"
    return [f"{stem}{s.replace('_', '-')}.parquet" for s in suffixes]


def table_key(index: int) -> str:
    return f"{SHARDS}{index:05d}.parquet"


def stats_key(index: int) -> str:
    return f"{SHARDS}{index:05d}_stats.json"


def split_parts(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Sample indices per part: greedy in order, a part closed when the next sample would pass
    ``max_bytes`` (a sample larger than that alone is a part of its own). Always one part at
    least (an empty shard is one empty file: no gaps in the numbering)."""
    parts: list[list[int]] = [[]]
    filled = 0
    for i, size in enumerate(sizes):
        if parts[-1] and filled + size > max_bytes:
            parts.append([])
            filled = 0
        parts[-1].append(i)
        filled += size
    return parts


def inputs_digest(settings: dict[str, Any], entries: list[list[Any]]) -> str:
    """sha256 of the plan's settings and the shard's per-row entries (canonical JSON)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for entry in entries:
        digest.update(json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n")
    return digest.hexdigest()
