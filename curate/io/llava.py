"""LLaVA-style conversation files: what a ``format: llava`` source reads and a
``format: llava`` sink writes (the parser is :class:`curate.io.readers.LlavaParser`,
the writer :func:`curate.io.sink.write_llava_sink`; the conversation schema is
:mod:`curate.conversations`).

A file is a ``.json`` array of samples (``.json.gz``/``.json.zst`` too) or a
``.jsonl`` file of one sample per line (plain, ``.gz`` or ``.zst``).  A sample::

    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is ..."},
                       {"from": "gpt", "value": "..."}]}

``image`` is a path relative to the source's ``image_root`` (default: the folder
of the file), ``{"bytes": <base64>}``, or a one-element list of either.  Image
paths are untrusted: one that is absolute, holds ``..``, or resolves outside
the root through a symlink is rejected before anything is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
from typing import Any

import pyarrow as pa

from curate.conversations import CONVERSATION_TYPE
from curate.io import storage
from curate.io.webdataset import _json_default, safe_key, unsafe_name

#: Columns a LLaVA source adds beside the reserved ones.
LLAVA_COLUMNS: dict[str, pa.DataType] = {
    "conversations": CONVERSATION_TYPE,
    "image": pa.binary(),
    "image_url": pa.string(),
    "image_source": pa.string(),
}
#: Keys of a sample the parser reads (besides ``id_column`` and declared ``columns``).
SAMPLE_KEYS = ("conversations", "image", "image_source", "data_source")
#: Keys of a turn (``normalize`` reads one of each pair).
TURN_KEYS = frozenset({"from", "role", "value", "content"})

_ARRAY = (".json", ".json.gz", ".json.zst")
_LINES = (".jsonl", ".jsonl.gz", ".jsonl.zst")


def file_layout(path: str) -> str | None:
    """``array`` for a ``.json`` file, ``lines`` for ``.jsonl``, None for anything else."""
    lower = path.lower()
    if lower.endswith(_ARRAY):
        return "array"
    if lower.endswith(_LINES):
        return "lines"
    return None


def image_root(root: str | None, base_dir: str, shard_path: str) -> str:
    """The folder (or ``s3://`` prefix) a shard's image paths are relative to: ``root``
    (a relative one against ``base_dir``, the pipeline file's folder, as source URIs
    are), or the folder holding the shard."""
    if root is None:
        if storage.is_s3(shard_path):
            return shard_path.rsplit("/", 1)[0]
        return os.path.dirname(os.path.abspath(shard_path))
    if storage.is_s3(root) or os.path.isabs(root):
        return root
    return os.path.abspath(os.path.join(base_dir, root))


def image_reference(value: Any) -> tuple[str, Any] | None:
    """What a sample's ``image`` field holds: None (no image), ``("path", str)``,
    ``("bytes", str)`` (base64 text) or ``("error", (reason, detail))``."""
    if isinstance(value, list):
        if len(value) > 1:
            return "error", ("multi_image", f"{len(value)} images; one per sample is supported")
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            return "error", ("bad_image_ref", "empty image path")
        return "path", value
    if isinstance(value, dict) and set(value) == {"bytes"}:
        if not isinstance(value["bytes"], str):
            kind = type(value["bytes"]).__name__
            return "error", ("bad_image_bytes", f"'bytes' is {kind}, not base64 text")
        return "bytes", value["bytes"]
    shown = sorted(value)[:5] if isinstance(value, dict) else type(value).__name__
    return "error", (
        "bad_image_ref",
        f"expected a path, {{'bytes': <base64>}} or a list of one, got {shown}",
    )


def unsafe_path(path: str) -> tuple[str, str] | None:
    """(``unsafe_path``, detail) for an image path that is absolute or climbs with
    ``..`` (checked on the text alone, no file is touched), else None."""
    why = unsafe_name(path)
    return None if why is None else ("unsafe_path", f"image path {path[:200]!r}: {why}")


def resolve_image(root: str, path: str, real_root: str | None) -> str | tuple[str, str]:
    """Where to read image ``path`` of ``root``, or (``unsafe_path``, detail).

    ``real_root`` is ``os.path.realpath(root)`` for a local root (None on S3): the
    resolved target, symlinks followed, must lie inside it.
    """
    unsafe = unsafe_path(path)
    if unsafe is not None:
        return unsafe
    if storage.is_s3(root):
        return posixpath.join(root.rstrip("/"), posixpath.normpath(path.replace("\\", "/")))
    assert real_root is not None
    target = os.path.realpath(os.path.join(real_root, path))
    if os.path.commonpath([real_root, target]) != real_root:
        return "unsafe_path", f"image path {path[:200]!r} resolves outside image_root"
    return target


# --- writing -------------------------------------------------------------------------

_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def image_name(record_id: str, used: set[str], position: int) -> str:
    """A file name (without extension) for the image of ``record_id``: the id itself when
    :func:`safe_key` accepts it, with characters outside ``[A-Za-z0-9_-]`` turned into
    ``_`` (one flat folder, nothing can climb out); else ``id-`` and a hash of the id.
    A name already in ``used`` (compared without case) gets ``-<position>``."""
    if safe_key(record_id) is None:
        name = _NAME_CHARS.sub("_", record_id)[:120]
    else:
        name = "id-" + hashlib.sha256(record_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    candidate, n = name, 0
    while candidate.lower() in used:
        n += 1
        candidate = f"{name}-{position}" if n == 1 else f"{name}-{position}-{n}"
    used.add(candidate.lower())
    return candidate


def llava_json(entries: list[dict[str, Any]]) -> bytes:
    """A LLaVA file: the entries as one JSON array, keys in the given order, UTF-8 text
    (not ``\\u`` escapes), indented by 2 like LLaVA's own files.  Dates and times are
    written as ISO text, decimals as text; NaN or infinity is a ValueError."""
    text = json.dumps(entries, ensure_ascii=False, indent=2, allow_nan=False, default=_json_default)
    return (text + "\n").encode("utf-8")
