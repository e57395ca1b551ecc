"""A :class:`~curate.mllm.backend.Backend` for an OpenAI-compatible chat-completions
endpoint (vLLM, SGLang, TGI, or :mod:`curate.mllm.serve`), and its completions
endpoint for raw requests.

Design choices:

* **Bounded concurrency.**  ``generate`` fans the requests out over a thread pool of
  ``concurrency`` workers (created on first use, kept for the backend's life) and
  collects the answers in request order.  Each worker thread has its own
  ``requests.Session`` so connections are kept alive without sharing a session
  between threads.  The pool and the sessions are dropped when the backend is
  pickled (a Ray task or actor gets a fresh, lazily started pool).
* **Retries.**  Connection errors, timeouts and HTTP 408/429/5xx are retried up to
  ``retries`` times.  The wait before retry ``n`` (0-based) is
  ``min(max_backoff_s, backoff_s * 2**n)``, scaled into ``[1/2, 1]`` of that by a
  jitter drawn from a hash of the request key and ``n``: clients spread out their
  retries, yet a rerun waits exactly the same.  A ``Retry-After`` header given in
  seconds lengthens the wait to at least that (still capped at ``max_backoff_s``;
  HTTP-date values are ignored).  Any other 4xx is final at once.
* **No exception per request.**  After the last attempt the answer is
  ``Answer(text=None, error="http_error: <status or exception class>: <detail>")``;
  the detail is at most about 200 characters, never the whole body, and any
  occurrence of the API key is masked.  A 200 whose body is not the expected JSON
  is an error answer too (not retried: it is the server's answer, not a transient).
* **Credentials.**  ``api_key_env`` names an environment variable, read at call
  time; the key goes only into the ``Authorization: Bearer`` header.  It is not
  stored on the object, so it cannot reach ``repr()``, a pickle, the fingerprint or
  a log line.  A ``base_url`` carrying ``user:password@`` is refused, without echoing
  it, because the URL is part of the fingerprint that goes into manifests.
* **Guided decoding.**  With ``guided="vllm"`` a ``Request.regex`` is sent both as
  vLLM's current ``"structured_outputs": {"regex": ...}`` and as the legacy
  ``"guided_regex"`` field (vLLM ignores fields it does not know).  SGLang takes a
  top-level ``"regex"`` instead; it is not sent (keep it simple: serve SGLang with
  ``guided="none"`` or add the field when needed).  ``guided="none"`` sends no
  constraint at all.
* **Statistics.**  ``stats`` counts ``requests`` (logical requests), ``attempts``
  (HTTP calls), ``retries``, ``errors`` (requests answered with an error) and the
  ``prompt_tokens`` / ``completion_tokens`` the server reported, for the manifest.
* **Raw requests.**  A ``Request`` with ``raw`` set is a plain completion: it is
  POSTed to ``{base_url}/completions`` as ``{"model", "prompt", "max_tokens",
  "temperature", "seed", "add_special_tokens": false}`` (plus the guided-decoding
  fields above when it has a regex) and the answer is ``choices[0].text``.
  ``add_special_tokens: false`` is vLLM's extra parameter (its default is true,
  which would put a second BOS before a prompt that starts with a literal
  ``<s>``); it makes the prompt the model's whole input, as the in-process backend
  does.  Retries, back-off, timeouts, error answers, statistics and usage are those
  of chat requests.  A raw request with a system message or an image (or an empty
  prompt) is an error answer (``bad_request: ...``), counted in ``requests`` and
  ``errors``, and never sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal
from urllib.parse import urlsplit

import requests

from curate.mllm.backend import Answer, Backend, Request, raw_problem

log = logging.getLogger(__name__)

#: Status codes worth asking again: timeout, rate limit, server errors.
RETRY_STATUS = frozenset({408, 429})
DETAIL_CHARS = 200

_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes, from their magic number."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return f"image/{kind}"
    return "application/octet-stream"


def data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def build_messages(request: Request) -> list[dict[str, Any]]:
    """The chat ``messages`` for one request (an image part comes before the text)."""
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        messages.append({"role": "system", "content": request.system})
    if request.image is None:
        messages.append({"role": "user", "content": request.prompt})
    else:
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(request.image)}},
                    {"type": "text", "text": request.prompt},
                ],
            }
        )
    return messages


def backoff_delay(key: str, attempt: int, base: float, cap: float) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): exponential, capped, with a
    jitter in [1/2, 1] derived from ``key`` so that reruns wait the same."""
    ceiling = min(cap, base * 2.0**attempt)
    digest = hashlib.sha256(f"{key}:{attempt}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2.0**64
    return ceiling * (0.5 + 0.5 * fraction)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # an HTTP-date: not honoured
    return max(0.0, seconds)


def _short(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


class _AttemptError(Exception):
    """One failed attempt: what to report and whether to try again."""

    def __init__(self, label: str, detail: str, retry: bool, wait: float | None = None) -> None:
        super().__init__(label)
        self.label = label
        self.detail = detail
        self.retry = retry
        self.wait = wait


class OpenAIBackend(Backend):
    """Chat completions from an OpenAI-compatible HTTP endpoint."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        guided: Literal["vllm", "none"] = "vllm",
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("base_url must be an http:// or https:// URL")
        if "@" in parts.netloc:
            raise ValueError(
                "base_url with user information refused: pass the key through api_key_env"
            )
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if retries < 0:
            raise ValueError("retries must be at least 0")
        if guided not in ("vllm", "none"):
            raise ValueError("guided must be 'vllm' or 'none'")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.guided = guided
        self.fingerprint = f"openai:{self.base_url}:{model}"
        self.url = f"{self.base_url}/chat/completions"
        #: Where raw (plain completion) requests go.
        self.completions_url = f"{self.base_url}/completions"
        self.stats: dict[str, int] = {
            "requests": 0,
            "attempts": 0,
            "retries": 0,
            "errors": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
        }
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._sessions: list[requests.Session] = []

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_lock", "_pool", "_local", "_sessions"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (
            f"OpenAIBackend(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={self.api_key_env!r}, concurrency={self.concurrency})"
        )

    # --- public --------------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        if not requests:
            return []
        if len(requests) == 1:
            return [self._answer(requests[0])]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.concurrency, thread_name_prefix="curate-openai"
                )
            pool = self._pool
        return list(pool.map(self._answer, requests))

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            sessions, self._sessions = self._sessions, []
        if pool is not None:
            pool.shutdown(wait=True)
        for session in sessions:
            session.close()
        self._local = threading.local()

    # --- one request ---------------------------------------------------------------

    def payload(self, request: Request) -> dict[str, Any]:
        """The JSON body sent for ``request`` (to :attr:`completions_url` when it is
        raw, else to :attr:`url`)."""
        body: dict[str, Any] = {"model": self.model}
        if request.raw:
            body["prompt"] = request.prompt
        else:
            body["messages"] = build_messages(request)
        body["max_tokens"] = request.max_tokens
        body["temperature"] = request.temperature
        body["seed"] = request.seed
        if request.raw:
            body["add_special_tokens"] = False
        if request.regex is not None and self.guided == "vllm":
            body["structured_outputs"] = {"regex": request.regex}
            body["guided_regex"] = request.regex
        return body

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self.stats[name] += delta

    def _answer(self, request: Request) -> Answer:
        self._count(requests=1)
        problem = raw_problem(request)
        if problem is not None:
            self._count(errors=1)
            return Answer(text=None, error=problem)
        key = request.key(self.fingerprint)
        url = self.completions_url if request.raw else self.url
        secret: str | None = None
        headers = {"Content-Type": "application/json"}
        if self.api_key_env is not None:
            secret = os.environ.get(self.api_key_env)
            if not secret:
                self._count(errors=1)
                return Answer(
                    text=None,
                    error=f"http_error: missing_api_key: environment variable "
                    f"{self.api_key_env} is not set",
                )
            headers["Authorization"] = f"Bearer {secret}"
        data = json.dumps(self.payload(request)).encode()
        attempt = 0
        while True:
            self._count(attempts=1)
            try:
                return self._attempt(url, data, headers, secret, raw=request.raw)
            except _AttemptError as failure:
                if not failure.retry or attempt >= self.retries:
                    self._count(errors=1)
                    return Answer(text=None, error=f"http_error: {failure.label}: {failure.detail}")
                wait = backoff_delay(key, attempt, self.backoff_s, self.max_backoff_s)
                if failure.wait is not None:
                    wait = min(self.max_backoff_s, max(wait, failure.wait))
                log.debug(
                    "retrying %s after %s (attempt %d of %d, waiting %.2fs)",
                    url,
                    failure.label,
                    attempt + 1,
                    self.retries,
                    wait,
                )
                self._count(retries=1)
                attempt += 1
                time.sleep(wait)

    def _attempt(
        self, url: str, data: bytes, headers: dict[str, str], secret: str | None, *, raw: bool
    ) -> Answer:
        """One HTTP call: the answer, or a :class:`_AttemptError`."""
        try:
            response = self._session().post(url, data=data, headers=headers, timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise _AttemptError(type(exc).__name__, _short(str(exc), secret), retry=True) from None
        with response:
            status = response.status_code
            text = response.text
        if status != 200:
            retry = status in RETRY_STATUS or status >= 500
            wait = _retry_after(response.headers.get("Retry-After")) if retry else None
            raise _AttemptError(str(status), _short(_error_message(text), secret), retry, wait)
        try:
            body = json.loads(text)
            choice = body["choices"][0]
            content = choice["text"] if raw else choice["message"]["content"]
            if not isinstance(content, str):
                raise TypeError(
                    "completion text is not a string" if raw else "message content is not a string"
                )
            usage = body.get("usage") or {}
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
            completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            detail = _short(f"malformed response ({type(exc).__name__}): {text}", secret)
            raise _AttemptError("200", detail, retry=False) from None
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        return Answer(
            text=content, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens
        )


def _error_message(text: str) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the raw text."""
    try:
        body = json.loads(text)
    except ValueError:
        return text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(body.get("message"), str):
            return str(body["message"])
    return text
