"""The OpenAI-compatible HTTP backend, the request cache and the serving side, over real
HTTP on 127.0.0.1: ordering under concurrency, retries and back-off, error answers,
timeouts, API keys that never leak, and a cache that makes a rerun ask nothing."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import pickle
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from curate.mllm.backend import Answer, Backend, Request
from curate.mllm.cache import CachedBackend, RequestCache
from curate.mllm.http import OpenAIBackend, backoff_delay, build_messages, image_mime
from curate.mllm.serve import (
    BackendServer,
    BadRequestError,
    parse_completion_request,
    parse_request,
    serve,
)

SECRET = "sk-curate-test-4b1d9e77c0ffee"  # must never show up in an error, a log or a repr
MODEL = "echo-model"


class EchoBackend(Backend):
    """Answers deterministically with everything it received (so tests can check what
    crossed the wire); a prompt containing 'fail' gets an error answer."""

    fingerprint = "echo"

    def __init__(self) -> None:
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self.lock = threading.Lock()

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            return self._generate(requests)
        finally:
            with self.lock:
                self.active -= 1

    def _generate(self, requests: Sequence[Request]) -> list[Answer]:
        out = []
        for request in requests:
            with self.lock:
                self.calls += 1
            # a few ms that vary per prompt, so completions finish out of order
            time.sleep(int(hashlib.sha256(request.prompt.encode()).hexdigest()[:2], 16) / 80_000)
            if "fail" in request.prompt:
                out.append(Answer(text=None, error="echo refused"))
                continue
            image = hashlib.sha256(request.image).hexdigest()[:12] if request.image else None
            text = json.dumps(
                {
                    "prompt": request.prompt,
                    "system": request.system,
                    "image": image,
                    "regex": request.regex,
                    "max_tokens": request.max_tokens,
                    "temperature": request.temperature,
                    "seed": request.seed,
                },
                sort_keys=True,
            )
            out.append(Answer(text=text, prompt_tokens=len(request.prompt), completion_tokens=3))
        return out


class CountingBackend(Backend):
    """In-process backend for cache tests: records each batch it is asked."""

    def __init__(self, fingerprint: str = "counting") -> None:
        self.fingerprint = fingerprint
        self.batches: list[list[str]] = []

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        self.batches.append([r.prompt for r in requests])
        return [
            Answer(text=None, error="bad prompt")
            if "bad" in r.prompt
            else Answer(text=f"answer to {r.prompt}", prompt_tokens=2, completion_tokens=4)
            for r in requests
        ]


@contextmanager
def running(backend: Backend | None = None, **options: Any) -> Iterator[BackendServer]:
    options.setdefault("model_name", MODEL)
    server, thread = serve(backend or EchoBackend(), **options)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def echo_server() -> Iterator[BackendServer]:
    with running() as server:
        yield server


def client(server: BackendServer, **kwargs: Any) -> OpenAIBackend:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout_s", 5.0)
    return OpenAIBackend(server.base_url, MODEL, **kwargs)


def echoed(answer: Answer) -> dict[str, Any]:
    assert answer.error is None, answer.error
    assert answer.text is not None
    value: dict[str, Any] = json.loads(answer.text)
    return value


def png_bytes(color: tuple[int, int, int] = (200, 10, 10), kind: str = "PNG") -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format=kind)
    return buffer.getvalue()


class _Canned(BaseHTTPRequestHandler):
    """Answers every request with the server's canned status and body; counts hits."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self) -> None:
        server: Any = self.server
        with server.lock:
            server.hits += 1
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = server.body
        if body is None:  # a careless server that echoes the request's headers
            auth = self.headers.get("Authorization")
            body = json.dumps({"error": {"message": f"bad header Authorization: {auth}"}}).encode()
        self.send_response(server.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._reply()

    def do_POST(self) -> None:
        self._reply()


@contextmanager
def canned(status: int, body: bytes | None) -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Canned)
    server.daemon_threads = True
    server.status, server.body, server.hits, server.lock = status, body, 0, threading.Lock()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the client ----------------------------------------------------------------------


def test_answers_in_order_under_concurrency() -> None:
    requests_ = [Request(prompt=f"question {i}", seed=i) for i in range(40)]
    echo = EchoBackend()
    with running(echo, delay_s=0.02) as server:
        backend = client(server, concurrency=8)
        try:
            answers = backend.generate(requests_)
        finally:
            backend.close()
        assert [echoed(a)["prompt"] for a in answers] == [r.prompt for r in requests_]
        assert [echoed(a)["seed"] for a in answers] == list(range(40))
        assert 2 <= server.max_inflight <= 8  # really concurrent, and bounded
        assert echo.max_active == 1  # ... while the server serializes the model
        assert server.served == 40
    assert backend.stats["requests"] == backend.stats["attempts"] == 40
    assert backend.stats["retries"] == backend.stats["errors"] == 0
    assert backend.stats["completion_tokens"] == 3 * 40
    assert backend.stats["prompt_tokens"] == sum(len(r.prompt) for r in requests_)
    assert all(a.prompt_tokens == len(r.prompt) for a, r in zip(answers, requests_, strict=True))


def test_message_format_and_settings_cross_the_wire(echo_server: BackendServer) -> None:
    png, jpeg = png_bytes(), png_bytes(kind="JPEG")
    assert image_mime(png) == "image/png" and image_mime(jpeg) == "image/jpeg"
    requests_ = [
        Request(prompt="plain", max_tokens=7, temperature=0.5, seed=3),
        Request(prompt="look", image=png, system="be brief", regex=r"(yes|no)"),
        Request(prompt="look", image=jpeg),
    ]
    backend = client(echo_server)
    one, two, three = (echoed(a) for a in backend.generate(requests_))
    assert one == {
        "prompt": "plain",
        "system": None,
        "image": None,
        "regex": None,
        "max_tokens": 7,
        "temperature": 0.5,
        "seed": 3,
    }
    assert two["image"] == hashlib.sha256(png).hexdigest()[:12]  # bytes arrive intact
    assert two["system"] == "be brief"
    assert two["regex"] == "(yes|no)"  # guided decoding is forwarded
    assert three["image"] == hashlib.sha256(jpeg).hexdigest()[:12]

    body = backend.payload(requests_[1])
    assert body["structured_outputs"] == {"regex": "(yes|no)"}
    assert body["guided_regex"] == "(yes|no)"
    content = body["messages"][1]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1] == {"type": "text", "text": "look"}
    assert build_messages(requests_[0]) == [{"role": "user", "content": "plain"}]

    plain = client(echo_server, guided="none")
    assert "structured_outputs" not in plain.payload(requests_[1])
    assert echoed(plain.generate([requests_[1]])[0])["regex"] is None


def test_retries_then_success() -> None:
    requests_ = [Request(prompt=f"q{i}") for i in range(3)]
    with running(fail_first=2) as server:
        backend = client(server, retries=4, concurrency=3)
        answers = backend.generate(requests_)
        assert [echoed(a)["prompt"] for a in answers] == ["q0", "q1", "q2"]
        assert server.rejected == 6 and server.served == 3
    assert backend.stats["retries"] == 6
    assert backend.stats["attempts"] == 9
    assert backend.stats["errors"] == 0


@pytest.mark.parametrize("status", [503, 429, 408])
def test_retries_exhausted_gives_error_answer(status: int) -> None:
    with running(fail_first=100, fail_status=status) as server:
        backend = client(server, retries=2)
        (answer,) = backend.generate([Request(prompt="never")])
        assert server.rejected == 3  # one attempt + two retries
    assert answer.text is None
    assert answer.error is not None
    assert answer.error.startswith(f"http_error: {status}: ")
    assert "injected failure" in answer.error
    assert backend.stats["errors"] == 1 and backend.stats["retries"] == 2


def test_retry_after_is_honoured() -> None:
    with running(fail_first=1, retry_after=0.4) as server:
        backend = client(server, backoff_s=0.001, max_backoff_s=5.0)
        start = time.monotonic()
        (answer,) = backend.generate([Request(prompt="later")])
        waited = time.monotonic() - start
        assert echoed(answer)["prompt"] == "later"
        assert waited >= 0.4
        assert server.rejected == 1
    # ... but never beyond max_backoff_s
    with running(fail_first=1, retry_after=30) as server:
        backend = client(server, backoff_s=0.001, max_backoff_s=0.05)
        start = time.monotonic()
        echoed(backend.generate([Request(prompt="capped")])[0])
        assert time.monotonic() - start < 2.0


def test_backoff_is_deterministic_exponential_and_capped() -> None:
    delays = [backoff_delay("key-a", n, 0.5, 30.0) for n in range(8)]
    assert delays == [backoff_delay("key-a", n, 0.5, 30.0) for n in range(8)]
    for n, delay in enumerate(delays):
        ceiling = min(30.0, 0.5 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert backoff_delay("key-a", 3, 0.5, 30.0) != backoff_delay("key-b", 3, 0.5, 30.0)


def test_non_retryable_4xx() -> None:
    # the server refuses (and never fetches) a remote image URL
    with canned(200, b"a png") as remote, running() as server:
        body = {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": remote_url(remote)}},
                        {"type": "text", "text": "what is it?"},
                    ],
                }
            ],
        }
        response = requests.post(f"{server.base_url}/chat/completions", json=body, timeout=5)
        assert response.status_code == 400
        assert "data: URI" in response.json()["error"]["message"]
        assert remote.hits == 0
        assert server.rejected == 1 and server.served == 0

    # the client does not retry a 400, nor a 404 (unknown model)
    with running(fail_first=5, fail_status=400) as server:
        backend = client(server, retries=3)
        (answer,) = backend.generate([Request(prompt="x")])
        assert answer.error is not None and answer.error.startswith("http_error: 400: ")
        assert server.rejected == 1
        assert backend.stats["retries"] == 0
    with running() as server:
        wrong = OpenAIBackend(server.base_url, "no-such-model", retries=3, backoff_s=0.01)
        (answer,) = wrong.generate([Request(prompt="x")])
        assert answer.error is not None and answer.error.startswith("http_error: 404: ")
        assert server.rejected == 1


def remote_url(server: Any) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/cat.png"


def test_timeout_gives_error_answer() -> None:
    with running(delay_s=1.0) as server:
        backend = client(server, timeout_s=0.2, retries=1)
        start = time.monotonic()
        (answer,) = backend.generate([Request(prompt="slow")])
        elapsed = time.monotonic() - start
    assert answer.text is None
    assert answer.error is not None and answer.error.startswith("http_error: ReadTimeout: ")
    assert len(answer.error) < 260
    assert elapsed < 1.0
    assert backend.stats["retries"] == 1


def test_connection_refused_gives_error_answer() -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", MODEL, retries=1, backoff_s=0.01)
    (answer,) = backend.generate([Request(prompt="anyone?")])
    assert answer.error is not None and answer.error.startswith("http_error: ConnectionError: ")
    assert len(answer.error) < 260


def test_malformed_response_is_an_error_answer() -> None:
    for body in (b"<html>not json</html>", b'{"choices": []}', b'{"choices": [{"message": 1}]}'):
        with canned(200, body) as server:
            backend = OpenAIBackend(
                f"http://127.0.0.1:{server.server_address[1]}/v1", MODEL, retries=3
            )
            (answer,) = backend.generate([Request(prompt="x")])
            assert answer.text is None
            assert answer.error is not None
            assert answer.error.startswith("http_error: 200: malformed response")
            assert server.hits == 1  # not retried
    with canned(500, b"x" * 10_000) as server:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", MODEL, retries=0)
        (answer,) = backend.generate([Request(prompt="x")])
        assert answer.error is not None and len(answer.error) < 260  # no body dump


def test_backend_error_becomes_server_error(echo_server: BackendServer) -> None:
    backend = client(echo_server, retries=1)
    ok, bad = backend.generate([Request(prompt="fine"), Request(prompt="please fail")])
    assert echoed(ok)["prompt"] == "fine"
    assert bad.error is not None and bad.error.startswith("http_error: 500: ")
    assert "echo refused" in bad.error


def test_api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger("curate.mllm")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    monkeypatch.delenv("CURATE_TEST_KEY", raising=False)
    try:
        with running(api_key=SECRET, fail_first=1) as server:
            anonymous = client(server)
            (answer,) = anonymous.generate([Request(prompt="hi")])
            assert answer.error is not None and answer.error.startswith("http_error: 401: ")

            keyed = client(server, api_key_env="CURATE_TEST_KEY")
            (missing,) = keyed.generate([Request(prompt="hi")])
            assert missing.error is not None and "CURATE_TEST_KEY is not set" in missing.error

            monkeypatch.setenv("CURATE_TEST_KEY", "wrong-key-123456")
            (wrong,) = keyed.generate([Request(prompt="hi")])
            assert wrong.error is not None and wrong.error.startswith("http_error: 401: ")
            assert "wrong-key-123456" not in wrong.error

            monkeypatch.setenv("CURATE_TEST_KEY", SECRET)
            answers = keyed.generate([Request(prompt="hi"), Request(prompt="please fail")])
            assert echoed(answers[0])["prompt"] == "hi"
            assert keyed.stats["retries"] >= 1  # retry log lines were written
            raw = requests.post(
                f"{server.base_url}/chat/completions",
                json={"messages": [{"role": "user", "content": "x"}]},
                headers={"Authorization": "Bearer guessed-key-987"},
                timeout=5,
            )
            assert raw.status_code == 401 and "guessed-key-987" not in raw.text
            assert SECRET not in repr(server)

        with canned(503, None) as echoing:  # the key comes back in the body: masked
            leaky = OpenAIBackend(
                f"http://127.0.0.1:{echoing.server_address[1]}/v1",
                MODEL,
                api_key_env="CURATE_TEST_KEY",
                retries=1,
                backoff_s=0.01,
            )
            (echoed_key,) = leaky.generate([Request(prompt="hi")])
            assert echoed_key.error is not None and "Bearer ***" in echoed_key.error
            assert echoing.hits == 2

        dead = OpenAIBackend(
            f"http://127.0.0.1:{free_port()}/v1", MODEL, api_key_env="CURATE_TEST_KEY", retries=0
        )
        (refused,) = dead.generate([Request(prompt="hi")])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)

    assert records, "expected retry log lines"
    for text in [
        repr(keyed),
        str(keyed.__dict__),
        keyed.fingerprint,
        str(keyed.stats),
        *(a.error or "" for a in [answer, missing, wrong, *answers, refused, echoed_key]),
        *records,
    ]:
        assert SECRET not in text
    assert SECRET.encode() not in pickle.dumps(keyed)
    assert keyed.fingerprint == f"openai:{server.base_url}:{MODEL}"


def test_credentials_in_base_url_refused() -> None:
    with pytest.raises(ValueError) as info:
        OpenAIBackend(f"http://user:{SECRET}@127.0.0.1:9/v1", MODEL)
    assert SECRET not in str(info.value)


def test_backend_pickles_and_works_after(echo_server: BackendServer) -> None:
    backend = client(echo_server, concurrency=2)
    backend.generate([Request(prompt="a"), Request(prompt="b")])  # pool and sessions exist
    copy: OpenAIBackend = pickle.loads(pickle.dumps(backend))
    answers = copy.generate([Request(prompt="c"), Request(prompt="d")])
    assert [echoed(a)["prompt"] for a in answers] == ["c", "d"]
    backend.close()
    copy.close()


# --- the server ----------------------------------------------------------------------


def test_models_endpoint(echo_server: BackendServer) -> None:
    response = requests.get(f"{echo_server.base_url}/models", timeout=5)
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == [MODEL]


def _user(content: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}]}


def test_parse_request() -> None:
    png = png_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    request = parse_request(
        {
            "messages": [
                {"role": "system", "content": "sys"},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "what?"},
                    ],
                },
            ],
            "max_tokens": 9,
            "temperature": 0.7,
            "seed": 5,
            "guided_regex": "[0-9]+",
        }
    )
    assert request == Request(
        prompt="what?",
        image=png,
        system="sys",
        max_tokens=9,
        temperature=0.7,
        regex="[0-9]+",
        seed=5,
    )
    assert parse_request({**_user("hi"), "regex": "a|b"}).regex == "a|b"  # SGLang's field
    assert parse_request({**_user("hi"), "structured_outputs": {"regex": "c"}}).regex == "c"
    assert parse_request(_user("hi")) == Request(prompt="hi")

    bad_bodies: list[Any] = [
        [],
        {"messages": []},
        {**_user("hi"), "stream": True},
        {**_user("hi"), "n": 2},
        {**_user("hi"), "max_tokens": 0},
        {**_user("hi"), "temperature": "hot"},
        _user([{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]),
        _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
        _user([{"type": "image_url", "image_url": url}, {"type": "image_url", "image_url": url}]),
        _user([{"type": "audio"}]),
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    for body in bad_bodies:
        with pytest.raises(BadRequestError):
            parse_request(body)


# --- the cache -----------------------------------------------------------------------


def test_cache_rerun_makes_no_http_requests(echo_server: BackendServer, tmp_path: Path) -> None:
    root = str(tmp_path / "cache")
    requests_ = [Request(prompt=f"cached {i}", image=png_bytes((i, 0, 0))) for i in range(10)]
    requests_ += [requests_[3], requests_[7]]  # duplicates are asked once
    before = echo_server.served
    first = CachedBackend(client(echo_server), RequestCache(root, flush_every=4))
    answers = first.generate(requests_)
    first.close()
    assert echo_server.served - before == 10
    assert first.stats["misses"] == 12 and first.stats["hits"] == 0
    assert first.stats["requests"] == 10  # the inner backend's stats come along
    assert not any(a.cached for a in answers)
    assert len(list(Path(root).glob("*.jsonl"))) == 3  # 4 + 4 + 2 on close

    before = echo_server.served
    second = CachedBackend(client(echo_server), RequestCache(root))
    again = second.generate(requests_)
    second.close()
    assert echo_server.served == before  # nothing asked
    assert [a.text for a in again] == [a.text for a in answers]
    assert [a.prompt_tokens for a in again] == [a.prompt_tokens for a in answers]
    assert all(a.cached for a in again)
    assert second.stats["hits"] == 12 and second.stats["misses"] == 0

    # another model (fingerprint) never reuses these answers
    other = CachedBackend(OpenAIBackend(echo_server.base_url, "other"), RequestCache(root))
    assert all(a.error for a in other.generate(requests_[:2]))  # 404: asked, not cached


def test_error_answers_not_cached(tmp_path: Path) -> None:
    root = str(tmp_path)
    requests_ = [Request(prompt=p) for p in ("good 1", "bad 1", "good 2", "bad 2")]
    inner = CountingBackend()
    first = CachedBackend(inner, RequestCache(root))
    answers = first.generate(requests_)
    first.close()
    assert [a.error is None for a in answers] == [True, False, True, False]
    assert len(RequestCache(root)) == 2

    inner = CountingBackend()
    second = CachedBackend(inner, RequestCache(root))
    again = second.generate(requests_)
    assert inner.batches == [["bad 1", "bad 2"]]  # only the failures are asked again
    assert [a.text for a in again] == [a.text for a in answers]
    assert [a.cached for a in again] == [True, False, True, False]


def test_corrupt_chunk_lines_are_skipped(tmp_path: Path) -> None:
    good = {"key": "k1", "text": "fine", "prompt_tokens": 1, "completion_tokens": 2}
    lines = [
        json.dumps(good),
        '{"key": "k2", "text": "trunc',  # a truncated line
        "\x00\x01garbage",
        json.dumps({"key": "k3", "text": None}),  # wrong type
        json.dumps({"key": "k4", "text": "x", "prompt_tokens": "many"}),
        json.dumps(["not", "an", "object"]),
        "",
        json.dumps({"key": "k5", "text": "also fine"}),
    ]
    (tmp_path / "old-000000.jsonl").write_text("\n".join(lines))
    (tmp_path / "half.jsonl").write_bytes(json.dumps(good).encode()[:20])  # cut mid-line
    (tmp_path / ".tmp.jsonl.tmp-1").write_text("{broken")  # an unfinished atomic write
    cache = RequestCache(str(tmp_path))
    assert len(cache) == 2
    assert cache.corrupt_lines == 6
    assert cache.get("k1") == Answer(text="fine", prompt_tokens=1, completion_tokens=2, cached=True)
    assert cache.get("k5") == Answer(text="also fine", cached=True)
    assert cache.get("k2") is None


def test_cache_chunks_flush_and_pickle(tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    cache = RequestCache(root, flush_every=2)
    for i in range(5):
        cache.put(f"k{i}", Answer(text=f"t{i}", prompt_tokens=i))
    cache.put("err", Answer(text=None, error="boom"))
    assert len(list(Path(root).glob("*.jsonl"))) == 2  # 2 full chunks, 1 answer pending
    copy: RequestCache = pickle.loads(pickle.dumps(cache))
    assert copy.instance != cache.instance and len(copy) == 4
    cache.close()
    names = sorted(p.name for p in Path(root).iterdir())
    assert names == [f"{cache.instance}-{n:06d}.jsonl" for n in range(3)]
    reloaded = RequestCache(root)
    assert len(reloaded) == 5 and "err" not in reloaded
    assert reloaded.get("k4") == Answer(text="t4", prompt_tokens=4, cached=True)
    reloaded.close()  # nothing new: no chunk written
    assert len(list(Path(root).iterdir())) == 3


# --- end to end with the tiny transformers model ----------------------------------------


def _tiny_backend_class() -> Any:
    from curate.mllm.local import TransformersBackend

    return TransformersBackend


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _tiny_backend_class()
    from curate.mllm.tiny import build_tiny_vlm

    return Path(build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm")))


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir: Path) -> Iterator[tuple[Backend, BackendServer]]:
    model: Backend = _tiny_backend_class()(str(tiny_model_dir), device="cpu")
    try:
        with running(model, model_name="tiny") as server:
            yield model, server
    finally:
        model.close()


def test_tiny_model_end_to_end(tiny_server: tuple[Backend, BackendServer], tmp_path: Path) -> None:
    model, server = tiny_server
    requests_ = [
        Request(prompt="what is in the picture?", image=png_bytes(), max_tokens=6),
        Request(prompt="say something", system="you are brief", max_tokens=5),
        Request(prompt="how many?", image=png_bytes((0, 90, 0)), regex=r"[0-9]{3}", max_tokens=8),
        Request(prompt="pick", temperature=0.8, seed=7, max_tokens=5),
    ]
    remote = OpenAIBackend(server.base_url, "tiny", concurrency=4, timeout_s=60)
    cached = CachedBackend(remote, RequestCache(str(tmp_path)))
    answers = cached.generate(requests_)
    cached.close()
    local = [model.generate([r])[0] for r in requests_]
    for answer, direct in zip(answers, local, strict=True):
        assert answer.error is None, answer.error
        assert answer.text == direct.text  # HTTP adds nothing and loses nothing
        assert (answer.prompt_tokens, answer.completion_tokens) == (
            direct.prompt_tokens,
            direct.completion_tokens,
        )
    assert answers[0].prompt_tokens > 16  # the image's placeholder tokens were counted
    assert answers[2].text is not None and re.fullmatch(r"[0-9]{3}", answers[2].text)

    served = server.served
    again = CachedBackend(OpenAIBackend(server.base_url, "tiny"), RequestCache(str(tmp_path)))
    assert [a.text for a in again.generate(requests_)] == [a.text for a in answers]
    assert server.served == served


def test_serve_main_command_line(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``python -m curate.mllm.serve MODEL_DIR --port N`` serves the model over HTTP."""
    port = free_port()
    env = {**os.environ, "CURATE_SERVE_KEY": SECRET}
    command = [sys.executable, "-m", "curate.mllm.serve", str(tiny_model_dir)]
    command += ["--port", str(port), "--model-name", "tiny", "--api-key-env", "CURATE_SERVE_KEY"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if requests.get(f"{base}/models", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        monkeypatch.setenv("CURATE_SERVE_KEY", SECRET)
        backend = OpenAIBackend(base, "tiny", api_key_env="CURATE_SERVE_KEY", retries=0)
        (answer,) = backend.generate([Request(prompt="hello", max_tokens=4)])
        assert answer.error is None and answer.text is not None
        (anonymous,) = OpenAIBackend(base, "tiny", retries=0).generate([Request(prompt="x")])
        assert anonymous.error is not None and anonymous.error.startswith("http_error: 401")
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode(errors="replace")
    assert SECRET not in output


# --- raw (plain completion) requests ---------------------------------------------------

#: An Instruction Pre-Training style synthesizer prompt: the literal <s> is part of the text.
RAW_PROMPT = "<s> <CON> The cat sits on a table. </CON>\n\n"


def test_request_keys_of_chat_requests_are_unchanged() -> None:
    """Digests computed before ``Request.raw`` existed: every existing cache entry
    must still be found."""
    full = Request(
        prompt="hello",
        image=b"\x89PNG",
        system="sys",
        max_tokens=9,
        temperature=0.5,
        regex="[0-9]+",
        seed=3,
    )
    pinned = "e88edf45a79b4a3aa7fff1f8939dff72a6a0664e2f05169c55d02124fd199fb2"
    assert full.key("fp") == pinned
    assert Request(prompt="hello").key("fp") == (
        "2ee2a967c31557be5b798f81d7e11a9d894f63f5a6b63e1bd706cb7ceba42175"
    )
    assert Request(prompt="hello", raw=False).key("fp") == Request(prompt="hello").key("fp")
    raw = Request(prompt="hello", raw=True)
    body = {
        "model": "fp",
        "prompt": "hello",
        "image": None,
        "system": None,
        "max_tokens": 64,
        "temperature": 0.0,
        "regex": None,
        "seed": 0,
        "raw": True,
    }
    expected = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
    assert raw.key("fp") == expected != Request(prompt="hello").key("fp")


class RawEchoBackend(EchoBackend):
    """The echo backend, also telling whether the request it got was raw."""

    def _generate(self, requests: Sequence[Request]) -> list[Answer]:
        answers = super()._generate(requests)
        out = []
        for answer, request in zip(answers, requests, strict=True):
            if answer.text is None:
                out.append(answer)
                continue
            fields = {**json.loads(answer.text), "raw": request.raw}
            out.append(replace(answer, text=json.dumps(fields, sort_keys=True)))
        return out


class _Recording(_Canned):
    """The canned server, also keeping each POST's path and JSON body."""

    def do_POST(self) -> None:
        server: Any = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        with server.lock:
            server.seen.append((self.path, body))
            server.hits += 1
        self.send_response(server.status)
        self.send_header("Content-Length", str(len(server.body)))
        self.end_headers()
        self.wfile.write(server.body)


@contextmanager
def recording(body: bytes) -> Iterator[Any]:
    server: Any = ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    server.daemon_threads = True
    server.status, server.body, server.hits, server.lock = 200, body, 0, threading.Lock()
    server.seen = []
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


TEXT_COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "model": MODEL,
    "choices": [{"index": 0, "text": "<QUE> q <ANS> a </END>", "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
}


def test_raw_request_wire_format() -> None:
    with recording(json.dumps(TEXT_COMPLETION).encode()) as server:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", MODEL)
        plain, guided = backend.generate(
            [
                Request(prompt=RAW_PROMPT, raw=True, max_tokens=9, seed=4),
                Request(prompt="Score: ", raw=True, temperature=0.7, regex="[0-9]+"),
            ]
        )
        assert plain == Answer(text="<QUE> q <ANS> a </END>", prompt_tokens=11, completion_tokens=7)
        assert guided.text == plain.text
        seen = sorted(server.seen, key=lambda s: s[1]["prompt"])
        assert seen == [
            (
                "/v1/completions",
                {
                    "model": MODEL,
                    "prompt": RAW_PROMPT,  # byte for byte, <s> included
                    "max_tokens": 9,
                    "temperature": 0.0,
                    "seed": 4,
                    "add_special_tokens": False,
                },
            ),
            (
                "/v1/completions",
                {
                    "model": MODEL,
                    "prompt": "Score: ",
                    "max_tokens": 64,
                    "temperature": 0.7,
                    "seed": 0,
                    "add_special_tokens": False,
                    "structured_outputs": {"regex": "[0-9]+"},
                    "guided_regex": "[0-9]+",
                },
            ),
        ]
        assert backend.stats["prompt_tokens"] == 22 and backend.stats["completion_tokens"] == 14
        # a chat request still goes to /chat/completions; a text_completion body is
        # not a chat answer (nor the other way round): malformed, not retried
        (chat,) = backend.generate([Request(prompt="hi")])
        assert server.seen[-1][0] == "/v1/chat/completions"
        assert chat.error is not None and chat.error.startswith("http_error: 200: malformed")
    chat_body = {"choices": [{"message": {"role": "assistant", "content": "x"}}]}
    with recording(json.dumps(chat_body).encode()) as server:
        backend = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}/v1", MODEL)
        (answer,) = backend.generate([Request(prompt="p", raw=True)])
        assert answer.error is not None and answer.error.startswith("http_error: 200: malformed")
        assert server.hits == 1
    assert "structured_outputs" not in OpenAIBackend(
        "http://127.0.0.1:9/v1", MODEL, guided="none"
    ).payload(Request(prompt="p", raw=True, regex="a"))


def test_raw_over_http_reaches_the_completions_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CURATE_TEST_KEY", SECRET)
    with running(RawEchoBackend(), api_key=SECRET, fail_first=1) as server:
        backend = client(server, api_key_env="CURATE_TEST_KEY", concurrency=4)
        requests_ = [
            Request(prompt=RAW_PROMPT, raw=True, max_tokens=5, seed=1),
            Request(prompt=RAW_PROMPT),  # the same prompt as a chat turn
            Request(prompt="Answer: ", raw=True, regex="(yes|no)", temperature=0.3),
        ]
        raw, chat, guided = (echoed(a) for a in backend.generate(requests_))
        assert raw == {
            "prompt": RAW_PROMPT,  # exactly what was asked, nothing added
            "raw": True,
            "system": None,
            "image": None,
            "regex": None,
            "max_tokens": 5,
            "temperature": 0.0,
            "seed": 1,
        }
        assert chat["raw"] is False and chat["prompt"] == RAW_PROMPT
        assert guided["raw"] is True and guided["regex"] == "(yes|no)"
        # fault injection, retries and counters are those of the chat path
        assert server.received == 6 and server.served == 3 and server.rejected == 3
        assert backend.stats["retries"] == 3 and backend.stats["errors"] == 0
        assert backend.stats["prompt_tokens"] == 2 * len(RAW_PROMPT) + len("Answer: ")

        # an error answer of the model is a 500 (retried), as for chat
        (failed,) = backend.generate([Request(prompt="please fail", raw=True)])
        assert failed.error is not None and failed.error.startswith("http_error: 500: ")
        assert "echo refused" in failed.error

        # the same authentication: a wrong key is a 401 that does not echo the key
        response = requests.post(
            f"{server.base_url}/completions",
            json={"model": MODEL, "prompt": "x"},
            headers={"Authorization": "Bearer guessed-key-987"},
            timeout=5,
        )
        assert response.status_code == 401 and "guessed-key-987" not in response.text
        response = requests.post(
            f"{server.base_url}/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 3},
            headers={"Authorization": f"Bearer {SECRET}"},
            timeout=5,
        )
        assert response.status_code == 503  # a new body: its first attempt is injected
        response = requests.post(
            f"{server.base_url}/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 3},
            headers={"Authorization": f"Bearer {SECRET}"},
            timeout=5,
        )
        body = response.json()
        assert response.status_code == 200
        assert body["object"] == "text_completion" and body["model"] == MODEL
        assert body["id"].startswith("cmpl-")
        (choice,) = body["choices"]
        assert json.loads(choice["text"])["raw"] is True
        assert choice["finish_reason"] == "length"  # 3 completion tokens of 3 allowed
        assert "message" not in choice
        assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


def test_raw_with_image_or_system_is_an_error_answer(echo_server: BackendServer) -> None:
    backend = client(echo_server)
    received = echo_server.received
    with_image, with_system, empty, fine = backend.generate(
        [
            Request(prompt="look", raw=True, image=png_bytes()),
            Request(prompt="hi", raw=True, system="be brief"),
            Request(prompt="", raw=True),
            Request(prompt="hi", raw=True),
        ]
    )
    assert with_image.text is None and with_image.error is not None
    assert with_image.error.startswith("bad_request: ") and "image" in with_image.error
    assert with_system.text is None and with_system.error is not None
    assert with_system.error.startswith("bad_request: ") and "system" in with_system.error
    assert empty.error is not None and empty.error.startswith("bad_request: ")
    assert fine.error is None
    assert echo_server.received == received + 1  # the refused ones were never sent
    assert backend.stats["requests"] == 4 and backend.stats["errors"] == 3
    assert backend.stats["attempts"] == 1


def test_parse_completion_request(echo_server: BackendServer) -> None:
    request = parse_completion_request(
        {
            "model": MODEL,
            "prompt": RAW_PROMPT,
            "max_tokens": 9,
            "temperature": 0.7,
            "seed": 5,
            "structured_outputs": {"regex": "[0-9]+"},
            "add_special_tokens": False,
        }
    )
    assert request == Request(
        prompt=RAW_PROMPT, raw=True, max_tokens=9, temperature=0.7, regex="[0-9]+", seed=5
    )
    assert parse_completion_request({"prompt": "hi"}) == Request(prompt="hi", raw=True)
    assert parse_completion_request({"prompt": "hi", "guided_regex": "a"}).regex == "a"
    bad_bodies: list[Any] = [
        [],
        {},
        {"prompt": ["a", "b"]},  # several prompts
        {"prompt": [1, 2, 3]},  # token ids
        {"prompt": 7},
        {"prompt": ""},
        {"prompt": "hi", "stream": True},
        {"prompt": "hi", "n": 2},
        {"prompt": "hi", "best_of": 3},
        {"prompt": "hi", "echo": True},
        {"prompt": "hi", "suffix": "end"},
        {"prompt": "hi", "add_special_tokens": True},
        {"prompt": "hi", "max_tokens": 0},
        {"prompt": "hi", "temperature": -1},
    ]
    for body in bad_bodies:
        with pytest.raises(BadRequestError):
            parse_completion_request(body)
    # over the wire: a 400 in OpenAI's error shape, counted as rejected; the chat
    # path does not take a prompt, nor the completions path messages
    rejected = echo_server.rejected
    url = f"{echo_server.base_url}/completions"
    response = requests.post(url, json={"model": MODEL, "prompt": ["a", "b"]}, timeout=5)
    assert response.status_code == 400
    assert "prompt must be a string" in response.json()["error"]["message"]
    response = requests.post(url, json={"model": MODEL, **_user("hi")}, timeout=5)
    assert response.status_code == 400
    response = requests.post(
        f"{echo_server.base_url}/chat/completions", json={"prompt": "hi"}, timeout=5
    )
    assert response.status_code == 400
    response = requests.post(url, json={"model": "other", "prompt": "hi"}, timeout=5)
    assert response.status_code == 404
    assert echo_server.rejected == rejected + 4


def test_tiny_model_raw_end_to_end(tiny_server: tuple[Backend, BackendServer]) -> None:
    """Raw requests through the real server answer exactly what the model answers in
    process, and differ from the chat-templated answers to the same prompts."""
    model, server = tiny_server
    requests_ = [
        Request(prompt=RAW_PROMPT, raw=True, max_tokens=8),
        Request(prompt="<s> The old man holds a book.", raw=True, max_tokens=6),
        Request(prompt="<s> There are", raw=True, max_tokens=6, regex=r"[0-9]{2,3}"),
        Request(prompt="<s> A dog", raw=True, max_tokens=6, temperature=0.9, seed=11),
    ]
    remote = OpenAIBackend(server.base_url, "tiny", concurrency=4, timeout_s=60)
    served = server.served
    answers = remote.generate(requests_)
    assert server.served == served + len(requests_)
    local = [model.generate([r])[0] for r in requests_]
    for answer, direct in zip(answers, local, strict=True):
        assert answer.error is None, answer.error
        assert answer.text == direct.text
        assert (answer.prompt_tokens, answer.completion_tokens) == (
            direct.prompt_tokens,
            direct.completion_tokens,
        )
    assert answers[2].text is not None and re.fullmatch(r"[0-9]{2,3}", answers[2].text)
    chat = remote.generate([replace(r, raw=False) for r in requests_[:2]])
    assert [a.text for a in chat] != [a.text for a in answers[:2]]
    assert all(c.prompt_tokens > a.prompt_tokens for c, a in zip(chat, answers, strict=False))
    # nothing is added to a raw prompt: its token count is the prompt's own
    in_process: Any = model
    ids = in_process.tokenizer.encode(RAW_PROMPT, add_special_tokens=False)
    assert ids[0] == in_process.tokenizer.bos_token_id and answers[0].prompt_tokens == len(ids)
