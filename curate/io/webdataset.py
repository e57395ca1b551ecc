"""WebDataset tar shards: read samples into Arrow rows, write rows back into tars.

Conventions are the webdataset library's: a sample is a run of consecutive
members sharing a *key* (the member path up to the first dot of its file
name); the rest of the name is the member's extension (``png``, ``txt``,
``json``...).  Brace ranges (``shard-{000000..000099}.tar``) are expanded by
:mod:`curate.io.storage`.

Columns of a WebDataset source: ``id``, ``text`` (the caption, from the
``.txt`` member or a field of the ``.json`` member), ``source``,
``provenance`` (shard URI and the index of the sample's first member), then
``key``, ``image`` (bytes as stored), ``image_ext``, ``width`` and ``height``
(read from the image header, without decoding the pixels), and the declared
``columns`` taken from the ``.json`` member.

Nothing is skipped silently.  Each of these becomes a quarantined row naming
the shard and member: a truncated or corrupt tar (everything before the
damage is still read), a member whose name is absolute or climbs out with
``..``, a link or device member, a zero-byte member, a repeated key, a sample
with no image or no caption, invalid UTF-8 or JSON, an image whose header
cannot be read, and an image larger than ``max_image_pixels`` (rejected from
its header: a decompression bomb is never decoded).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

#: Columns every WebDataset source adds beside the reserved ones.
WEBDATASET_COLUMNS: dict[str, pa.DataType] = {
    "key": pa.string(),
    "image": pa.binary(),
    "image_ext": pa.string(),
    "width": pa.int64(),
    "height": pa.int64(),
}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.seg.png`` -> (``dir/abc``, ``seg.png``): the webdataset rule."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def unsafe_name(name: str) -> str | None:
    """Why a member name must not be trusted, or None."""
    if not name or "\x00" in name:
        return "empty name or NUL byte"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' in path"
    return None


@dataclass
class Sample:
    key: str
    first: int  # member index of the sample's first member
    members: dict[str, bytes] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)
    problem: tuple[str, str] | None = None  # (reason, detail)

    def flag(self, reason: str, detail: str) -> None:
        if self.problem is None:
            self.problem = (reason, detail)


@dataclass
class TarScan:
    samples: list[Sample]
    #: Damage that stopped the scan: (member index where it happened, reason, detail).
    damage: tuple[int, str, str] | None = None


def scan_tar(data: bytes) -> TarScan:
    """Group a tar's members into samples, flagging every anomaly instead of raising."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # noqa: SIM115 - in memory
    except (tarfile.TarError, EOFError, OSError) as exc:
        return TarScan([], (0, "corrupt_tar", f"not a readable tar: {exc}"))
    samples: list[Sample] = []
    seen: set[str] = set()
    index = 0
    damage: tuple[int, str, str] | None = None
    while True:
        try:
            member = tar.next()
        except (tarfile.TarError, EOFError, OSError) as exc:
            damage = (index, "corrupt_tar", f"unreadable member header at byte {tar.offset}: {exc}")
            break
        if member is None:
            break
        if member.isdir():
            index += 1
            continue
        key, ext = split_name(member.name)
        if not samples or samples[-1].key != key:
            sample = Sample(key, index)
            if key in seen:
                sample.flag("duplicate_key", f"key {key!r} appears again at member {member.name!r}")
            seen.add(key)
            samples.append(sample)
        sample = samples[-1]
        sample.names.append(member.name)
        _add_member(sample, member, ext, data)
        index += 1
    if damage is None:
        tail = data[tar.offset :]
        if tail.strip(b"\x00"):
            damage = (
                index,
                "corrupt_tar",
                f"unreadable data after byte {tar.offset} ({len(tail)} bytes not read)",
            )
        elif len(tail) < 512:  # a whole tar ends with zero blocks: this one was cut short
            damage = (
                index,
                "corrupt_tar",
                f"truncated: no end-of-archive marker after byte {tar.offset}; "
                "the last sample may be incomplete",
            )
    return TarScan(samples, damage)


def _add_member(sample: Sample, member: tarfile.TarInfo, ext: str, data: bytes) -> None:
    why = unsafe_name(member.name)
    if why:
        sample.flag("unsafe_member_name", f"{member.name!r}: {why}")
        return
    if not member.isfile():
        kind = "link" if member.issym() or member.islnk() else "special file"
        sample.flag("unsafe_member", f"{member.name!r} is a {kind}")
        return
    end = member.offset_data + member.size
    if end > len(data):
        sample.flag(
            "truncated_member",
            f"{member.name!r} needs {member.size} bytes, the file ends {end - len(data)} early",
        )
        return
    if member.size == 0:
        sample.flag("empty_member", f"{member.name!r} has zero bytes")
        return
    if not ext:
        sample.flag("bad_member_name", f"{member.name!r} has no extension")
        return
    if ext in sample.members:
        sample.flag("duplicate_member", f"{member.name!r} appears twice in sample {sample.key!r}")
        return
    sample.members[ext] = data[member.offset_data : end]


def image_size(payload: bytes, max_pixels: int) -> tuple[int, int] | tuple[str, str]:
    """(width, height) from the header, or (reason, detail); pixels are never decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(payload)) as img:
                width, height = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return "image_too_large", str(exc)
    except Exception as exc:  # PIL raises many types for garbage
        return "bad_image", f"{type(exc).__name__}: {exc}"
    if width <= 0 or height <= 0:
        return "bad_image", f"header says {width}x{height}"
    if width * height > max_pixels:
        return "image_too_large", f"{width}x{height} pixels > max_image_pixels {max_pixels}"
    return width, height


# --- writing -------------------------------------------------------------------------


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def safe_key(key: str) -> str | None:
    """Why ``key`` cannot name members of a tar we write, or None."""
    why = unsafe_name(key)
    if why:
        return why
    if "." in key.rpartition("/")[2]:
        return "a dot in the key's file name would split it differently on reading"
    if key.endswith("/"):
        return "ends with '/'"
    return None


@dataclass(frozen=True)
class TarOutput:
    data: bytes
    #: Per sample: byte offset of its first member header, and its size in the tar.
    offsets: np.ndarray[Any, np.dtype[np.int64]]
    sizes: np.ndarray[Any, np.dtype[np.int64]]


def write_tar(samples: list[list[tuple[str, bytes]]]) -> TarOutput:
    """A deterministic tar: members in the given order, zero mtime and owners."""
    buf = io.BytesIO()
    offsets, sizes = [], []
    with tarfile.TarFile(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for members in samples:
            start = buf.tell()
            offsets.append(start)
            for name, payload in members:
                tar.addfile(_tarinfo(name, len(payload)), io.BytesIO(payload))
            sizes.append(buf.tell() - start)
    return TarOutput(
        buf.getvalue(), np.array(offsets, dtype=np.int64), np.array(sizes, dtype=np.int64)
    )


def json_member(row: dict[str, Any]) -> bytes:
    return json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()
