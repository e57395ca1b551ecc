"""Backend settings every generative stage shares, and the backend they build.

``backend:`` in a stage's YAML is one of

* ``kind: openai``: an OpenAI-compatible chat-completions endpoint (vLLM,
  SGLang, TGI) with bounded concurrency, timeouts and retries with back-off;
* ``kind: transformers``: a model folder loaded in the actor.

``request_cache:`` puts the backend behind the request cache (answers kept by
model fingerprint and request, under the run's ``_state/<stage>/requests`` or
a folder or ``s3://`` prefix), so a resumed run asks only for what it lacks.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from curate.io import storage
from curate.mllm.backend import Answer, Backend, Request
from curate.stage import Requirement, Resources, Stage, StageConfig


class OpenAIBackendConfig(StageConfig):
    kind: Literal["openai"]
    #: e.g. ``http://127.0.0.1:8000/v1``; credentials never go here.
    base_url: str
    #: The served model's name.
    model: str
    #: Environment variable holding the API key (sent as a bearer token), if any.
    api_key_env: str | None = None
    concurrency: int = Field(16, ge=1)
    timeout_s: float = Field(120.0, gt=0)
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)


class TransformersBackendConfig(StageConfig):
    kind: Literal["transformers"]
    #: A ``save_pretrained`` folder (relative to the pipeline file, or absolute).
    model: str
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = Field(8, ge=1)


BackendConfig = Annotated[
    OpenAIBackendConfig | TransformersBackendConfig, Field(discriminator="kind")
]


def build_backend(config: BackendConfig, base_dir: str, guided: bool) -> Backend:
    """The backend a stage config names (heavy imports happen here, in the actor)."""
    if isinstance(config, OpenAIBackendConfig):
        from curate.mllm.http import OpenAIBackend

        return OpenAIBackend(
            config.base_url,
            config.model,
            api_key_env=config.api_key_env,
            concurrency=config.concurrency,
            timeout_s=config.timeout_s,
            retries=config.retries,
            backoff_s=config.backoff_s,
            max_backoff_s=config.max_backoff_s,
            guided="vllm" if guided else "none",
        )
    from curate.mllm.local import TransformersBackend
    from curate.models import resolve

    model = resolve(config.model, base_dir)
    return TransformersBackend(
        model.path,
        device=config.device,
        dtype=config.dtype,
        batch_size=config.batch_size,
        fingerprint=f"transformers:{model.sha256}",
    )


def cached(backend: Backend, cache: bool | str, context: Any) -> Backend:
    """``backend`` behind the request cache the stage config asks for."""
    if cache is False:
        return backend
    from curate.mllm.cache import CachedBackend, RequestCache

    if isinstance(cache, str):
        # a folder that may not exist yet, relative to the pipeline file
        absolute = storage.is_s3(cache) or os.path.isabs(cache)
        root = cache if absolute else os.path.join(context.base_dir, cache)
    elif context.state_dir is not None:
        root = storage.join(context.state_dir, "requests")
    else:
        return backend  # outside a run: nowhere to keep it
    return CachedBackend(backend, RequestCache(root, context.storage))


class BackendStageConfig(StageConfig):
    """Fields every stage that asks a backend has."""

    backend: BackendConfig
    #: True: under the run's state folder; a folder or s3:// prefix; False: none.
    request_cache: bool | str = True


def answer_error(answer: Answer) -> tuple[str, str] | None:
    """(reason, detail) when a backend gave no answer: ``bad_image`` (the in-process
    model could not decode the image) or ``backend_error`` (after its retries)."""
    if answer.error is not None and answer.error.startswith("bad_image"):
        return "bad_image", answer.error[:200]
    if answer.error is not None or answer.text is None:
        return "backend_error", (answer.error or "no answer")[:200]
    return None


class BackendStage(Stage):
    """What a stage that asks a generative backend shares: its resources (a GPU for
    an in-process model, a sliver of CPU for an HTTP client), the model reference
    for the manifest, the cached backend built once per actor, and flushing the
    request cache after each batch (a crash later loses no answer)."""

    config: Any
    backend: Backend | None = None
    requires = (Requirement("requests", "requests"),)
    #: Reasons name a question and a parse failure from fixed sets: counted in full.
    reason_details: ClassVar[bool] = True
    #: Off: a cached stage entry would freeze backend_error rows, and the request cache
    #: already spares every answer a second ask.
    cache_default: ClassVar[bool] = False
    #: Whether requests are regex-constrained (for the HTTP client's guided mode).
    guided_decoding: ClassVar[bool] = False

    @classmethod
    def resources_for(cls, config: StageConfig) -> Resources:
        backend = getattr(config, "backend", None)
        if isinstance(backend, TransformersBackendConfig):
            return Resources(num_gpus="auto")
        # an HTTP client waits on the network: many threads, little CPU
        return Resources(num_cpus=0.5)

    def models(self) -> Mapping[str, str]:
        backend = self.config.backend
        if isinstance(backend, TransformersBackendConfig):
            return {"backend.model": backend.model}
        return {}

    def guided(self) -> bool:
        return bool(getattr(self.config, "guided", False))

    def setup(self) -> None:
        if self.backend is None:
            inner = build_backend(self.config.backend, self.context.base_dir, self.guided())
            self.backend = cached(inner, self.config.request_cache, self.context)

    def ask(self, requests: Sequence[Request]) -> list[Answer]:
        """Answers to ``requests``, then the new ones persisted and counted."""
        self.setup()
        assert self.backend is not None
        answers = self.backend.generate(requests) if requests else []
        from curate.mllm.cache import CachedBackend

        if isinstance(self.backend, CachedBackend):
            self.backend.cache.flush()
        traffic: Counter[str] = self.__dict__.setdefault("_traffic", Counter())
        traffic["requests"] += len(requests)
        traffic["cached_answers"] += sum(a.cached for a in answers)
        traffic["failed_requests"] += sum(a.error is not None for a in answers)
        traffic["prompt_tokens"] += sum(a.prompt_tokens for a in answers)
        traffic["completion_tokens"] += sum(a.completion_tokens for a in answers)
        return answers

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to the data counter ``name`` (see :meth:`Stage.counters`)."""
        counts: Counter[str] = self.__dict__.setdefault("_counts", Counter())
        counts[name] += n

    def counters(self) -> Mapping[str, int]:
        return dict(self.__dict__.get("_counts", {}))

    def run_counters(self) -> Mapping[str, int]:
        return dict(self.__dict__.get("_traffic", {}))
