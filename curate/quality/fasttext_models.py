"""fastText models: batch prediction over Arrow text, and supervised training.

fastText reads one line per example, so texts are flattened first: every line
break becomes a space (DCLM: "lines joined by spaces"; datatrove and CCNet do
the same before language ID).  Prediction is one C++ call per batch
(``predict`` on a list).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

Array = np.ndarray[Any, Any]
LABEL_PREFIX = "__label__"


def load(path: str) -> Any:
    """A fastText model, without fastText's load-time warning on stderr."""
    import fasttext

    with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
        return fasttext.load_model(path)


def flatten(text: pa.Array | pa.ChunkedArray) -> list[str]:
    """Texts as single lines (nulls as empty strings): fastText refuses ``\n`` and
    treats the other whitespace (``\r``, tabs) as separators already.  Python's
    ``str.replace`` here is ten times faster than an Arrow regex pass."""
    return [t.replace("\n", " ") if t else "" for t in text.to_pylist()]


def predict_top(model: Any, texts: Sequence[str]) -> tuple[list[str | None], Array]:
    """The best label (without ``__label__``) and its probability, per text.  A text
    without a word gets None and 0 (fastText would still answer with its prior)."""
    labels, probs = model.predict(list(texts), k=1)
    out = [
        lab[0][len(LABEL_PREFIX) :] if lab and not text.isspace() and text else None
        for lab, text in zip(labels, texts, strict=True)
    ]
    scores = np.array([float(p[0]) if len(p) else 0.0 for p in probs], dtype=np.float64)
    scores[np.array([x is None for x in out], dtype=bool)] = 0.0
    return out, np.minimum(scores, 1.0)  # fastText's softmax can exceed 1 by ~1e-5


def predict_label(model: Any, texts: Sequence[str], label: str) -> Array:
    """P(``label``) per text, from the full distribution over the model's labels."""
    full = LABEL_PREFIX + label
    k = len(model.get_labels())
    if k == 2:  # binary (DCLM): 1 - P(top) for the other label (fastText's own value
        # for it differs by its softmax rounding, ~1e-5)
        top, p = model.predict(list(texts), k=1)
        pos = np.array([bool(t) and t[0] == full for t in top])
        first = np.array([float(x[0]) if len(x) else 0.0 for x in p], dtype=np.float64)
        return np.clip(np.where(pos, first, 1.0 - first), 0.0, 1.0)
    labels, probs = model.predict(list(texts), k=k)
    out = np.zeros(len(texts), dtype=np.float64)
    for i, (labs, ps) in enumerate(zip(labels, probs, strict=True)):
        for lab, p in zip(labs, ps, strict=True):
            if lab == full:
                out[i] = float(p)
                break
    return np.clip(out, 0.0, 1.0)


#: DCLM's fastText recipe (``baselines/README.md``: fastText defaults plus bigrams).
DCLM_PARAMS: dict[str, Any] = {
    "wordNgrams": 2,
    "lr": 0.1,
    "dim": 100,
    "ws": 5,
    "epoch": 5,
    "minCount": 1,
}


@dataclass
class Metrics:
    """Held-out precision and recall of the positive label at a threshold of 0.5."""

    n: int
    positives: int
    precision: float
    recall: float
    accuracy: float
    threshold: float = 0.5

    def as_dict(self) -> dict[str, float | int]:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in vars(self).items()}


@dataclass
class TrainResult:
    model: str
    train_examples: dict[str, int]
    holdout: Metrics
    params: dict[str, Any] = field(default_factory=dict)


def _line(label: str, text: str) -> str:
    return f"{LABEL_PREFIX}{label} {' '.join(text.split())}\n"


def train(
    examples: Iterable[tuple[str, str]],
    model_path: str | Path,
    positive: str,
    params: dict[str, Any],
    holdout: float,
    seed: int,
    work_dir: str | Path,
) -> TrainResult:
    """Train a supervised fastText model on ``(label, text)`` pairs.

    A seeded ``holdout`` fraction of each label is kept out of training and
    scored afterwards.  With ``thread: 1`` (the default here) training is
    deterministic for a given seed: fastText's multi-threaded SGD is not.
    """
    by_label: dict[str, list[str]] = {}
    for label, text in examples:
        if text and text.strip():
            by_label.setdefault(label, []).append(text)
    if positive not in by_label or len(by_label) < 2:
        raise ValueError(
            f"training needs texts for {positive!r} and at least one other label, "
            f"got {sorted(by_label)}"
        )
    rng = random.Random(seed)
    train_lines: list[str] = []
    held: list[tuple[str, str]] = []
    counts = {}
    for label in sorted(by_label):
        texts = by_label[label]
        rng.shuffle(texts)
        cut = round(len(texts) * holdout)
        held.extend((label, t) for t in texts[:cut])
        train_lines.extend(_line(label, t) for t in texts[cut:])
        counts[label] = len(texts) - cut
    rng.shuffle(train_lines)
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train_file = work / "train.txt"
    train_file.write_text("".join(train_lines), encoding="utf-8")
    full = {"thread": 1, "seed": seed, "verbose": 0, **params}
    Path(model_path).parent.mkdir(parents=True, exist_ok=True)
    # A fresh process per training: in one process, a second train_supervised call on
    # the same input gives a different model or "Encountered NaN" (fastText keeps state
    # between calls), which would break "same spec, same seed, same model".
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        pool.apply(_train_child, (str(train_file), str(model_path), full))
    metrics = evaluate(load(str(model_path)), held, positive)
    return TrainResult(str(model_path), counts, metrics, full)


def _train_child(train_file: str, model_path: str, params: dict[str, Any]) -> None:
    import fasttext

    fasttext.train_supervised(input=train_file, **params).save_model(model_path)


def evaluate(model: Any, held: Sequence[tuple[str, str]], positive: str) -> Metrics:
    if not held:
        return Metrics(0, 0, float("nan"), float("nan"), float("nan"))
    scores = predict_label(model, [" ".join(t.split()) for _, t in held], positive)
    truth = np.array([label == positive for label, _ in held])
    pred = scores >= 0.5
    tp = int((pred & truth).sum())
    precision = tp / int(pred.sum()) if pred.any() else float("nan")
    recall = tp / int(truth.sum()) if truth.any() else float("nan")
    return Metrics(len(held), int(truth.sum()), precision, recall, float((pred == truth).mean()))
