"""A small OpenAI-compatible HTTP server in front of any :class:`Backend`.

It serves ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST
/v1/completions`` (both non-streaming), so that
:class:`curate.mllm.http.OpenAIBackend` (or any OpenAI client) can talk to an
in-process model: the tests serve a tiny model with it, and ``python -m
curate.mllm.serve MODEL_DIR --port 8000`` serves a local ``transformers`` model
where no vLLM is at hand.

Design choices:

* **Standard library only**: :class:`http.server.ThreadingHTTPServer`, HTTP/1.1
  keep-alive, one thread per connection, daemon threads (a client that went away
  never blocks shutdown).
* **Serialized generation.**  Each HTTP request becomes one :class:`Request`; calls
  to the backend are serialized under a lock rather than micro-batched.  A model
  then sees the same one-request batches whatever the client's concurrency, so its
  answers do not depend on padding or batch composition (reproducible runs); the
  price is throughput, which is what vLLM and SGLang are for.
* **Only ``data:`` images.**  An ``image_url`` must be a base64 ``data:`` URI; an
  ``http(s)`` URL is answered 400 and never fetched (no server-side request
  forgery, no network dependence).  One user message with at most one image, plus
  optional system messages, matching the :class:`Request` contract; anything else
  (several turns, several images, ``stream``, ``n > 1``) is a 400.
* **Plain completions** (``/v1/completions``) become raw requests
  (``Request(raw=True)``: the prompt is the model's whole input, tokenized as is,
  no chat template).  ``prompt`` must be one non-empty string: a list of prompts or
  of token ids is a 400, and so are ``echo``, ``suffix``, ``best_of > 1`` and
  ``add_special_tokens: true`` (nothing is ever added to the prompt; vLLM's
  default is to add a BOS, which :class:`~curate.mllm.http.OpenAIBackend` turns off
  with ``add_special_tokens: false``).  The answer is a ``text_completion`` object
  (``choices[0].text``).  Authentication, fault injection, decoding settings,
  errors and counters are those of chat completions.
* **Decoding settings**: ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature``, ``seed``; a regex constraint from vLLM's
  ``structured_outputs.regex``, its legacy ``guided_regex``, or SGLang's ``regex``.
  Missing settings take the :class:`Request` defaults (greedy, 64 tokens), not
  OpenAI's ``temperature=1``.
* **Errors**: a backend answer carrying ``error`` (or a backend exception) is a 500
  with an OpenAI-shaped ``{"error": {...}}`` body, so clients retry it; a wrong
  ``model`` is a 404, a wrong or missing bearer token (when ``api_key`` is set) a
  401 whose body never echoes what was sent.
* **Fault injection** for tests: ``fail_first`` (the first N attempts of each
  distinct request body get ``fail_status``, with ``Retry-After: retry_after`` when
  set), ``delay_s`` (sleep before answering).  Counters ``received``, ``served``
  (200 completions), ``rejected`` (every other answer to a completion request) and
  ``max_inflight`` count both completion paths and are readable by tests.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import importlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from curate.mllm.backend import Answer, Backend, Request, raw_problem

log = logging.getLogger(__name__)

MAX_BODY = 64 * 2**20


class BadRequestError(ValueError):
    """The request cannot be served; the message goes back to the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _clip(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequestError("system content must be text")
            texts.append(_str(part.get("text"), "text"))
        return "\n".join(texts)
    raise BadRequestError("message content must be a string or a list of parts")


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise BadRequestError(f"{name} must be a string")
    return value


def decode_data_uri(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URI; anything else is a :class:`BadRequestError`."""
    if not url.startswith("data:"):
        raise BadRequestError(
            "image_url must be a base64 data: URI; remote images are never fetched"
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise BadRequestError("image_url data: URI must be base64-encoded")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError("image_url data: URI is not valid base64") from None
    if not data:
        raise BadRequestError("image_url data: URI is empty")
    return data


def _user_content(content: Any) -> tuple[str, bytes | None]:
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list):
        raise BadRequestError("message content must be a string or a list of parts")
    texts: list[str] = []
    image: bytes | None = None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(_str(part.get("text"), "text"))
        elif kind == "image_url":
            if image is not None:
                raise BadRequestError("at most one image per request is supported")
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            image = decode_data_uri(_str(url, "image_url.url"))
        else:
            raise BadRequestError(f"unsupported content part type {_clip(kind)}")
    return "\n".join(texts), image


def _int(body: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequestError(f"{name} must be an integer >= {minimum}")
    return value


def _parse_messages(messages: Any) -> tuple[str | None, tuple[str, bytes | None]]:
    """The system text and the (prompt, image) of the one user message."""
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages must be a non-empty list")
    system: list[str] = []
    user: tuple[str, bytes | None] | None = None
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequestError("each message must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content")))
        elif role == "user":
            if user is not None:
                raise BadRequestError("only one user message (a single turn) is supported")
            user = _user_content(message.get("content"))
        else:
            raise BadRequestError(f"unsupported message role {_clip(role)}")
    if user is None:
        raise BadRequestError("a user message is required")
    return ("\n".join(system) if system else None), user


def _check_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    if body.get("stream"):
        raise BadRequestError("stream is not supported")
    if body.get("n", 1) != 1:
        raise BadRequestError("only n=1 is supported")
    return body


def parse_request(body: Any) -> Request:
    """The :class:`Request` a chat-completions body asks for."""
    body = _check_body(body)
    system, (prompt, image) = _parse_messages(body.get("messages"))
    return Request(prompt=prompt, image=image, system=system, **_settings(body))


def parse_completion_request(body: Any) -> Request:
    """The raw :class:`Request` a (plain) completions body asks for."""
    body = _check_body(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        raise BadRequestError(
            "prompt must be a string: lists of prompts or of token ids are not supported"
        )
    prompt = _str(prompt, "prompt")
    if body.get("echo"):
        raise BadRequestError("echo is not supported")
    if body.get("suffix") is not None:
        raise BadRequestError("suffix is not supported")
    if body.get("best_of") not in (None, 1):
        raise BadRequestError("only best_of=1 is supported")
    if body.get("add_special_tokens"):
        raise BadRequestError(
            "add_special_tokens=true is not supported: the prompt is tokenized as is"
        )
    request = Request(prompt=prompt, raw=True, **_settings(body))
    problem = raw_problem(request)
    if problem is not None:
        raise BadRequestError(problem.removeprefix("bad_request: "))
    return request


def _settings(body: dict[str, Any]) -> dict[str, Any]:
    """The decoding settings of a completion body, as :class:`Request` fields."""
    max_tokens = _int(body, "max_completion_tokens", 0, 1) or _int(body, "max_tokens", 64, 1)
    temperature = body.get("temperature")
    if temperature is None:
        temperature = 0.0
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise BadRequestError("temperature must be a number")
    if temperature < 0:
        raise BadRequestError("temperature must be >= 0")
    structured = body.get("structured_outputs")
    regex = structured.get("regex") if isinstance(structured, dict) else None
    regex = regex if regex is not None else body.get("guided_regex")
    regex = regex if regex is not None else body.get("regex")
    if regex is not None:
        regex = _str(regex, "regex")
    return {
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "regex": regex,
        "seed": _int(body, "seed", 0, -(2**63)),
    }


class BackendServer(ThreadingHTTPServer):
    """An OpenAI-compatible (chat) completions server answering from ``backend``."""

    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        backend: Backend,
        *,
        model_name: str = "curate",
        api_key: str | None = None,
        fail_first: int = 0,
        fail_status: int = 503,
        retry_after: float | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.backend = backend
        self.model_name = model_name
        self.api_key = api_key
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.retry_after = retry_after
        self.delay_s = delay_s
        self.generate_lock = threading.Lock()
        self.counter_lock = threading.Lock()
        #: Completion requests received (every POST to either completions path).
        self.received = 0
        #: Completion requests answered 200.
        self.served = 0
        #: Completion requests answered with anything else (fault, 4xx, 5xx).
        self.rejected = 0
        self.inflight = 0
        self.max_inflight = 0
        self.attempts: dict[str, int] = {}
        super().__init__(address, _Handler)

    def __repr__(self) -> str:  # never shows the api key
        return f"BackendServer(port={self.port}, model_name={self.model_name!r})"

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    @property
    def base_url(self) -> str:
        host = self.server_address[0]
        host = host.decode() if isinstance(host, bytes) else host
        return f"http://{host}:{self.port}/v1"

    def count(self, **deltas: int) -> None:
        with self.counter_lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            self.max_inflight = max(self.max_inflight, self.inflight)

    def should_fail(self, body: bytes) -> bool:
        """Whether this attempt of ``body`` gets the injected failure."""
        if self.fail_first <= 0:
            return False
        digest = hashlib.sha256(body).hexdigest()
        with self.counter_lock:
            seen = self.attempts.get(digest, 0) + 1
            self.attempts[digest] = seen
        return seen <= self.fail_first

    def authorized(self, header: str | None) -> bool:
        if self.api_key is None:
            return True
        expected = f"Bearer {self.api_key}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    def complete(self, request: Request) -> Answer:
        with self.generate_lock:
            answers = self.backend.generate([request])
        if len(answers) != 1:
            raise RuntimeError(f"backend returned {len(answers)} answers for 1 request")
        return answers[0]


#: The completion paths, and whether each one takes raw (plain completion) requests.
_COMPLETION_PATHS = {"/v1/chat/completions": False, "/v1/completions": True}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: BackendServer
    #: Set while a completion request awaits its answer: the answer is counted just
    #: before it is sent, so a client that reads the counters after its answer
    #: always sees it counted.
    _uncounted = False

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - " + format, self.address_string(), *args)

    def _send(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(body).encode()
        if self._uncounted:
            self._uncounted = False
            self.server.count(served=int(status == 200), rejected=int(status != 200))
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send(status, {"error": {"message": message, "type": kind, "code": status}}, headers)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/v1/models":
            model = {"id": self.server.model_name, "object": "model", "owned_by": "curate"}
            self._send(200, {"object": "list", "data": [model]})
        elif path in ("/health", "/v1/health"):
            self._send(200, {"status": "ok"})
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if path not in _COMPLETION_PATHS:
            self.close_connection = True  # the body was not read
            self._error(404, "not found")
            return
        server = self.server
        server.count(received=1, inflight=1)
        self._uncounted = True
        try:
            self._complete(raw=_COMPLETION_PATHS[path])
        finally:
            if self._uncounted:  # failed before answering
                self._uncounted = False
                server.count(rejected=1)
            server.count(inflight=-1)

    def _complete(self, raw: bool) -> int:
        """Answer one (chat, or with ``raw`` plain) completion request; returns the
        status sent."""
        server = self.server
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(411, "Content-Length required")
            return 411
        if int(length) > MAX_BODY:
            self.close_connection = True
            self._error(413, "request body too large")
            return 413
        data = self.rfile.read(int(length))
        if not server.authorized(self.headers.get("Authorization")):
            self._error(401, "invalid or missing API key")
            return 401
        if server.delay_s > 0:
            time.sleep(server.delay_s)
        if server.should_fail(data):
            headers = {}
            if server.retry_after is not None:
                headers["Retry-After"] = f"{server.retry_after:g}"
            self._error(server.fail_status, "injected failure", headers)
            return server.fail_status
        try:
            body = json.loads(data)
            request = parse_completion_request(body) if raw else parse_request(body)
            model = body.get("model")
            if model is not None and model != server.model_name:
                raise BadRequestError(f"the model {_clip(model)} does not exist", status=404)
        except BadRequestError as exc:
            self._error(exc.status, str(exc))
            return exc.status
        except ValueError:
            self._error(400, "the body is not valid JSON")
            return 400
        try:
            answer = server.complete(request)
        except Exception as exc:
            log.exception("backend failed")
            self._error(500, f"backend failed: {type(exc).__name__}")
            return 500
        if answer.error is not None or answer.text is None:
            self._error(500, f"backend error: {answer.error}")
            return 500
        self._send(200, completion_body(answer, request, server.model_name))
        return 200


def completion_body(answer: Answer, request: Request, model_name: str) -> dict[str, Any]:
    """The 200 body for ``answer``: a ``chat.completion``, or for a raw request a
    ``text_completion``."""
    finish = "length" if answer.completion_tokens >= request.max_tokens else "stop"
    choice: dict[str, Any] = {"index": 0}
    if request.raw:
        choice.update(text=answer.text, logprobs=None, finish_reason=finish)
    else:
        choice["message"] = {"role": "assistant", "content": answer.text}
        choice["finish_reason"] = finish
    return {
        "id": f"{'cmpl' if request.raw else 'chatcmpl'}-{uuid.uuid4().hex}",
        "object": "text_completion" if request.raw else "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [choice],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.completion_tokens,
        },
    }


def serve(
    backend: Backend, host: str = "127.0.0.1", port: int = 0, **options: Any
) -> tuple[BackendServer, threading.Thread]:
    """Start a :class:`BackendServer` in a daemon thread; ``server.port`` is the bound
    port.  Stop it with ``server.shutdown(); server.server_close()``."""
    server = BackendServer((host, port), backend, **options)
    thread = threading.Thread(
        target=server.serve_forever,
        kwargs={"poll_interval": 0.05},  # a quick shutdown()
        name=f"curate-serve-{server.port}",
        daemon=True,
    )
    thread.start()
    return server, thread


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m curate.mllm.serve MODEL_DIR --port 8000``: serve a local
    ``transformers`` model (:class:`curate.mllm.local.TransformersBackend`)."""
    parser = argparse.ArgumentParser(
        prog="python -m curate.mllm.serve",
        description="Serve a local transformers model as an OpenAI-compatible endpoint.",
    )
    parser.add_argument("model_dir", help="folder of the transformers model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="served name (default: folder name)")
    parser.add_argument(
        "--api-key-env",
        default=None,
        help="require 'Authorization: Bearer <key>' with the key read from this variable",
    )
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env is not None:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is not set")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    local = importlib.import_module("curate.mllm.local")
    backend: Backend = local.TransformersBackend(args.model_dir)
    name = args.model_name or os.path.basename(os.path.normpath(args.model_dir))
    server = BackendServer((args.host, args.port), backend, model_name=name, api_key=api_key)
    log.info("serving %s on %s", name, server.base_url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
