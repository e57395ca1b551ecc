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

Every S3 request is retried here (botocore's own retries are off, so there is
one budget): throttling (503 ``SlowDown``), server errors (5xx), dropped or
refused connections and truncated bodies get up to ``max_attempts`` attempts
with exponential back-off and jitter; a GET is retried with its body read, so a
body cut off mid-way is fetched again, never returned short.  Every retried
request is idempotent (a PUT of the same bytes, a part number, a delete); a
completion whose answer was lost is recognized by the object's multipart ETag.
A request that keeps failing, or fails for good (403, 404), raises a one-line
:class:`StorageError` naming the URI and S3's error code: never a credential,
a header or a signed URL, which is also all a retry logs.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import io
import logging
import os
import posixpath
import random
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

log = logging.getLogger(__name__)
T = TypeVar("T")


class StorageError(OSError):
    """A storage operation failed; the message names the URI and never a credential."""

    #: S3's error code (``SlowDown``, ``NoSuchKey``) or the failure's kind
    #: (``ConnectionClosedError``); None for local files.
    code: str | None = None


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
    #: Attempts per S3 request, the first included, while it fails transiently.
    max_attempts: int = 8
    #: Back-off before the first retry, doubled for each further one up to
    #: ``max_backoff_s``; each wait is drawn between half and all of it (jitter).
    backoff_s: float = 0.1
    max_backoff_s: float = 10.0


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

    # One attempt per call: _retrying retries every request, bodies included, with the
    # pipeline's budget and back-off (botocore's retries would multiply the attempts).
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, max_pool_connections=32)
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


class _TransientError(Exception):
    """A failure S3 answered with 200: a body shorter than announced, per-key errors of
    a batch delete."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


#: S3 error codes worth another attempt: throttling and transient server states.
_RETRY_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "IncompleteBody",
    }
)


def _code(exc: BaseException) -> str:
    """S3's error code, else the failure's class name: never its message (botocore's
    messages carry the endpoint URL, and could carry a signed one)."""
    if isinstance(exc, _TransientError):
        return exc.code
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return str(code) if code else type(exc).__name__


def _s3_error(uri: str, action: str, exc: BaseException, attempts: int = 1) -> StorageError:
    code = _code(exc)
    after = f" after {attempts} attempts" if attempts > 1 else ""
    kind = MissingObjectError if code in ("NoSuchKey", "404", "NotFound") else StorageError
    error = kind(f"{uri}: cannot {action} ({code}{after})")
    error.code = code
    return error


def _botocore_errors() -> tuple[type[BaseException], ...]:
    """What an S3 call can raise: botocore's errors, and transport errors that escape
    it while a body is read."""
    import http.client

    from botocore.exceptions import BotoCoreError, ClientError
    from botocore.parsers import ResponseParserError
    from urllib3.exceptions import HTTPError

    return (
        BotoCoreError,
        ClientError,
        ResponseParserError,
        HTTPError,
        http.client.HTTPException,
        ConnectionError,
    )


def _retryable(exc: BaseException) -> bool:
    from botocore.exceptions import (
        BotoCoreError,
        ChecksumError,
        ClientError,
        FlexibleChecksumError,
        HTTPClientError,
        IncompleteReadError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return _code(exc) in _RETRY_CODES or status == 429 or status >= 500
    if isinstance(exc, _TransientError):
        return exc.code in _RETRY_CODES
    if isinstance(exc, BotoCoreError):  # not: no credentials, invalid parameters
        return isinstance(
            exc,
            (
                BotoConnectionError,  # refused, timed out
                HTTPClientError,  # closed before or while answering, read timeout
                IncompleteReadError,  # a body shorter than its Content-Length
                ChecksumError,
                FlexibleChecksumError,
            ),
        )
    return True  # a transport error from under botocore, an unparsable (cut) XML answer


_jitter = random.Random()  # back-off only: no output depends on it


def _backoff(opts: StorageOptions, attempt: int) -> float:
    ceiling = min(opts.max_backoff_s, opts.backoff_s * 2.0 ** (attempt - 1))
    return ceiling * (0.5 + 0.5 * _jitter.random())


def _retrying(uri: str, action: str, opts: StorageOptions, call: Callable[[], T]) -> T:
    """``call()``, again after a back-off while it fails transiently, at most
    ``opts.max_attempts`` times in all; then (or at once for a permanent failure) a
    one-line StorageError naming ``uri`` and the error code."""
    caught: tuple[type[BaseException], ...] = (*_botocore_errors(), _TransientError)
    attempt = 1
    while True:
        try:
            return call()
        except caught as exc:
            if attempt >= opts.max_attempts or not _retryable(exc):
                raise _s3_error(uri, action, exc, attempt) from None
            delay = _backoff(opts, attempt)
            log.log(
                logging.WARNING if attempt >= 2 else logging.DEBUG,
                "%s: cannot %s (%s), attempt %d of %d; retrying in %.2f s",
                uri,
                action,
                _code(exc),
                attempt,
                opts.max_attempts,
                delay,
            )
        time.sleep(delay)
        attempt += 1


# --- reading -----------------------------------------------------------------------


def read_bytes(uri: str, opts: StorageOptions = LOCAL) -> bytes:
    if not is_s3(uri):
        with open(uri, "rb") as handle:
            return handle.read()
    bucket, key = split_s3(uri)
    return _retrying(uri, "read", opts, functools.partial(_get, client(opts), bucket, key))


def _get(s3: Any, bucket: str, key: str, **extra: str) -> bytes:
    """One GET, its body read whole: a body cut off is an error, retried with the GET."""
    response = s3.get_object(Bucket=bucket, Key=key, **extra)
    data: bytes = response["Body"].read()
    if len(data) != int(response.get("ContentLength", len(data))):
        raise _TransientError("IncompleteBody")
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
        ranged = functools.partial(
            _get, client(self.opts), self.bucket, self.key, Range=f"bytes={self.pos}-{end}"
        )
        data = _retrying(self.uri, "read", self.opts, ranged)
        if len(data) != end + 1 - self.pos:  # the object changed since it was opened
            raise StorageError(f"{self.uri}: cannot read (object size changed)")
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
    head = _retrying(
        uri, "stat", opts, functools.partial(client(opts).head_object, Bucket=bucket, Key=key)
    )
    return FileInfo(uri, int(head["ContentLength"]), f"etag:{head['ETag'].strip(chr(34))}")


def _local_info(path: str, st: os.stat_result) -> FileInfo:
    """ctime and inode with mtime: a rewrite that restores the mtime (``cp -p``,
    ``rsync -a``) still changes the ctime, so it changes the fingerprint."""
    return FileInfo(path, st.st_size, f"mtime:{st.st_mtime_ns}:ctime:{st.st_ctime_ns}:{st.st_ino}")


def exists(uri: str, opts: StorageOptions = LOCAL) -> bool:
    """Whether ``uri`` is a file; an S3 error other than a 404 is raised, never taken
    for an absent object (a commit or decisions file misread as missing loses rows)."""
    if not is_s3(uri):
        return os.path.exists(uri)
    try:
        stat(uri, opts)
    except MissingObjectError:
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
    """Page by page, each page retried on its own (a retry never repeats a file)."""
    s3 = client(opts)
    query = {"Bucket": bucket, "Prefix": prefix}
    while True:
        call = functools.partial(s3.list_objects_v2, **query)
        page = _retrying(f"s3://{bucket}/{prefix}", "list", opts, call)
        for obj in page.get("Contents", []):
            etag = str(obj["ETag"]).strip('"')
            yield FileInfo(f"s3://{bucket}/{obj['Key']}", int(obj["Size"]), f"etag:{etag}")
        if not page.get("IsTruncated"):
            return
        query["ContinuationToken"] = page["NextContinuationToken"]


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
    if len(data) < opts.multipart_threshold:
        put = functools.partial(client(opts).put_object, Bucket=bucket, Key=key, Body=data)
        _retrying(uri, "write", opts, put)
        return
    multipart_upload(
        uri, (data[i : i + opts.part_size] for i in range(0, len(data), opts.part_size)), opts
    )


def multipart_upload(uri: str, parts: Iterator[bytes], opts: StorageOptions = LOCAL) -> None:
    """Upload ``parts`` as one object that appears only once every part is in.

    Any failure, in S3 or in the code producing the parts, aborts the upload;
    a writer that is killed leaves an incomplete upload, invisible to readers.
    A start whose answer was lost leaves an upload nobody completes: invisible too,
    and cleared with the killed writers' by ``abort_stale``.
    """
    bucket, key = split_s3(uri)
    s3 = client(opts)
    start = functools.partial(s3.create_multipart_upload, Bucket=bucket, Key=key)
    upload = _retrying(uri, "start an upload to", opts, start)["UploadId"]
    try:
        done = []
        for number, part in enumerate(parts, start=1):
            send = functools.partial(
                s3.upload_part,
                Bucket=bucket,
                Key=key,
                UploadId=upload,
                PartNumber=number,
                Body=part,
            )
            done.append({"ETag": _retrying(uri, "write", opts, send)["ETag"], "PartNumber": number})
        finish = functools.partial(
            s3.complete_multipart_upload,
            Bucket=bucket,
            Key=key,
            UploadId=upload,
            MultipartUpload={"Parts": done},
        )
        try:
            _retrying(uri, "write", opts, finish)
        except StorageError as exc:
            # A completion that succeeded but whose answer was lost: its retry finds
            # no upload, and the object carries the ETag of exactly these parts.
            if exc.code != "NoSuchUpload" or not _completed(uri, done, opts):
                raise
    except BaseException:
        _abort(uri, upload, opts)  # the upload stays incomplete, so invisible, if it fails
        raise


def _completed(uri: str, parts: list[dict[str, Any]], opts: StorageOptions) -> bool:
    """Whether ``uri`` is the multipart object made of ``parts`` (S3's multipart ETag:
    the MD5 of the parts' MD5s, then the part count)."""
    digests = b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts)
    expected = f"etag:{hashlib.md5(digests, usedforsecurity=False).hexdigest()}-{len(parts)}"
    try:
        return stat(uri, opts).version == expected
    except StorageError:
        return False


def _abort(uri: str, upload: str, opts: StorageOptions) -> bool:
    """Abort a multipart upload (retried; one already gone counts as aborted); False
    when S3 keeps refusing: the upload then stays pending, still invisible."""
    bucket, key = split_s3(uri)
    call = functools.partial(
        client(opts).abort_multipart_upload, Bucket=bucket, Key=key, UploadId=upload
    )
    try:
        _retrying(uri, "abort the upload to", opts, call)
    except StorageError as exc:
        return exc.code == "NoSuchUpload"
    return True


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
        source = {"Bucket": sb, "Key": sk}
        s3 = client(opts)
        if stat(src, opts).size <= 5 * 2**30:  # one CopyObject: atomic and idempotent
            call = functools.partial(s3.copy_object, CopySource=source, Bucket=db, Key=dk)
        else:  # boto3's managed multipart copy, which aborts what it does not complete
            call = functools.partial(s3.copy, source, db, dk)
        _retrying(dst, "copy to", opts, call)
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
    for i in range(0, len(doomed), 1000):
        batch = doomed[i : i + 1000]
        _retrying(root, "delete under", opts, functools.partial(_delete, opts, bucket, batch))


def _delete(opts: StorageOptions, bucket: str, keys: list[str]) -> None:
    """Delete ``keys``; the keys S3 reports it could not delete stay in ``keys`` (for the
    retry) and raise their error code (DeleteObjects answers 200 with per-key errors)."""
    objects = [{"Key": k} for k in keys]
    answer = client(opts).delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
    errors = answer.get("Errors") or []
    keys[:] = [e["Key"] for e in errors]
    if errors:
        raise _TransientError(str(errors[0].get("Code", "DeleteError")))


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
    query = {"Bucket": bucket, "Prefix": _folder(key)}
    cleared = 0
    while True:
        call = functools.partial(s3.list_multipart_uploads, **query)
        page = _retrying(root, "list incomplete uploads under", opts, call)
        for upload in page.get("Uploads", []):
            if not _abort(f"s3://{bucket}/{upload['Key']}", upload["UploadId"], opts):
                raise StorageError(f"{root}: cannot clear incomplete uploads under it")
            cleared += 1
        if not page.get("IsTruncated"):
            return cleared
        query.update(KeyMarker=page["NextKeyMarker"], UploadIdMarker=page["NextUploadIdMarker"])
