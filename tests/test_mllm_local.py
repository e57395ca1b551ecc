"""The in-process transformers backend against a tiny random-weight LLaVA built offline:
loading through the auto classes, reproducible builds, batch-independent greedy and
sampled answers, regex-constrained decoding, per-request errors and token counts."""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import regex
from PIL import Image

from curate.mllm.backend import Answer, Request
from curate.mllm.local import TransformersBackend, directory_fingerprint
from curate.mllm.tiny import build_tiny_vlm

SCORE = r"(100|[1-9][0-9]?)"


def encode(mode: str, size: tuple[int, int], color: object, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, fmt)  # type: ignore[arg-type]
    return buffer.getvalue()


IMAGES = [
    encode("RGB", (40, 30), (255, 0, 0)),
    encode("RGB", (32, 32), (0, 200, 50), "JPEG"),
    encode("L", (64, 20), 128),
    encode("RGBA", (25, 50), (10, 20, 250, 128)),
    encode("RGB", (100, 100), (250, 250, 0)),
    encode("P", (33, 17), 7),
]
PROMPTS = [
    "Rate the quality of this image from 1 to 100.",
    "How many objects are there?",
    "Describe the picture.",
    "Is this a photo? Answer with a number.",
    "What color is the sky?",
    "Give a short caption.",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny") / "vlm", seed=0)


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> Iterator[TransformersBackend]:
    b = TransformersBackend(str(model_dir), batch_size=4)
    yield b
    b.close()


def image_requests(max_tokens: int) -> list[Request]:
    return [
        Request(
            prompt=PROMPTS[i % len(PROMPTS)], image=IMAGES[i % len(IMAGES)], max_tokens=max_tokens
        )
        for i in range(8)
    ]


def test_builds_small_and_loads_through_auto_classes(model_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    total = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    assert total < 5 * 1024 * 1024
    processor: Any = AutoProcessor.from_pretrained(str(model_dir))  # type: ignore[no-untyped-call]
    model: Any = AutoModelForImageTextToText.from_pretrained(str(model_dir))
    assert model.config.model_type == "llava"

    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer with a number."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Score 42?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "Answer with a number." in text and "Score 42?" in text
    assert text.endswith("<|assistant|>\n")
    image = Image.open(io.BytesIO(IMAGES[0])).convert("RGB")
    inputs = processor(text=[text], images=[image], return_tensors="pt", add_special_tokens=False)
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_id) == model.config.image_seq_length == 16
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]

    tokenizer = processor.tokenizer
    assert tokenizer.tokenize("1234567890") == list("1234567890")  # digits one by one
    assert all(len(tokenizer.encode(d, add_special_tokens=False)) == 1 for d in "0123456789")
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in tokenizer.encode("ü∑€")


def test_build_is_byte_identical_for_a_seed(model_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_vlm(tmp_path / "again", seed=0)
    other = build_tiny_vlm(tmp_path / "other", seed=1)
    files = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    assert Path("model.safetensors") in files
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (model_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    assert (model_dir / "model.safetensors").read_bytes() != (
        other / "model.safetensors"
    ).read_bytes()
    assert directory_fingerprint(model_dir) == directory_fingerprint(again)
    assert directory_fingerprint(model_dir) != directory_fingerprint(other)


def test_fingerprint_defaults_to_the_folder_hash(model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(model_dir, tmp_path / "copy"))
    assert TransformersBackend(str(copy)).fingerprint == directory_fingerprint(model_dir)
    assert TransformersBackend(str(copy), fingerprint="x").fingerprint == "x"
    (copy / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    assert directory_fingerprint(copy) != directory_fingerprint(model_dir)


def test_greedy_is_deterministic_across_instances_and_batch_sizes(
    model_dir: Path, backend: TransformersBackend
) -> None:
    requests = [*image_requests(max_tokens=12), Request(prompt="Hello there.", max_tokens=7)]
    # different lengths in one batch: left padding must not change any row's answer
    requests[2] = Request(prompt=PROMPTS[2] * 5, image=IMAGES[2], max_tokens=12)
    first = backend.generate(requests)
    single = TransformersBackend(str(model_dir), batch_size=1)
    try:
        alone = single.generate(requests)
    finally:
        single.close()
    assert first == alone
    assert backend.generate(requests) == first
    assert all(a.error is None and a.text for a in first)
    assert len({a.text for a in first}) > 1  # answers depend on the input


def test_regex_constrains_every_answer(backend: TransformersBackend) -> None:
    systems = [None, "Answer with a number only."]
    requests = [
        Request(
            prompt=f"{PROMPTS[i % len(PROMPTS)]} ({i})",
            image=IMAGES[i % len(IMAGES)] if i % 3 else None,
            system=systems[i % 2],
            max_tokens=8,
            regex=SCORE,
        )
        for i in range(10)
    ]
    answers = backend.generate(requests)
    for answer in answers:
        assert answer.error is None
        assert answer.text is not None and regex.fullmatch(SCORE, answer.text), answer
        assert answer.completion_tokens == len(answer.text) + 1  # digits, then EOS
    # the constraint is what makes them match: unconstrained answers do not
    free = backend.generate([replace(r, regex=None) for r in requests])
    assert not any(regex.fullmatch(SCORE, a.text or "") for a in free)


def test_regex_other_patterns_and_sampling(backend: TransformersBackend) -> None:
    patterns = [r"(yes|no)", r"[A-D]", r'\{"score": [0-9]\}', r"[a-z]+( [a-z]+){2}"]
    requests = [
        Request(prompt=PROMPTS[i], image=IMAGES[i], max_tokens=16, regex=p, temperature=t, seed=i)
        for i, p in enumerate(patterns)
        for t in (0.0, 1.0)
    ]
    for request, answer in zip(requests, backend.generate(requests), strict=True):
        assert answer.text is not None and regex.fullmatch(request.regex or "", answer.text), (
            request.regex,
            answer,
        )


def test_sampling_follows_the_request_seed(model_dir: Path, backend: TransformersBackend) -> None:
    def sampled(seed: int) -> Request:
        return Request(
            prompt="Describe it.", image=IMAGES[1], max_tokens=10, temperature=1.0, seed=seed
        )

    requests = [sampled(s) for s in range(5)] + [Request(prompt="x", max_tokens=5)]
    answers = backend.generate(requests)
    single = TransformersBackend(str(model_dir), batch_size=1)
    try:
        assert single.generate(requests[::-1]) == answers[::-1]
    finally:
        single.close()
    assert len({a.text for a in answers[:5]}) > 1  # the seed matters
    greedy = backend.generate([Request(prompt="Describe it.", image=IMAGES[1], max_tokens=10)])
    assert greedy[0].text not in {a.text for a in answers[:5]}


def test_bad_image_is_an_error_answer_and_the_batch_goes_on(backend: TransformersBackend) -> None:
    good = image_requests(max_tokens=5)[:3]
    requests = [good[0], Request(prompt="What is it?", image=b"\x89PNG not really"), *good[1:]]
    requests.append(Request(prompt="Score?", image=IMAGES[0][:40], regex=SCORE))  # truncated
    answers = backend.generate(requests)
    for i in (1, 4):
        error = answers[i].error
        assert answers[i].text is None
        assert error is not None and error.startswith("bad_image: ")
        assert "0x" not in error  # a reproducible message
    assert [a.text is not None and a.error is None for a in answers] == [
        True,
        False,
        True,
        True,
        False,
    ]
    assert [answers[0], answers[2], answers[3]] == backend.generate(good)
    bad_regex = backend.generate([Request(prompt="x", regex="(unclosed"), good[0]])
    assert bad_regex[0].error is not None and bad_regex[0].error.startswith("bad_regex: ")
    assert bad_regex[1] == answers[0]


def test_text_only_requests_and_token_counts(backend: TransformersBackend) -> None:
    requests = [
        Request(prompt="Hello, how are you?", max_tokens=6),
        Request(prompt="Hello, how are you?", system="Be brief.", max_tokens=6),
        Request(prompt="Hello, how are you?", image=IMAGES[0], max_tokens=6),
        Request(prompt="Count to three.", max_tokens=2),
    ]
    answers = backend.generate(requests)
    assert all(isinstance(a, Answer) and a.error is None and a.text is not None for a in answers)
    assert all(a.prompt_tokens > 0 and a.completion_tokens > 0 for a in answers)
    assert all(a.completion_tokens <= r.max_tokens for a, r in zip(answers, requests, strict=True))
    assert answers[3].completion_tokens <= 2
    # a system turn and the image's 16 placeholders lengthen the prompt
    assert answers[1].prompt_tokens > answers[0].prompt_tokens
    assert answers[2].prompt_tokens >= answers[0].prompt_tokens + 16
    assert backend.generate([]) == []


# --- raw (plain completion) requests ---------------------------------------------------

RAW_PROMPT = "<s> <CON> The cat sits on a table. </CON>\n\n"


def test_raw_prompt_is_the_whole_input(backend: TransformersBackend) -> None:
    raw = Request(prompt=RAW_PROMPT, raw=True, max_tokens=8)
    chat = replace(raw, raw=False)
    assert backend.input_text(raw) == RAW_PROMPT  # no chat template
    assert backend.input_text(chat) != RAW_PROMPT
    assert backend.input_text(chat).endswith("<|assistant|>\n")
    ids = backend.tokenizer(RAW_PROMPT, add_special_tokens=False)["input_ids"]
    bos = backend.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # the literal <s> is the one BOS token

    (answer,) = backend.generate([raw])
    (templated,) = backend.generate([chat])
    assert answer.error is None and answer.text
    assert answer.prompt_tokens == len(ids)  # nothing added
    assert templated.prompt_tokens > answer.prompt_tokens
    assert answer.text != templated.text  # the template changes the model's input
    assert backend.generate([raw]) == [answer]  # deterministic


def test_raw_requests_batch_with_chat_requests(
    model_dir: Path, backend: TransformersBackend
) -> None:
    requests = [
        Request(prompt=RAW_PROMPT, raw=True, max_tokens=10),
        Request(prompt="Describe the picture.", image=IMAGES[0], max_tokens=10),
        Request(prompt="<s> A dog", raw=True, max_tokens=10),  # short: left padded
        Request(prompt=RAW_PROMPT, max_tokens=10),
        Request(prompt="<s> Rate it: ", raw=True, max_tokens=6, regex=SCORE),
        Request(prompt="<s> The sky", raw=True, max_tokens=10, temperature=1.0, seed=3),
        Request(prompt="<s> The sky", raw=True, max_tokens=10, temperature=1.0, seed=4),
    ]
    together = backend.generate(requests)
    single = TransformersBackend(str(model_dir), batch_size=1)
    try:
        alone = single.generate(requests[::-1])[::-1]
    finally:
        single.close()
    assert together == alone  # batch composition and padding change no answer
    assert all(a.error is None and a.text for a in together)
    assert together[0].text != together[3].text
    assert together[4].text is not None and regex.fullmatch(SCORE, together[4].text)
    assert together[4].completion_tokens == len(together[4].text) + 1  # digits, then EOS
    assert together[5].text != together[6].text  # the seed matters
    assert backend.generate([requests[5]]) == [together[5]]  # ... and reproduces


def test_raw_regex_patterns(backend: TransformersBackend) -> None:
    # bounded patterns: a random model may never end an unbounded one by itself
    patterns = [r"(yes|no)", r"[A-D]", r"[a-z]{1,3}( [a-z]{1,3}){2}", r" <QUE> [a-z]{1,4}\?"]
    requests = [
        Request(prompt=f"<s> {PROMPTS[i]} ", raw=True, max_tokens=16, regex=p, temperature=t)
        for i, p in enumerate(patterns)
        for t in (0.0, 1.0)
    ]
    for request, answer in zip(requests, backend.generate(requests), strict=True):
        assert answer.text is not None and regex.fullmatch(request.regex or "", answer.text), (
            request.regex,
            answer,
        )


def test_raw_with_image_or_system_is_an_error_answer(backend: TransformersBackend) -> None:
    good = Request(prompt="<s> Hello", raw=True, max_tokens=5)
    requests = [
        Request(prompt="<s> What is it?", raw=True, image=IMAGES[0]),
        good,
        Request(prompt="<s> Hello", raw=True, system="Be brief."),
        Request(prompt="", raw=True),
    ]
    answers = backend.generate(requests)
    assert answers[0].text is None and answers[0].error is not None
    assert answers[0].error.startswith("bad_request: ") and "image" in answers[0].error
    assert answers[2].text is None and answers[2].error is not None
    assert answers[2].error.startswith("bad_request: ") and "system" in answers[2].error
    assert answers[3].error is not None and answers[3].error.startswith("bad_request: ")
    assert answers[1] == backend.generate([good])[0] and answers[1].error is None
