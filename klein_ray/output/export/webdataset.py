"""The WebDataset writer: a shard as a tar of samples, byte for byte the same for the same rows.

Per sample three members, ``KEY.{png,jpg,webp}`` (the image as committed), ``KEY.txt`` (the
prompt) and ``KEY.json`` (the metadata, ``samples.SAMPLE_FIELDS``), written in name order; the
samples come in key order, so the whole archive's members are sorted. Every header is fixed:
USTAR format, mtime 0, uid and gid 0, no user or group name, mode 0444. Written into a local
file object, one sample in memory at a time.
"""

from __future__ import annotations

import io
import tarfile
from typing import BinaryIO

from klein_ray.output.export.samples import Sample

CONTENT_TYPE = "application/x-tar"
MODE = 0o444


class TarShardWriter:
    """Appends samples to a tar archive in ``fileobj``; ``close`` writes its end."""

    def __init__(self, fileobj: BinaryIO):
        # Closed by ``close`` (the writer outlives this call: samples are added one by one).
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.samples = 0

    def add(self, sample: Sample, image: bytes) -> None:
        members = sorted([(f"{sample.key}.{sample.ext}", image), (f"{sample.key}.txt", sample.caption),
                          (f"{sample.key}.json", sample.json_bytes())])
        for name, data in members:
            self._tar.addfile(_header(name, len(data)), io.BytesIO(data))
        self.samples += 1

    def close(self) -> None:
        self._tar.close()


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info
