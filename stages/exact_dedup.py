"""``exact_dedup``: drop exact duplicates of the normalized text, on Ray.

``column`` picks what is compared (the text by default; ``instruction`` drops
generated questions asked twice anywhere in the dataset).

Map: normalize the text (lowercase, collapse whitespace, trim: each optional)
and hash it with 128-bit xxh3.  Shuffle: by ``hash mod num_partitions`` with
two waves of Ray tasks (:func:`curate.shuffle.hash_shuffle`), so one task holds
one partition, never the whole dataset.
Reduce: sort each partition by (hash, keep key) and keep the first row of
every hash run.  With 128-bit hashes a false match needs ~2^64 documents.

Keep rule (``keep``): ``first`` keeps the earliest row in input order (source
order, shard order, row order); ``smallest_id`` keeps the smallest ``id``.
A dropped row's reason is ``exact_duplicate:<kept id>`` and its value the kept
id, so ``explain`` can say which record was kept instead.

xxhash is called per row: Arrow has no string hash kernel, and polars'
``hash`` is not stable across versions, which would break determinism.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray.data
import xxhash
from pydantic import Field

from curate.shuffle import hash_shuffle
from curate.stage import DECISION_SCHEMA, POS, UNIT, GlobalStage, StageConfig

PART = "_part"


class ExactDedupConfig(StageConfig):
    #: The column compared (``instruction``: generated questions, across the dataset).
    column: str = "text"
    lowercase: bool = True
    collapse_whitespace: bool = True
    keep: Literal["first", "smallest_id"] = "first"
    num_partitions: int = Field(16, ge=1, le=65536)


def normalize(text: pa.ChunkedArray | pa.Array, lowercase: bool, collapse: bool) -> pa.Array:
    text = pc.fill_null(text, "")
    if lowercase:
        text = pc.utf8_lower(text)
    if collapse:
        text = pc.utf8_trim_whitespace(pc.replace_substring_regex(text, r"\s+", " "))
    return text


def hash128(text: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """High and low 64 bits of xxh3-128 of each UTF-8 string."""
    digests = [xxhash.xxh3_128_intdigest(s.encode()) for s in text.to_pylist()]
    hi = np.fromiter((d >> 64 for d in digests), dtype=np.uint64, count=len(digests))
    lo = np.fromiter((d & 0xFFFFFFFFFFFFFFFF for d in digests), dtype=np.uint64, count=len(digests))
    return hi, lo


class ExactDedup(GlobalStage):
    """Keeps one row per normalized text."""

    Config: ClassVar[type[StageConfig]] = ExactDedupConfig
    config: ExactDedupConfig

    def reads(self) -> Sequence[str]:
        return (self.config.column,)

    def plan(self, keys: ray.data.Dataset) -> ray.data.Dataset:
        hashed = keys.map_batches(self.hash_batch, batch_format="pyarrow", batch_size=None)
        parts = hash_shuffle(
            hashed.to_arrow_refs(), PART, self.config.num_partitions, self.reduce_partition
        )
        return ray.data.from_arrow_refs(parts)

    def hash_batch(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        hi, lo = hash128(
            normalize(batch.column(cfg.column), cfg.lowercase, cfg.collapse_whitespace)
        )
        return pa.table(
            {
                UNIT: batch.column(UNIT),
                POS: batch.column(POS),
                "id": batch.column("id"),
                "h_hi": hi,
                "h_lo": lo,
                PART: (lo % np.uint64(cfg.num_partitions)).astype(np.int64),
            }
        )

    def reduce_partition(self, part: pa.Table) -> pa.Table:
        order = [(UNIT, "ascending"), (POS, "ascending")]
        if self.config.keep == "smallest_id":
            order = [("id", "ascending"), *order]
        part = part.sort_by([("h_hi", "ascending"), ("h_lo", "ascending"), *order])
        hi = part.column("h_hi").to_numpy()
        lo = part.column("h_lo").to_numpy()
        first = np.ones(len(hi), dtype=bool)
        first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
        run_start = np.maximum.accumulate(np.where(first, np.arange(len(hi)), 0))
        kept_id = pc.take(part.column("id"), pa.array(run_start))
        dropped = pa.array(~first)
        kept_id = pc.filter(kept_id, dropped)
        return pa.table(
            {
                UNIT: pc.filter(part.column(UNIT), dropped),
                POS: pc.filter(part.column(POS), dropped),
                "reason": pc.binary_join_element_wise("exact_duplicate:", kept_id, ""),
                "value": kept_id,
            },
            schema=DECISION_SCHEMA,
        )
