"""Rebuild the bundled image-caption demo set from Open Clip Art (Debian ``openclipart-png``).

Source and licence: every image is a PNG shipped by Debian's ``openclipart-png`` package
(Open Clip Art Library 0.18), whose images are dedicated to the public domain (Creative
Commons Public Domain Dedication; see demo_image_text/LICENSE-OPENCLIPART.txt and
/usr/share/doc/openclipart-png/copyright).

Where the metadata lives: the package ships PNGs only, under /usr/share/openclipart/png/
(22 top-level category folders; about 1,200 of the paths are symlinks that Debian made when
it deduplicated identical files, which are skipped here).  The human-written title sits inside
each PNG as a ``tEXt`` chunk with the keyword ``Title`` (Inkscape wrote it on export, next to
``Author`` and sometimes ``Description``); a few dozen images have none.  The package carries
no keyword lists, so ``keywords`` are derived from the folder path (``animals/mammals/big_cats``
gives ``["animals", "mammals", "big cats"]``) and ``category`` is the top-level folder.

Titles are kept exactly as shipped (decoded as UTF-8, never stripped or unescaped): author or
icon-set names used as titles, stray leading/trailing spaces and non-English titles are real and
give the filters something to do (at most ``MAX_PER_TITLE`` samples share one title, so that
boilerplate titles do not swamp the set).  Images with no title get no ``.txt`` member.  On
purpose the selection also holds some tiny images, some with extreme aspect ratio, and one sample
whose PNG bytes are a truncated, garbled copy (``"damaged": true`` in its JSON), in the last shard.

Output is WebDataset: ``demo_image_text/shard-NNNNNN.tar``, members ``<key>.json``,
``<key>.png`` and ``<key>.txt`` in key order, written byte for byte deterministically.  The
output is committed, so the demo never needs this script:

    apt-get install openclipart-png
    python pipelines/data/make_demo_image_text.py
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path("/usr/share/openclipart/png")
OUT = Path(__file__).parent / "demo_image_text"
SEED = 20240
SAMPLES = 480
SHARDS = 5
MAX_BYTES = 12_000  # keep the bundle small: only images this small (in bytes) are eligible
MAX_PER_TITLE = 3  # boilerplate titles ("gramastar", icon-set names) would otherwise dominate
UNTITLED = 6
EXTREME_ASPECT = 8  # longer side more than 3x the shorter one
TINY = 10  # both sides under 64 px
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Clip:
    index: int
    rel: str
    size: int
    width: int
    height: int
    title: str | None

    @property
    def key(self) -> str:
        return f"ocal-{self.index:06d}"

    @property
    def tiny(self) -> bool:
        return max(self.width, self.height) < 64

    @property
    def extreme(self) -> bool:
        return max(self.width, self.height) > 3 * max(1, min(self.width, self.height))


def png_info(data: bytes) -> tuple[int, int, dict[str, str]]:
    """Width, height and the text chunks of a PNG, read without decoding the pixels."""
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError("not a PNG")
    width, height = struct.unpack(">II", data[16:24])
    text: dict[str, str] = {}
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt":
            name, _, value = body.partition(b"\0")
            text[name.decode("latin-1")] = decode(value)
        elif kind == b"zTXt":
            name, _, rest = body.partition(b"\0")
            text[name.decode("latin-1")] = decode(zlib.decompress(rest[1:]))
        elif kind == b"iTXt":
            name, _, rest = body.partition(b"\0")
            compressed, rest = rest[0], rest[2:]
            _lang, _, rest = rest.partition(b"\0")
            _tkey, _, value = rest.partition(b"\0")
            text[name.decode("latin-1")] = decode(zlib.decompress(value) if compressed else value)
        elif kind == b"IEND":
            break
        pos += 12 + length
    return width, height, text


def decode(raw: bytes) -> str:
    # Inkscape wrote UTF-8 into tEXt (which the PNG spec says is Latin-1); honour what it wrote.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def catalogue() -> list[Clip]:
    paths = sorted(
        (p for p in SOURCE.rglob("*.png") if p.is_file() and not p.is_symlink()),
        key=lambda p: p.relative_to(SOURCE).as_posix(),
    )
    clips = []
    for index, path in enumerate(paths):
        data = path.read_bytes()
        width, height, text = png_info(data)
        title = text.get("Title")
        clips.append(
            Clip(
                index=index,
                rel=path.relative_to(SOURCE).as_posix(),
                size=len(data),
                width=width,
                height=height,
                title=title if title and title.strip() else None,
            )
        )
    return clips


def select(clips: list[Clip], rng: random.Random) -> list[Clip]:
    pool = [c for c in clips if c.size <= MAX_BYTES]
    chosen: dict[int, Clip] = {}
    quotas = (
        (UNTITLED, [c for c in pool if c.title is None]),
        (EXTREME_ASPECT, [c for c in pool if c.title and c.extreme]),
        (TINY, [c for c in pool if c.title and c.tiny and not c.extreme]),
    )
    for count, stratum in quotas:
        for clip in rng.sample(stratum, min(count, len(stratum))):
            chosen[clip.index] = clip
    per_title = Counter(c.title for c in chosen.values())
    rest = [c for c in pool if c.index not in chosen and c.title is not None]
    rng.shuffle(rest)
    for clip in rest:
        if len(chosen) >= SAMPLES:
            break
        if per_title[clip.title] < MAX_PER_TITLE:
            per_title[clip.title] += 1
            chosen[clip.index] = clip
    return sorted(chosen.values(), key=lambda c: c.index)


def keywords(rel: str) -> list[str]:
    words: list[str] = []
    for part in rel.split("/")[:-1]:
        word = " ".join(part.replace("_", " ").replace("-", " ").split()).lower()
        if word and word not in words:
            words.append(word)
    return words


def damage(data: bytes) -> bytes:
    """Cut the PNG in half and invert the start of its first IDAT (the zlib header)."""
    cut = bytearray(data[: len(data) // 2])
    start = cut.find(b"IDAT") + 4
    if start < 4 or start + 16 > len(cut):
        raise ValueError("no IDAT in the first half")
    cut[start : start + 16] = bytes(b ^ 0xFF for b in cut[start : start + 16])
    return bytes(cut)


def member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info, io.BytesIO(data)


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    ustar_ok = all(name.isascii() and len(name.encode()) <= 100 for name, _ in members)
    fmt = tarfile.USTAR_FORMAT if ustar_ok else tarfile.PAX_FORMAT
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            tar.addfile(*member(name, data))


def main() -> None:
    rng = random.Random(SEED)
    clips = select(catalogue(), rng)
    per = -(-len(clips) // SHARDS)
    shards = [clips[s * per : (s + 1) * per] for s in range(SHARDS)]
    ordinary = [
        c
        for c in shards[-1]
        if c.title
        and not (c.tiny or c.extreme)
        and 0 < (SOURCE / c.rel).read_bytes().find(b"IDAT") < c.size // 2 - 32
    ]
    damaged = rng.choice(ordinary).index
    OUT.mkdir(parents=True, exist_ok=True)
    for stale in OUT.glob("shard-*.tar"):
        stale.unlink()
    total = 0
    for s, shard in enumerate(shards):
        members: list[tuple[str, bytes]] = []
        for clip in shard:
            image = (SOURCE / clip.rel).read_bytes()
            meta: dict[str, object] = {
                "title": clip.title,
                "keywords": keywords(clip.rel),
                "category": clip.rel.split("/")[0],
                "license": "public-domain",
                "origin": f"/usr/share/openclipart/png/{clip.rel}",
            }
            if clip.index == damaged:
                image = damage(image)
                meta["damaged"] = True
            meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()
            members.append((f"{clip.key}.json", meta_bytes))
            members.append((f"{clip.key}.png", image))
            if clip.title is not None:
                members.append((f"{clip.key}.txt", clip.title.encode()))
        path = OUT / f"shard-{s:06d}.tar"
        write_shard(path, members)
        total += path.stat().st_size
    print(
        f"{len(clips)} samples in {SHARDS} shards, {total} bytes: "
        f"{sum(c.title is None for c in clips)} untitled, {sum(c.tiny for c in clips)} tiny, "
        f"{sum(c.extreme for c in clips)} extreme aspect, 1 damaged (ocal-{damaged:06d})"
    )


if __name__ == "__main__":
    main()
