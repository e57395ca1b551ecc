"""The contract every generative backend implements.

A :class:`Request` is one chat turn: a prompt, at most one image (encoded
bytes, as stored in the data) and decoding settings; or, with ``raw`` set, a
plain completion whose prompt is the model's whole input (for base models
without a chat template).  A backend answers a list of requests with one
:class:`Answer` each, in order.  A backend never raises for a single failed
request: the answer carries ``error`` and the stage turns it into a rejected
row with that reason.  ``fingerprint`` names the model (weights hash, or
endpoint + served model name) so that cached answers are never reused for a
different model.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One chat turn for the model (or, with ``raw``, one plain completion)."""

    prompt: str
    #: Encoded image bytes (PNG, JPEG, ...), or None for a text-only request.
    image: bytes | None = None
    system: str | None = None
    max_tokens: int = 64
    #: 0 means greedy decoding.
    temperature: float = 0.0
    #: Constrain the answer to this regular expression (guided decoding), when set.
    regex: str | None = None
    seed: int = 0
    #: A plain completion: the prompt is the model's whole input, tokenized as is
    #: (no chat template, no system message, no special tokens added: a literal
    #: ``<s>`` in the prompt is the BOS token), text only.  Over HTTP it goes to the
    #: ``/completions`` endpoint instead of ``/chat/completions``.  A raw request
    #: with ``system`` or ``image`` set, or with an empty prompt, is answered with an
    #: error (see :func:`raw_problem`).
    raw: bool = False

    def key(self, fingerprint: str) -> str:
        """Cache key: the model's fingerprint and everything that shapes the answer."""
        digest = hashlib.sha256()
        image_hash = hashlib.sha256(self.image).hexdigest() if self.image is not None else None
        body = {
            "model": fingerprint,
            "prompt": self.prompt,
            "image": image_hash,
            "system": self.system,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "regex": self.regex,
            "seed": self.seed,
        }
        if self.raw:  # only when set: every key of a chat request stays as it was
            body["raw"] = True
        digest.update(json.dumps(body, sort_keys=True).encode())
        return digest.hexdigest()


def raw_problem(request: Request) -> str | None:
    """Why a raw request cannot be answered (the text of an error answer), or None."""
    if not request.raw:
        return None
    if request.image is not None:
        return "bad_request: a raw request is text only: it cannot carry an image"
    if request.system is not None:
        return (
            "bad_request: a raw request cannot carry a system message "
            "(its prompt is the model's whole input)"
        )
    if not request.prompt:
        return "bad_request: a raw request needs a non-empty prompt"
    return None


@dataclass(frozen=True)
class Answer:
    """The model's answer, or why there is none."""

    text: str | None
    #: Set when no answer could be had (after retries); the text is then None.
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Whether the answer came from the request cache.
    cached: bool = False


class Backend(ABC):
    """A generative model behind :meth:`generate`."""

    #: Identity of the model: weights hash or endpoint + served model name.
    fingerprint: str

    @abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        """One answer per request, in order; never raises for one failed request."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads, GPU memory."""
