"""Build WebDataset tars and images inside tests."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

from PIL import Image

Member = tuple[str, bytes] | tuple[str, bytes, bytes]  # (name, data[, tar type])


def png(width: int = 80, height: int = 60, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (IHDR rewritten, CRC fixed)."""
    data = bytearray(png(1, 1))
    start = 8 + 8  # signature, then length + "IHDR"
    ihdr = struct.pack(">II", width, height) + bytes(data[start + 8 : start + 13])
    data[start : start + 13] = ihdr
    crc = zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF
    data[start + 13 : start + 17] = struct.pack(">I", crc)
    return bytes(data)


def sample(
    key: str,
    caption: str | None = "a red box",
    meta: dict[str, Any] | None = None,
    image: bytes | None = None,
    ext: str = "png",
) -> list[Member]:
    members: list[Member] = []
    if meta is not None:
        members.append((f"{key}.json", json.dumps(meta).encode()))
    members.append((f"{key}.{ext}", png() if image is None else image))
    if caption is not None:
        members.append((f"{key}.txt", caption.encode()))
    return members


def tar_bytes(members: list[Member]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for member in members:
            name, data = member[0], member[1]
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if len(member) == 3:
                info.type = member[2]
                info.linkname = "/etc/passwd"
                tar.addfile(info)
                continue
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: Path, members: list[Member]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tar_bytes(members))
    return path
