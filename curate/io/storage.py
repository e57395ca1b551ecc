"""One storage interface for local disk and S3 (or any S3-compatible store).

Every reader and writer of curate goes through these functions, so sources,
sinks, rejects, manifests, commit logs and the stage cache all work on
``s3://bucket/prefix`` as on a local folder.

S3 uses boto3 with the standard AWS credential chain (environment, shared
config and credentials files, instance or container roles); an S3-compatible
store is reached through ``endpoint_url`` (the pipeline's ``storage.s3``
block, or boto3's own ``AWS_ENDPOINT_URL``).  Credentials are never taken
from a URI or a pipeline file, so they cannot reach a log or a manifest; a
URI carrying ``user:secret@`` is refused without echoing it.

Writes are atomic: a local file is written under a hidden temporary name,
fsynced and renamed; an S3 object is one ``PutObject``, or for large data a
multipart upload that becomes visible only when completed; an upload that
fails is aborted, and one whose writer dies stays invisible (``abort_stale``
clears it on the next ``--resume`` or ``--overwrite``).
"""

from __future__ import annotations

import functools
import glob
import io
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class StorageError(OSError):
    """A storage operation failed; the message names the URI and never a credential."""


class MissingObjectError(StorageError, FileNotFoundError):
    """The S3 object does not exist (``NoSuchKey``/404): a ``FileNotFoundError`` like a
    missing local file."""


@dataclass(frozen=True)
class StorageOptions:
    """How to reach S3; picklable, travels with every task that touches storage."""

    endpoint_url: str | None = None
    region: str | None = None
    #: Objects at least this big are written with a multipart upload.
    multipart_threshold: int = 64 * 2**20
    #: Size of each part of a multipart upload (S3's minimum is 5 MiB).
    part_size: int = 16 * 2**20


LOCAL = StorageOptions()


@dataclass(frozen=True)
class FileInfo:
    """A listed file: its URI, size, and a change fingerprint (mtime or ETag)."""

    uri: str
    size: int
    version: str


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def check_uri(uri: str) -> None:
    """Refuse URIs this module cannot serve, and any URI that carries credentials."""
    if "://" not in uri:
        return
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        raise StorageError(
            f"{parts.scheme}://...: unsupported storage scheme (use s3:// or a path)"
        )
    if "@" in parts.netloc:
        raise StorageError(
            "s3:// URI with user information refused: credentials belong in the AWS "
            "credential chain (environment, ~/.aws), never in a URI"
        )
    if len(parts.netloc) < 3:
        raise StorageError(f"{uri}: not a valid S3 bucket name")


def split_s3(uri: str) -> tuple[str, str]:
    check_uri(uri)
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


def join(root: str, *parts: str) -> str:
    if is_s3(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def relative(path: str, root: str) -> str:
    if is_s3(root):
        return posixpath.relpath(path[len("s3://") :], root[len("s3://") :])
    return os.path.relpath(path, root)


@functools.lru_cache(maxsize=8)
def _client(endpoint_url: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 5, "mode": "standard"}, max_pool_connections=32)
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def client(opts: StorageOptions) -> Any:
    """The (per process, cached) boto3 S3 client for ``opts``."""
    try:
        return _client(opts.endpoint_url, opts.region)
    except ValueError:  # botocore echoes the endpoint: say which setting, not its value
        raise StorageError(
            "cannot create an S3 client: storage.s3.endpoint_url is invalid"
        ) from None


def _s3_error(uri: str, action: str, exc: Exception) -> StorageError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
    if code in ("NoSuchKey", "404", "NotFound"):
        return MissingObjectError(f"{uri}: cannot {action} ({code})")
    return StorageError(f"{uri}: cannot {action} ({code})")


def _botocore_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


# --- reading -----------------------------------------------------------------------


def read_bytes(uri: str, opts: StorageOptions = LOCAL) -> bytes:
    if not is_s3(uri):
        with open(uri, "rb") as handle:
            return handle.read()
    bucket, key = split_s3(uri)
    try:
        body = client(opts).get_object(Bucket=bucket, Key=key)["Body"]
        data: bytes = body.read()
    except _botocore_errors() as exc:
        raise _s3_error(uri, "read", exc) from None
    return data


class _S3Reader(io.RawIOBase):
    """A seekable read-only view of an S3 object through ranged GETs."""

    def __init__(self, uri: str, opts: StorageOptions, size: int) -> None:
        self.uri = uri
        self.bucket, self.key = split_s3(uri)
        self.opts = opts
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.pos >= self.size or not len(view):
            return 0
        end = min(self.size, self.pos + len(view)) - 1
        try:
            body = client(self.opts).get_object(
                Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-{end}"
            )["Body"]
            data = body.read()
        except _botocore_errors() as exc:
            raise _s3_error(self.uri, "read", exc) from None
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)


def open_input(uri: str, opts: StorageOptions = LOCAL) -> io.BufferedIOBase:
    """A seekable binary file for reading (ranged GETs on S3: Parquet footers stay cheap)."""
    if not is_s3(uri):
        return open(uri, "rb")
    return io.BufferedReader(_S3Reader(uri, opts, stat(uri, opts).size), buffer_size=1 << 20)


def stat(uri: str, opts: StorageOptions = LOCAL) -> FileInfo:
    if not is_s3(uri):
        return _local_info(uri, os.stat(uri))
    bucket, key = split_s3(uri)
    try:
        head = client(opts).head_object(Bucket=bucket, Key=key)
    except _botocore_errors() as exc:
        raise _s3_error(uri, "stat", exc) from None
    return FileInfo(uri, int(head["ContentLength"]), f"etag:{head['ETag'].strip(chr(34))}")


def _local_info(path: str, st: os.stat_result) -> FileInfo:
    """ctime and inode with mtime: a rewrite that restores the mtime (``cp -p``,
    ``rsync -a``) still changes the ctime, so it changes the fingerprint."""
    return FileInfo(path, st.st_size, f"mtime:{st.st_mtime_ns}:ctime:{st.st_ctime_ns}:{st.st_ino}")


def exists(uri: str, opts: StorageOptions = LOCAL) -> bool:
    if not is_s3(uri):
        return os.path.exists(uri)
    try:
        stat(uri, opts)
    except StorageError:
        return False
    return True


def list_prefix(root: str, opts: StorageOptions = LOCAL) -> list[FileInfo]:
    """Every file under ``root`` (recursively), sorted by URI."""
    if not is_s3(root):
        base = Path(root)
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            if path.is_file():
                found.append(_local_info(str(path), path.stat()))
        return sorted(found, key=lambda f: f.uri)
    bucket, key = split_s3(root)
    return sorted(_list_s3(bucket, _folder(key), opts), key=lambda f: f.uri)


def _folder(key: str) -> str:
    """The listing prefix of the folder ``key`` names: ``a/b`` -> ``a/b/``; the bucket
    root (an empty key) -> ``""``, never ``"/"``."""
    key = key.rstrip("/")
    return key + "/" if key else ""


def _list_s3(bucket: str, prefix: str, opts: StorageOptions) -> Iterator[FileInfo]:
    try:
        pages = client(opts).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                etag = str(obj["ETag"]).strip('"')
                yield FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), f"etag:{etag}")
    except _botocore_errors() as exc:
        raise _s3_error(f"s3://{bucket}/{prefix}", "list", exc) from None


# --- globs and brace ranges ----------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
GLOB_CHARS = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as the webdataset library does it: ``{000..099}`` (zero padding
    kept), ``{a,b}`` alternatives, several groups; ``{}`` without a range or comma
    stays literal."""
    match = next(
        (m for m in _BRACE.finditer(pattern) if "," in m.group(1) or _RANGE.match(m.group(1))),
        None,
    )
    if match is None:
        return [pattern]
    body = match.group(1)
    ranged = _RANGE.match(body)
    if ranged:
        lo, hi = ranged.group(1), ranged.group(2)
        width = len(lo) if lo.lstrip("-").startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [e for c in choices for e in expand_braces(f"{head}{c}{tail}")]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """``*`` and ``?`` stay inside one path segment, ``**/`` spans any number."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 1 :]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def glob_files(pattern: str, opts: StorageOptions = LOCAL) -> list[FileInfo] | None:
    """Files matching one (brace-free) pattern; None when the pattern names a single
    path that is neither a file nor a folder (the caller reports it)."""
    if not is_s3(pattern):
        if os.path.exists(pattern):
            return None
        return [stat(p) for p in sorted(glob.glob(pattern, recursive=True)) if os.path.isfile(p)]
    bucket, key = split_s3(pattern)
    wild = GLOB_CHARS.search(key)
    if wild is None or exists(pattern, opts):  # a key may hold '[' literally
        return None
    prefix = key[: wild.start()]
    prefix = prefix[: prefix.rfind("/") + 1]
    try:
        regex = _glob_regex(key)
    except re.error as exc:
        raise StorageError(f"{pattern}: not a valid glob pattern ({exc})") from None
    return [f for f in _list_s3(bucket, prefix, opts) if regex.match(split_s3(f.uri)[1])]


# --- writing -----------------------------------------------------------------------


def write_bytes(uri: str, data: bytes, opts: StorageOptions = LOCAL) -> None:
    """Write ``data`` atomically: readers see the old state or all of ``data``."""
    check_uri(uri)
    if not is_s3(uri):
        _write_local(uri, data)
        return
    bucket, key = split_s3(uri)
    s3 = client(opts)
    try:
        if len(data) < opts.multipart_threshold:
            s3.put_object(Bucket=bucket, Key=key, Body=data)
            return
    except _botocore_errors() as exc:
        raise _s3_error(uri, "write", exc) from None
    multipart_upload(
        uri, (data[i : i + opts.part_size] for i in range(0, len(data), opts.part_size)), opts
    )


def multipart_upload(uri: str, parts: Iterator[bytes], opts: StorageOptions = LOCAL) -> None:
    """Upload ``parts`` as one object that appears only once every part is in.

    Any failure, in S3 or in the code producing the parts, aborts the upload;
    a writer that is killed leaves an incomplete upload, invisible to readers.
    """
    bucket, key = split_s3(uri)
    s3 = client(opts)
    try:
        upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    except _botocore_errors() as exc:
        raise _s3_error(uri, "start an upload to", exc) from None
    try:
        done = []
        for number, part in enumerate(parts, start=1):
            etag = s3.upload_part(
                Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=part
            )["ETag"]
            done.append({"ETag": etag, "PartNumber": number})
        s3.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": done}
        )
    except BaseException as exc:
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        except _botocore_errors():
            pass  # the upload stays incomplete, so still invisible
        if isinstance(exc, _botocore_errors()):
            raise _s3_error(uri, "write", exc) from None
        raise


def _write_local(path: str, data: bytes) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy(src: str, dst: str, opts: StorageOptions = LOCAL) -> None:
    if is_s3(src) and is_s3(dst):
        sb, sk = split_s3(src)
        db, dk = split_s3(dst)
        try:
            client(opts).copy({"Bucket": sb, "Key": sk}, db, dk)
        except _botocore_errors() as exc:
            raise _s3_error(dst, "copy to", exc) from None
        return
    write_bytes(dst, read_bytes(src, opts), opts)


def remove_tree(root: str, opts: StorageOptions = LOCAL, keep: tuple[str, ...] = ()) -> None:
    """Delete everything under ``root`` except the top-level entries named in ``keep``."""
    if not is_s3(root):
        base = Path(root)
        if not base.exists():
            return
        for entry in base.iterdir():
            if entry.name in keep:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return
    bucket, key = split_s3(root)
    prefix = _folder(key)
    kept = tuple(prefix + k + "/" for k in keep)
    doomed = [split_s3(f.uri)[1] for f in _list_s3(bucket, prefix, opts)]
    doomed = [k for k in doomed if not (kept and k.startswith(kept))]
    s3 = client(opts)
    try:
        for i in range(0, len(doomed), 1000):
            batch = [{"Key": k} for k in doomed[i : i + 1000]]
            s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    except _botocore_errors() as exc:
        raise _s3_error(root, "delete under", exc) from None


def abort_stale(root: str, opts: StorageOptions = LOCAL) -> int:
    """Clear what killed writers left under ``root``: temporary files on disk, incomplete
    multipart uploads on S3.  Returns how many were cleared."""
    if not is_s3(root):
        stale = (
            [p for p in Path(root).rglob(".*.tmp-*") if p.is_file()] if Path(root).is_dir() else []
        )
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)
    bucket, key = split_s3(root)
    s3 = client(opts)
    cleared = 0
    try:
        pages = s3.get_paginator("list_multipart_uploads").paginate(
            Bucket=bucket, Prefix=_folder(key)
        )
        for page in pages:
            for upload in page.get("Uploads", []):
                s3.abort_multipart_upload(
                    Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                )
                cleared += 1
    except _botocore_errors() as exc:
        raise _s3_error(root, "clear incomplete uploads under", exc) from None
    return cleared
