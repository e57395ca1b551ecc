"""A persistent request cache, so that a resumed (or repeated) run does not ask again.

Design choices:

* **Append-only chunks, one writer each.**  Every :class:`RequestCache` instance
  writes only files of its own, ``root/<instance-uuid>-<seq:06d>.jsonl``, each
  written whole and atomically through :func:`curate.io.storage.write_bytes`
  (rename on disk, one ``PutObject`` on S3).  Any number of processes, Ray tasks
  or machines can therefore share one root, local or ``s3://``, without locks and
  without ever seeing a half-written chunk.  Nothing is rewritten or deleted.
* **Load everything on open.**  The constructor lists the root and reads every
  chunk into one dict (chunks are read by a few threads, which matters on S3).  A
  line that is not valid JSON or lacks the fields (a truncated or corrupted chunk,
  a foreign file) is skipped and counted in :attr:`RequestCache.corrupt_lines`,
  with one warning per chunk; loading never fails because of the cache's content.
  When the same key is in several chunks, the first chunk in URI order wins.
* **Only answers.**  Errors are never stored: a failed request is asked again on
  the next run.  Each line is ``{"key", "text", "prompt_tokens",
  "completion_tokens"}``; the key (:meth:`Request.key`) already contains the model
  fingerprint and every decoding setting, so a different model or setting misses.
* **Flushing.**  New answers are buffered and written as a chunk every
  ``flush_every`` answers and on :meth:`flush` / :meth:`close`.  A crash loses at
  most the unflushed buffer, which is simply asked again.
* **Pickling** (shipping a cache to a Ray worker) carries only the root and
  options: the copy reloads the chunks and writes under a fresh uuid, so two copies
  never write the same chunk name.

Many runs leave many small chunks; compacting them (write one merged chunk, delete
the old ones, while no writer is active) is left to an operator tool.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from curate.io import storage
from curate.io.storage import LOCAL, StorageOptions
from curate.mllm.backend import Answer, Backend, Request

log = logging.getLogger(__name__)

CHUNK_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class _Entry:
    text: str
    prompt_tokens: int
    completion_tokens: int


def _parse_line(line: bytes) -> tuple[str, _Entry] | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict):
        return None
    key, text = row.get("key"), row.get("text")
    prompt, completion = row.get("prompt_tokens", 0), row.get("completion_tokens", 0)
    if not isinstance(key, str) or not isinstance(text, str):
        return None
    if type(prompt) is not int or type(completion) is not int:
        return None
    return key, _Entry(text, prompt, completion)


class RequestCache:
    """Answers by request key, persisted as append-only JSONL chunks under ``root``."""

    def __init__(self, root: str, opts: StorageOptions = LOCAL, flush_every: int = 64) -> None:
        if flush_every < 1:
            raise ValueError("flush_every must be at least 1")
        storage.check_uri(root)
        self.root = root
        self.opts = opts
        self.flush_every = flush_every
        self.instance = uuid.uuid4().hex
        self._seq = 0
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._pending: list[tuple[str, _Entry]] = []
        #: Lines skipped while loading because they could not be parsed.
        self.corrupt_lines = 0
        #: Chunk files this instance wrote.
        self.chunks_written = 0
        self._load()

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "opts": self.opts, "flush_every": self.flush_every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["opts"], state["flush_every"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"RequestCache(root={self.root!r}, entries={len(self)})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __enter__(self) -> RequestCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- loading -------------------------------------------------------------------

    def _chunks(self) -> list[str]:
        uris = []
        for info in storage.list_prefix(self.root, self.opts):
            name = info.uri.rsplit("/", 1)[-1]
            if name.endswith(CHUNK_SUFFIX) and not name.startswith("."):
                uris.append(info.uri)
        return uris

    def _load(self) -> None:
        uris = self._chunks()
        if not uris:
            return
        if len(uris) == 1:
            blobs = [storage.read_bytes(uris[0], self.opts)]
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(uris))) as pool:
                blobs = list(pool.map(lambda uri: storage.read_bytes(uri, self.opts), uris))
        for uri, blob in zip(uris, blobs, strict=True):
            bad = 0
            for line in blob.splitlines():
                if not line.strip():
                    continue
                parsed = _parse_line(line)
                if parsed is None:
                    bad += 1
                    continue
                self._entries.setdefault(*parsed)
            if bad:
                self.corrupt_lines += bad
                log.warning("request cache: skipped %d unreadable line(s) in %s", bad, uri)

    # --- use -----------------------------------------------------------------------

    def get(self, key: str) -> Answer | None:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None:
            return None
        return Answer(
            text=entry.text,
            prompt_tokens=entry.prompt_tokens,
            completion_tokens=entry.completion_tokens,
            cached=True,
        )

    def put(self, key: str, answer: Answer) -> None:
        """Remember a successful answer (answers with an error are ignored)."""
        if answer.error is not None or answer.text is None:
            return
        entry = _Entry(answer.text, answer.prompt_tokens, answer.completion_tokens)
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = entry
            self._pending.append((key, entry))
            full = len(self._pending) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> None:
        """Write the buffered answers as one new chunk."""
        with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, []
            seq = self._seq
            self._seq += 1
        lines = [
            json.dumps(
                {
                    "key": key,
                    "text": entry.text,
                    "prompt_tokens": entry.prompt_tokens,
                    "completion_tokens": entry.completion_tokens,
                },
                ensure_ascii=False,
            )
            for key, entry in pending
        ]
        uri = storage.join(self.root, f"{self.instance}-{seq:06d}{CHUNK_SUFFIX}")
        try:
            storage.write_bytes(uri, ("\n".join(lines) + "\n").encode(), self.opts)
        except BaseException:
            with self._lock:  # keep them for the next flush
                self._pending[:0] = pending
            raise
        with self._lock:
            self.chunks_written += 1

    def close(self) -> None:
        self.flush()


class CachedBackend(Backend):
    """A backend that answers from a :class:`RequestCache` first and asks ``inner``
    only for the misses (each distinct miss once, all in one ``generate`` call)."""

    def __init__(self, inner: Backend, cache: RequestCache) -> None:
        self.inner = inner
        self.cache = cache
        self.fingerprint = inner.fingerprint
        self.hits = 0
        self.misses = 0

    @property
    def stats(self) -> dict[str, int]:
        """The inner backend's ``stats`` (when it has any) plus hits and misses."""
        inner = getattr(self.inner, "stats", None)
        out = dict(inner) if isinstance(inner, dict) else {}
        out.update(hits=self.hits, misses=self.misses, cache_corrupt_lines=self.cache.corrupt_lines)
        return out

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        keys = [request.key(self.fingerprint) for request in requests]
        answers: list[Answer | None] = [self.cache.get(key) for key in keys]
        todo: dict[str, list[int]] = {}
        for index, (key, answer) in enumerate(zip(keys, answers, strict=True)):
            if answer is None:
                todo.setdefault(key, []).append(index)
        self.hits += len(requests) - sum(len(v) for v in todo.values())
        self.misses += sum(len(v) for v in todo.values())
        if todo:
            positions = list(todo.values())
            fresh = self.inner.generate([requests[p[0]] for p in positions])
            if len(fresh) != len(positions):
                raise RuntimeError(
                    f"{type(self.inner).__name__}.generate returned {len(fresh)} answers "
                    f"for {len(positions)} requests"
                )
            for key, indexes, answer in zip(todo, positions, fresh, strict=True):
                self.cache.put(key, answer)
                for index in indexes:
                    answers[index] = answer
        done = [answer for answer in answers if answer is not None]
        assert len(done) == len(requests)
        return done

    def close(self) -> None:
        try:
            self.cache.close()
        finally:
            self.inner.close()
