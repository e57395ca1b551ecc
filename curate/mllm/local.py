"""An in-process ``transformers`` vision-language model behind :class:`Backend`.

:class:`TransformersBackend` loads a model folder through the standard auto
classes (``AutoProcessor`` and ``AutoModelForImageTextToText``), renders each
:class:`Request` with the processor's chat template and answers batches with
``model.generate``.

Design choices:

* **Raw requests** (``Request.raw``) skip the chat template: the prompt is
  tokenized as is, with ``add_special_tokens=False`` like the rendered chat
  texts, so nothing is added and a literal ``<s>`` (any special token's text) in
  the prompt becomes that token when the tokenizer knows it.  They are text only:
  a raw request with an image or a system message (or an empty prompt) gets
  ``Answer(error="bad_request: ...")`` before any batch runs.  Raw requests share
  batches with text-only chat requests (left padding keeps every row's answer its
  own); regex constraints and seeded sampling apply to them unchanged.

* **Batching with left padding.**  Decoder-only generation appends to the
  right end of every row, so prompts are padded on the left and the attention
  mask hides the padding.  Requests with and without an image are batched
  separately (a few processors cannot mix them in one call); within those
  groups requests keep their order and are cut into chunks of ``batch_size``.
  Each row's ``max_tokens`` is honoured by a per-row stopping criterion, so
  requests with different limits share a batch.
* **Decoding happens per row in one logits processor.**  ``generate`` is
  always called greedy (``do_sample=False``); :class:`RowDecoder` rewrites the
  scores of the rows that need more than the arg-max: it picks the row's token
  itself and leaves only that token finite, which ``generate``'s arg-max then
  selects.  This gives every request its own temperature, its own random
  generator seeded with ``Request.seed`` (so a sampled answer does not depend
  on which other requests share its batch, or on the global torch RNG), and
  its own regex.  Greedy rows without a regex are left alone.  No global
  torch state (``manual_seed``, deterministic-algorithm flags) is touched, as
  nothing needs it: greedy decoding uses no randomness, and on CPU in float32
  a row's logits differ between batch sizes by rounding at most, which does
  not move the arg-max in practice (the tests check batch sizes 1 and 4).  On
  GPU in bfloat16, batch-size invariance is not guaranteed.
* **Regex-constrained ("guided") decoding.**  For a row with ``Request.regex``
  a token is allowed when the text generated so far plus the token's text is
  still a *partial* match of the pattern (``regex.fullmatch(p, s,
  partial=True)``: ``s`` is a prefix of some string the pattern matches in
  full); EOS is allowed only when the text is a *complete* match.  Rather than
  masking the whole vocabulary (one regex call per token per step), candidates
  are checked in descending logit order and, for greedy rows, the first
  allowed one wins: on a trained model it is almost always among the first
  few.  Sampled rows check the 50 best tokens and sample among the allowed
  ones (top-k sampling within the constraint), falling back to a scan of the
  whole vocabulary when none of the 50 is allowed.  When no token at all is
  allowed (or ``max_tokens`` runs out first) the row ends with the text it
  has: a partial match that the caller's strict parser rejects.
* **Token texts** are decoded once per model and cached: a token's text is
  ``decode([anchor, token])`` minus ``decode([anchor])``, which keeps the
  leading space that SentencePiece-style decoders drop from a lone first
  token.  Special tokens other than EOS, empty tokens (they could repeat
  forever) and tokens that decode to an incomplete UTF-8 sequence (U+FFFD) are
  never allowed under a regex.  Partial-match results are cached per
  (pattern, text so far, token).
* **Failures stay per request.**  An image that PIL cannot decode gives
  ``Answer(error="bad_image: ...")`` and an invalid pattern ``bad_regex: ...``
  before any batch runs; when a whole batch fails (a chat template that
  refuses a system message, out of memory) its requests are retried one at a
  time and those that still fail get ``generate_failed: ...``.
* **Fingerprint**: unless given, the sha256 over the sorted (relative path,
  file sha256) pairs of the model folder, so a cached answer is never reused
  for other weights, tokenizer or chat template.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from curate.mllm.backend import Answer, Backend, Request, raw_problem

#: Candidates a sampled, regex-constrained row checks before scanning the vocabulary.
SAMPLE_TOP_K = 50
#: Candidates converted from the sorted order at a time, for greedy regex rows.
_CHUNK = 256
#: Partial-match results kept per pattern before the cache is cleared.
_CACHE_LIMIT = 1_000_000


def directory_fingerprint(path: str | Path) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of a folder's files:
    the model folder's fingerprint in a manifest (:func:`curate.models.folder_digest`)."""
    from curate.models import folder_digest

    return folder_digest(path)[1]


def _resolve_device(device: str) -> torch.device:
    # ``auto``: the GPU Ray gave this actor, never an unreserved one it can merely see
    from curate.clip import pick_device

    return torch.device(pick_device(device))


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    resolved = getattr(torch, aliases.get(dtype, dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return resolved


class TokenTexts:
    """Each token's text (cached) and which tokens a regex may never produce."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.eos_ids = frozenset(eos_ids)
        n = min(len(tokenizer), vocab_size)
        anchor_ids = tokenizer.encode("a", add_special_tokens=False)
        anchor = anchor_ids[-1]
        prefix = tokenizer.decode([anchor], clean_up_tokenization_spaces=False)
        decoded = tokenizer.batch_decode(
            [[anchor, i] for i in range(n)], clean_up_tokenization_spaces=False
        )
        self.texts: list[str] = [
            s[len(prefix) :] if s.startswith(prefix) else tokenizer.decode([i])
            for i, s in enumerate(decoded)
        ]
        special = set(getattr(tokenizer, "all_special_ids", []))
        special.update(
            i
            for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
            if getattr(t, "special", False)
        )
        #: token id -> whether it may ever appear in regex-constrained text
        self.usable: list[bool] = [
            bool(t) and "\ufffd" not in t and i not in special for i, t in enumerate(self.texts)
        ]
        self.usable.extend([False] * (vocab_size - n))
        self.texts.extend([""] * (vocab_size - n))


class Constraint:
    """A compiled pattern and its cached partial-match verdicts."""

    def __init__(self, pattern: str) -> None:
        self.pattern = regex.compile(pattern)
        self._cache: dict[tuple[str, int], bool] = {}

    def complete(self, text: str) -> bool:
        return self.pattern.fullmatch(text) is not None

    def allows(self, text: str, token: int, vocab: TokenTexts) -> bool:
        if token in vocab.eos_ids:
            return self.complete(text)
        if token >= len(vocab.usable) or not vocab.usable[token]:
            return False
        key = (text, token)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = self.pattern.fullmatch(text + vocab.texts[token], partial=True) is not None
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = verdict
        return verdict


@dataclass
class RowPlan:
    """How one row of a batch is decoded."""

    temperature: float
    constraint: Constraint | None
    generator: torch.Generator | None

    @property
    def plain_greedy(self) -> bool:
        return self.generator is None and self.constraint is None


class RowDecoder(LogitsProcessor):
    """Per-row sampling and regex constraints; leaves only the chosen token finite."""

    def __init__(
        self,
        plans: Sequence[RowPlan],
        limits: Sequence[int],
        prompt_len: int,
        eos_ids: Sequence[int],
        vocab: TokenTexts | None,
    ) -> None:
        self.plans = list(plans)
        self.limits = list(limits)
        self.prompt_len = prompt_len
        self.eos_ids = frozenset(eos_ids)
        self.vocab = vocab

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row, plan in enumerate(self.plans):
            if plan.plain_greedy:
                continue
            generated = input_ids[row, self.prompt_len :].tolist()
            if len(generated) >= self.limits[row] or any(t in self.eos_ids for t in generated):
                continue  # finished: generate() pads this row whatever is chosen
            token = self._choose(plan, generated, scores[row].detach().float().cpu())
            scores[row].fill_(float("-inf"))
            scores[row, token] = 0.0
        return scores

    def _choose(self, plan: RowPlan, generated: list[int], logits: torch.Tensor) -> int:
        constraint, vocab = plan.constraint, self.vocab
        if constraint is None or vocab is None:
            return _sample(logits, plan)
        text = "".join(vocab.texts[t] for t in generated)
        order = torch.argsort(logits, descending=True, stable=True)
        if plan.generator is None:
            for token in _iter_order(order):
                if constraint.allows(text, token, vocab):
                    return token
            return self._forced_eos()
        allowed: list[int] = [
            t for t in order[:SAMPLE_TOP_K].tolist() if constraint.allows(text, t, vocab)
        ]
        if not allowed:
            allowed = [
                t for t in _iter_order(order[SAMPLE_TOP_K:]) if constraint.allows(text, t, vocab)
            ]
        if not allowed:
            return self._forced_eos()
        return allowed[_sample(logits[torch.tensor(allowed)], plan)]

    def _forced_eos(self) -> int:
        if not self.eos_ids:
            raise RuntimeError("regex-constrained decoding needs an EOS token")
        return min(self.eos_ids)


def _sample(logits: torch.Tensor, plan: RowPlan) -> int:
    """An index drawn from softmax(logits / temperature) with the row's own generator."""
    logits = logits.double()
    if not bool(torch.isfinite(logits).any()):
        logits = torch.zeros_like(logits)  # every candidate masked upstream: uniform
    probs = torch.softmax(logits / plan.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=plan.generator).item())


def _iter_order(order: torch.Tensor) -> Iterator[int]:
    for start in range(0, order.numel(), _CHUNK):
        yield from order[start : start + _CHUNK].tolist()


class RowLimits(StoppingCriteria):
    """Stops each row after its own ``max_tokens``."""

    def __init__(self, limits: Sequence[int], prompt_len: int) -> None:
        self.limits = torch.tensor(list(limits))
        self.prompt_len = prompt_len

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        done = (input_ids.shape[1] - self.prompt_len) >= self.limits.to(input_ids.device)
        return done  # type: ignore[return-value]


@dataclass
class _Prepared:
    index: int
    request: Request
    image: Any  # PIL image, or None
    constraint: Constraint | None


class TransformersBackend(Backend):
    """A ``transformers`` image-text-to-text model, in this process."""

    def __init__(
        self,
        model_dir: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        fingerprint: str | None = None,
        max_pixels: int = 89_478_485,
    ) -> None:
        self.max_pixels = max_pixels
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.model_dir = str(model_dir)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.fingerprint = fingerprint or directory_fingerprint(self.model_dir)
        self.processor: Any = AutoProcessor.from_pretrained(self.model_dir)  # type: ignore[no-untyped-call]
        self.tokenizer: Any = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.padding_side = "left"
        model: Any = AutoModelForImageTextToText.from_pretrained(self.model_dir, dtype=self.dtype)
        self.model: Any = model.to(self.device).eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        if (
            self.tokenizer.eos_token_id is not None
            and self.tokenizer.eos_token_id not in self.eos_ids
        ):
            self.eos_ids.append(self.tokenizer.eos_token_id)
        pad = self.tokenizer.pad_token_id
        self.pad_id: int | None = (
            pad if pad is not None else (self.eos_ids[0] if self.eos_ids else None)
        )
        self._vocab: TokenTexts | None = None
        self._constraints: dict[str, Constraint] = {}

    # -- public -------------------------------------------------------------

    def generate(self, requests: Sequence[Request]) -> list[Answer]:
        if self.model is None:
            raise RuntimeError("TransformersBackend is closed")
        answers: list[Answer | None] = [None] * len(requests)
        ready: list[_Prepared] = []
        for i, request in enumerate(requests):
            prepared, error = self._prepare(i, request)
            if prepared is None:
                answers[i] = error
            else:
                ready.append(prepared)
        with_image = [p for p in ready if p.image is not None]
        text_only = [p for p in ready if p.image is None]
        for group in (with_image, text_only):
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                for p, answer in zip(batch, self._run_safely(batch), strict=True):
                    answers[p.index] = answer
        return [a if a is not None else Answer(text=None, error="no answer") for a in answers]

    def close(self) -> None:
        if getattr(self, "model", None) is None:
            return
        on_cuda = self.device.type == "cuda"
        self.model = None
        self.processor = None
        self.tokenizer = None
        self._vocab = None
        self._constraints.clear()
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    # -- internals ----------------------------------------------------------

    def _prepare(self, index: int, request: Request) -> tuple[_Prepared | None, Answer | None]:
        problem = raw_problem(request)
        if problem is not None:
            return None, Answer(text=None, error=problem)
        image = None
        if request.image is not None:
            # decompression bombs refused from the header, RGB with transparency on
            # white, reasons free of object addresses: the same decoding as CLIP's
            from curate.clip import decode

            decoded = decode(request.image, self.max_pixels)
            if isinstance(decoded, tuple):
                return None, Answer(text=None, error=f"bad_image: {decoded[0]}: {decoded[1]}")
            image = decoded
        constraint = None
        if request.regex is not None:
            try:
                constraint = self._constraint(request.regex)
            except regex.error as exc:
                return None, Answer(text=None, error=f"bad_regex: {exc}")
        return _Prepared(index, request, image, constraint), None

    def _constraint(self, pattern: str) -> Constraint:
        constraint = self._constraints.get(pattern)
        if constraint is None:
            constraint = self._constraints[pattern] = Constraint(pattern)
        return constraint

    def _token_texts(self) -> TokenTexts:
        if self._vocab is None:
            vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
            self._vocab = TokenTexts(self.tokenizer, vocab_size, self.eos_ids)
        return self._vocab

    def _run_safely(self, batch: list[_Prepared]) -> list[Answer]:
        try:
            return self._run(batch)
        except Exception as exc:
            if len(batch) == 1:
                return [Answer(text=None, error=f"generate_failed: {type(exc).__name__}: {exc}")]
        return [answer for p in batch for answer in self._run_safely([p])]

    def _messages(self, request: Request) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if request.system is not None:
            messages.append(
                {"role": "system", "content": [{"type": "text", "text": request.system}]}
            )
        content: list[dict[str, Any]] = []
        if request.image is not None:
            content.append({"type": "image"})
        content.append({"type": "text", "text": request.prompt})
        messages.append({"role": "user", "content": content})
        return messages

    def input_text(self, request: Request) -> str:
        """The text the tokenizer gets for ``request`` (with ``add_special_tokens=False``):
        a raw request's prompt as is, else the chat template's rendering."""
        if request.raw:
            return request.prompt
        text: str = self.processor.apply_chat_template(
            self._messages(request), add_generation_prompt=True, tokenize=False
        )
        return text

    @torch.inference_mode()
    def _run(self, batch: list[_Prepared]) -> list[Answer]:
        texts = [self.input_text(p.request) for p in batch]
        images = [p.image for p in batch if p.image is not None]
        inputs = self.processor(
            text=texts,
            images=images or None,
            padding=True,
            add_special_tokens=False,
            return_tensors="pt",
        )
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        prompt_len = int(inputs["input_ids"].shape[1])
        plans = [
            RowPlan(
                temperature=p.request.temperature,
                constraint=p.constraint,
                generator=(
                    torch.Generator().manual_seed(p.request.seed)
                    if p.request.temperature > 0
                    else None
                ),
            )
            for p in batch
        ]
        limits = [max(1, p.request.max_tokens) for p in batch]
        processors = LogitsProcessorList()
        if not all(plan.plain_greedy for plan in plans):
            has_regex = any(plan.constraint is not None for plan in plans)
            vocab = self._token_texts() if has_regex else None
            processors.append(RowDecoder(plans, limits, prompt_len, self.eos_ids, vocab))
        output = self.model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(limits),
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
            logits_processor=processors,
            stopping_criteria=StoppingCriteriaList([RowLimits(limits, prompt_len)]),
        )
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        answers = []
        for row, limit in enumerate(limits):
            generated = output[row, prompt_len:].tolist()[:limit]
            end = next((k for k, t in enumerate(generated) if t in self.eos_ids), None)
            count = len(generated) if end is None else end + 1
            kept = generated if end is None else generated[:end]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            answers.append(
                Answer(text=text, prompt_tokens=int(prompt_tokens[row]), completion_tokens=count)
            )
        return answers
