"""A tiny vision-language model with random weights, built offline, for tests.

:func:`build_tiny_vlm` writes a model folder that loads through the standard
``transformers`` path (``AutoProcessor.from_pretrained(dir)`` and
``AutoModelForImageTextToText.from_pretrained(dir)``), exactly as a real
checkpoint would, so the in-process backend (:mod:`curate.mllm.local`) is
tested end to end without a download.

Design choices:

* **Architecture: LLaVA** (a CLIP vision tower, a two-layer MLP projector and a
  Llama decoder).  It is the simplest real image-text-to-text architecture in
  ``transformers``: a fixed number of image tokens per image (no dynamic
  tiling as in Idefics3/SmolVLM, no 3-D rotary positions or ``image_grid_thw``
  as in Qwen2-VL), a plain CLIP image processor, and it maps to
  ``AutoModelForImageTextToText`` and ``AutoProcessor``.  Its components (CLIP,
  Llama) are the most exercised code paths in the library, and batched
  left-padded generation works with it.  A 32x32 image with 8x8 patches gives
  16 image tokens (the CLS token is dropped by the ``default`` feature
  strategy), so prompts stay short.
* **Tokenizer: byte-level BPE trained in code** with the ``tokenizers``
  library on a few hundred lines of English generated from a fixed word list.
  Byte level means every string is encodable (no unknown token).  A
  ``Digits(individual_digits=True)`` pre-tokenizer runs first, so each digit
  0-9 is a token of its own and no merge ever joins digits: numbers are spelt
  digit by digit, which makes regex-constrained numeric answers reachable.
  The corpus does not depend on ``seed`` (only the weights do), so every tiny
  model shares one vocabulary.
* **Chat template**: a minimal Jinja template with ``<|system|>``,
  ``<|user|>`` and ``<|assistant|>`` role tokens; a turn ends with ``</s>``,
  which is also the EOS token, so a generated answer stops where a turn ends.
  Content may be a string or a list of ``{"type": "image"}`` /
  ``{"type": "text", "text": ...}`` items (the ``transformers`` convention);
  an image item becomes one ``<image>`` token that the processor expands to
  the image's 16 placeholders.
* **Determinism**: weights come from ``torch.manual_seed(seed)`` on CPU in
  float32, the tokenizer trainer is deterministic, and ``save_pretrained``
  writes no timestamps, so the same seed gives byte-identical files.

The model has about 170 k parameters (about 0.7 MB on disk) and builds in a
fraction of a second once ``transformers`` is imported.  Its answers are
noise, which is what the tests need: they check the plumbing (batching,
padding, constraints, errors), not the quality.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

#: Special tokens, in id order (they take ids 0..n-1).
PAD, BOS, EOS, IMAGE = "<pad>", "<s>", "</s>", "<image>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, *ROLE_TOKENS)

VOCAB_SIZE = 512
IMAGE_SIZE = 32
PATCH_SIZE = 8

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{ eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

_SUBJECTS = (
    "the cat", "a dog", "the image", "this photo", "a red car", "the old man", "a small bird",
    "the green tree", "two children", "the city", "a blue boat", "the picture", "my friend",
    "the river", "a tall building", "the sky", "some people", "the answer", "a white horse",
)  # fmt: skip
_VERBS = (
    "shows", "contains", "is near", "looks like", "has", "sits on", "runs past", "is above",
    "describes", "holds", "watches", "is under", "crosses", "follows", "is next to",
)  # fmt: skip
_OBJECTS = (
    "a table", "the water", "a street", "the mountains", "a window", "the garden", "a book",
    "the road", "a bright light", "the beach", "a wooden door", "the clouds", "a yellow flower",
    "the field", "a large window", "the park", "an empty room", "the station",
)  # fmt: skip
_QUESTIONS = (
    "What is in the image?", "Describe the picture.", "How many objects are there?",
    "Rate the quality from 1 to 100.", "Is this a photo?", "What color is the sky?",
    "Answer with a number.", "Give a short caption.", "Which animal is shown?",
)  # fmt: skip


def _corpus(lines: int = 400) -> list[str]:
    """A few hundred lines of simple English with numbers, always the same."""
    rng = random.Random(20240611)
    out: list[str] = []
    for i in range(lines):
        subject, verb, obj = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
        sentence = f"{subject.capitalize()} {verb} {obj}."
        kind = i % 4
        if kind == 0:
            sentence += f" {rng.choice(_QUESTIONS)} {rng.randint(0, 100)}."
        elif kind == 1:
            sentence += f" There are {rng.randint(0, 1000)} of them, score {rng.randint(1, 100)}."
        elif kind == 2:
            sentence = f"{rng.choice(_QUESTIONS)} {sentence}"
        out.append(sentence)
    return out


def _tokenizer() -> Any:
    """A byte-level BPE tokenizer (digits split one by one) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=[IMAGE, *ROLE_TOKENS],
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_vlm(out_dir: str | Path, seed: int = 0) -> Path:
    """Build a tiny random-weight LLaVA model and processor into ``out_dir``; return it."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # Instruction Pre-Training prompts reach 4,096
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE],
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)  # float32: the default dtype
    model.generation_config.bos_token_id = ids[BOS]
    model.generation_config.eos_token_id = ids[EOS]
    model.generation_config.pad_token_id = ids[PAD]
    model.save_pretrained(out)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )
    processor.save_pretrained(out)
    return out
