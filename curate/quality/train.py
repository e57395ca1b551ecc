"""``curate train-quality``: a fastText quality classifier from a YAML spec.

The spec names positive and negative sources (any source a pipeline can read:
JSONL, Parquet, WebDataset captions, local or S3), the label of each side,
and fastText parameters on top of DCLM's recipe (``wordNgrams: 2, lr: 0.1,
dim: 100, ws: 5, epoch: 5, minCount: 1``, labels ``hq`` / ``cc``, lines joined
by spaces).  It writes the model, a JSON report beside it (sizes, held-out
precision and recall, parameters, the model's sha256), and prints the report::

    name: dclm_quality
    output: models/quality.bin        # relative to this file
    positive: {label: hq, sources: [{uri: data/good/*.jsonl}]}
    negative: {label: cc, sources: [{uri: data/web/*.parquet}]}
    max_per_class: 200000             # DCLM: about 200 k each
    holdout: 0.1
    seed: 0
    params: {epoch: 5}                # overrides, any fastText train_supervised argument
"""

from __future__ import annotations

import hashlib
import json
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from curate.config.load import _issues
from curate.config.model import SourceSpec
from curate.config.yamlpos import ConfigError, load_yaml_file
from curate.io.files import list_shards, plan_units
from curate.io.readers import read_unit
from curate.io.storage import LOCAL
from curate.quality.fasttext_models import DCLM_PARAMS, TrainResult, train


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Side(_Strict):
    label: str = Field(pattern=r"^\S+$")
    sources: list[SourceSpec] = Field(min_length=1)


class TrainSpec(_Strict):
    name: str
    output: str
    positive: Side
    negative: Side
    max_per_class: int | None = Field(None, gt=0)
    holdout: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    params: dict[str, Any] = Field(default_factory=dict)


def load_spec(path: str) -> tuple[TrainSpec, Path]:
    data, pos = load_yaml_file(Path(path))
    try:
        spec = TrainSpec.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_issues(exc, (), pos)) from None
    if spec.positive.label == spec.negative.label:
        raise ConfigError([pos.issue(("negative", "label"), "must differ from positive.label")])
    return spec, Path(path).resolve().parent


def read_texts(sources: list[SourceSpec], base_dir: Path, name: str) -> Iterator[str]:
    """Every non-empty text of ``sources``, in source and shard order (bad rows are
    skipped here: training reads, it does not curate)."""
    for i, source in enumerate(sources):
        shards = list_shards(source.uri, base_dir, LOCAL)
        for unit in plan_units(f"{name}{i}", shards, 64 << 20, 0):
            table, _, _ = read_unit(unit, source)
            yield from (t for t in table.column("text").to_pylist() if t)


def texts(side: Side, base_dir: Path, name: str) -> Iterator[str]:
    """Every text of a side's sources, in source and shard order."""
    return read_texts(side.sources, base_dir, name)


def _sample(items: list[str], cap: int | None, seed: int) -> list[str]:
    if cap is None or len(items) <= cap:
        return items
    return random.Random(seed).sample(items, cap)


def run(path: str) -> dict[str, Any]:
    """Train from the spec file at ``path``; return the report (also written as JSON)."""
    spec, base = load_spec(path)
    pos = _sample(list(texts(spec.positive, base, "positive")), spec.max_per_class, spec.seed)
    neg = _sample(list(texts(spec.negative, base, "negative")), spec.max_per_class, spec.seed + 1)
    examples = [(spec.positive.label, t) for t in pos] + [(spec.negative.label, t) for t in neg]
    output = Path(spec.output) if Path(spec.output).is_absolute() else base / spec.output
    with tempfile.TemporaryDirectory(prefix="curate-train-") as work:
        result: TrainResult = train(
            examples,
            output,
            spec.positive.label,
            {**DCLM_PARAMS, **spec.params},
            spec.holdout,
            spec.seed,
            work,
        )
    report = {
        "name": spec.name,
        "model": str(output),
        "sha256": hashlib.sha256(output.read_bytes()).hexdigest(),
        "bytes": output.stat().st_size,
        "labels": {"positive": spec.positive.label, "negative": spec.negative.label},
        "train_examples": result.train_examples,
        "holdout": result.holdout.as_dict(),
        "params": result.params,
    }
    output.with_suffix(output.suffix + ".json").write_text(json.dumps(report, indent=2) + "\n")
    return report
