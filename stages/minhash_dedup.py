"""``minhash_dedup``: near-duplicate removal with MinHash LSH, on Ray, deterministic.

1. **Sign** (Ray Data ``map_batches``, one call per unit): normalize, shingle and
   MinHash every document (:mod:`curate.dedup.minhash`, compiled kernel), cut
   the signature into ``bands x rows`` and hash each band to a 64-bit key.
2. **Buckets**: band keys are hash-partitioned over Ray tasks; documents that
   share a key in any band are candidate pairs, linked as a star to the
   bucket's smallest node.
3. **Verify** (``jaccard_threshold``): the exact Jaccard similarity of the two
   shingle sets of every candidate pair, computed where the pair's texts meet
   after two hash-partitioned joins; pairs under the threshold are dropped.
   Candidates are then all pairs of buckets of up to 8 members and stars from
   the 2 smallest members of larger ones, so that one loose match does not
   cut true pairs apart.
4. **Components**: distributed large-star / small-star over hash partitions of
   the edges (:mod:`curate.dedup.graph`).
5. **Keep**: members of each component meet in the partition of its smallest
   node; the kept member is chosen by ``keep``.  Every member gets
   ``cluster_id`` (the id of the kept record) and ``cluster_size``; every
   dropped one the reason ``near_duplicate:<kept id>``.  Rows in no cluster
   keep ``cluster_id`` = their own id and ``cluster_size`` = 1.

No step holds all signatures, edges or documents in one process: each task
holds one partition, and the number of partitions grows with the input
(``docs_per_partition``).  Results depend only on the records, never on unit
sizes, block sizes or the number of CPUs.

Presets (``preset:``; any field given beside it overrides it):

``fineweb``
    datatrove ``MinhashConfig`` as FineWeb used it (``examples/fineweb.py``,
    ``pipeline/dedup/minhash.py``): word 5-grams, 112 = 14 bands x 8 rows,
    64-bit hashes, seed 1, no verification; LSH knee ``(1/14)^(1/8)`` ~ 0.72.
    Normalization in datatrove's spirit (lowercase, digits, punctuation,
    whitespace, diacritics) but not identical: datatrove has no NFKC, turns
    ``3.14`` into one ``0`` (we give ``0 0``), also blanks C0/C1 control
    characters, and splits words with spaCy's English rules ("cannot" -> "can
    not"); we split on whitespace.  Hashes differ too, so signatures are not
    interchangeable with datatrove's.
``nemo``
    NeMo Curator ``FuzzyDuplicatesConfig`` (``nemo_curator/modules/config.py``):
    character 24-grams, 260 = 20 bands x 13 rows, 32-bit hashes, seed 42, raw
    text (we also collapse whitespace runs); its optional false-positive check
    is our ``jaccard_threshold: 0.8``.
``slimpajama``
    Cerebras ``modelzoo`` SlimPajama scripts (``dedup/to_hash.py``,
    ``generate_duplicates_dict.py``): character 13-grams after NFC, lowercasing,
    punctuation removal and whitespace collapse; ``num_perm`` 128 of which
    9 bands x 13 rows = 117 are used; 32-bit values (datasketch); threshold 0.8.
    SlimPajama deletes ASCII punctuation ("don't" -> "dont"); we turn Unicode
    punctuation into a space ("don t").
``gopher``
    Gopher / MassiveText (Rae et al. 2021, App. A): word 13-grams, documents
    with Jaccard >= 0.8 are duplicates, one of each pair removed at random.
    The paper gives no band layout; we use 450 = 30 bands x 15 rows (knee
    ~0.80), exact verification at 0.8 and ``keep: random`` (seeded).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, ClassVar, Literal

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curate.dedup.graph import NODE, ClusterSpec, cluster, node_ids
from curate.dedup.minhash import Normalization, SignatureSpec, lsh_keys
from curate.stage import POS, UNIT, Fill, GlobalStage, StageConfig, decision_schema

Preset = Literal["fineweb", "nemo", "slimpajama", "gopher"]


class NormalizationConfig(BaseModel):
    """Text normalization before shingling; unset fields come from the preset."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    unicode: Literal["NFKC", "NFC", "none"] | None = None
    lowercase: bool | None = None
    diacritics: bool | None = None
    numbers: bool | None = None
    punctuation: bool | None = None
    whitespace: bool | None = None


RAW = Normalization(
    unicode="none", lowercase=False, diacritics=False, numbers=False, punctuation=False
)

PRESETS: dict[str, dict[str, Any]] = {
    "fineweb": {
        "shingle": "word",
        "ngram": 5,
        "bands": 14,
        "rows": 8,
        "num_perm": 112,
        "hash_bits": 64,
        "seed": 1,
        "norm": Normalization(),
        "jaccard_threshold": None,
        "keep": "smallest_id",
    },
    "nemo": {
        "shingle": "char",
        "ngram": 24,
        "bands": 20,
        "rows": 13,
        "num_perm": 260,
        "hash_bits": 32,
        "seed": 42,
        "norm": RAW,
        "jaccard_threshold": None,
        "keep": "smallest_id",
    },
    "slimpajama": {
        "shingle": "char",
        "ngram": 13,
        "bands": 9,
        "rows": 13,
        "num_perm": 128,
        "hash_bits": 32,
        "seed": 1,
        "norm": Normalization(unicode="NFC", diacritics=False, numbers=False),
        "jaccard_threshold": None,
        "keep": "smallest_id",
    },
    "gopher": {
        "shingle": "word",
        "ngram": 13,
        "bands": 30,
        "rows": 15,
        "num_perm": 450,
        "hash_bits": 64,
        "seed": 1,
        "norm": Normalization(),
        "jaccard_threshold": 0.8,
        "keep": "random",
    },
}


class MinHashDedupConfig(StageConfig):
    preset: Preset = "fineweb"
    shingle: Literal["word", "char"] | None = None
    ngram: int | None = Field(None, ge=1, le=1024)
    num_perm: int | None = Field(None, ge=1, le=4096)
    bands: int | None = Field(None, ge=1, le=1024)
    rows: int | None = Field(None, ge=1, le=1024)
    hash_bits: Literal[32, 64] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    normalization: NormalizationConfig = NormalizationConfig()
    #: Exact Jaccard similarity a candidate pair must reach; null keeps every LSH pair.
    jaccard_threshold: float | None = Field(None, gt=0, le=1)
    #: Set to false to turn off a preset's verification.
    verify: bool = True
    keep: Literal["smallest_id", "first", "score", "random"] | None = None
    score_column: str | None = None
    #: Partitions of every shuffle; null chooses from the document count.
    num_partitions: int | None = Field(None, ge=1, le=4096)
    docs_per_partition: int = Field(200_000, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> MinHashDedupConfig:
        r = self.resolved()
        if r["bands"] * r["rows"] > r["num_perm"]:
            raise ValueError(
                f"bands x rows = {r['bands']} x {r['rows']} = {r['bands'] * r['rows']} "
                f"exceeds num_perm = {r['num_perm']}"
            )
        if r["keep"] == "score" and not self.score_column:
            raise ValueError("keep: score needs score_column")
        if self.score_column and r["keep"] != "score":
            raise ValueError("score_column is only used with keep: score")
        return self

    def resolved(self) -> dict[str, Any]:
        """The preset with every field given in the YAML laid over it."""
        out = dict(PRESETS[self.preset])
        for key in ("shingle", "ngram", "bands", "rows", "hash_bits", "seed", "keep"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.num_perm is not None:
            out["num_perm"] = self.num_perm
        elif {"bands", "rows"} & self.model_fields_set:
            out["num_perm"] = max(out["num_perm"], out["bands"] * out["rows"])
        if self.jaccard_threshold is not None:
            out["jaccard_threshold"] = self.jaccard_threshold
        if not self.verify:
            out["jaccard_threshold"] = None
        given = {k: v for k, v in self.normalization.model_dump().items() if v is not None}
        out["norm"] = replace(out["norm"], **given)
        return out


class MinHashDedup(GlobalStage):
    """Drops near-duplicates, keeping one record per cluster."""

    Config: ClassVar[type[StageConfig]] = MinHashDedupConfig
    config: MinHashDedupConfig

    def reads(self) -> Sequence[str]:
        extra = [self.config.score_column] if self.config.score_column else []
        return ("text", "source", "provenance", *extra)

    def writes(self) -> Mapping[str, pa.DataType]:
        return {"cluster_id": pa.string(), "cluster_size": pa.int64()}

    def fills(self) -> Mapping[str, Fill]:
        return {"cluster_id": Fill(column="id"), "cluster_size": Fill(value=1)}

    def settings(self) -> tuple[SignatureSpec, dict[str, Any]]:
        r = self.config.resolved()
        spec = SignatureSpec(
            shingle=r["shingle"],
            ngram=r["ngram"],
            num_perm=r["num_perm"],
            hash_bits=r["hash_bits"],
            seed=r["seed"],
            norm=r["norm"],
        )
        return spec, r

    def plan(self, keys: ray.data.Dataset) -> ray.data.Dataset:
        spec, r = self.settings()
        start = time.perf_counter()
        verify = r["jaccard_threshold"] is not None
        signed = keys.map_batches(
            functools.partial(
                sign_block,
                spec=spec,
                bands=r["bands"],
                rows=r["rows"],
                extra=["text"] if verify else [],
                score=self.config.score_column,
            ),
            batch_size=None,
            batch_format="pyarrow",
            zero_copy_batch=True,
        ).materialize()
        n_docs = signed.count()
        sign_s = time.perf_counter() - start
        parts = self.config.num_partitions or _auto_partitions(
            n_docs, self.config.docs_per_partition
        )
        cspec = ClusterSpec(
            partitions=parts,
            threshold=r["jaccard_threshold"],
            keep=r["keep"],
            score_column=self.config.score_column,
            seed=r["seed"],
            sign=spec,
        )
        doc_columns = [UNIT, POS, "id"]
        if self.config.score_column:
            doc_columns.append(self.config.score_column)
        refs, stats = cluster(
            signed.to_arrow_refs(), cspec, r["bands"], doc_columns, decision_schema(self)
        )
        self.summary = {
            "documents": n_docs,
            "preset": self.config.preset,
            "shingle": f"{r['shingle']} {r['ngram']}-grams",
            "bands_x_rows": f"{r['bands']}x{r['rows']}",
            "num_perm": r["num_perm"],
            "hash_bits": r["hash_bits"],
            "jaccard_threshold": r["jaccard_threshold"],
            "keep": r["keep"],
            **stats,
        }
        self.timings = {"sign": round(sign_s, 3), **self.summary.pop("seconds")}
        if self.config.num_partitions is None:
            # Chosen from the cluster's CPUs: an execution detail, kept out of the
            # summary so that the manifest is the same on clusters of any shape.
            self.timings["auto_partitions"] = self.summary.pop("partitions")
        return ray.data.from_arrow_refs(refs)


#: Most partitions chosen automatically: every wave makes partitions^2 object refs.
MAX_AUTO_PARTITIONS = 256


def _auto_partitions(n_docs: int, per_partition: int) -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))  # type: ignore[no-untyped-call]
    return min(MAX_AUTO_PARTITIONS, max(cpus, math.ceil(n_docs / per_partition)))


def sign_block(
    block: pa.Table,
    spec: SignatureSpec,
    bands: int,
    rows: int,
    extra: list[str],
    score: str | None,
) -> pa.Table:
    """Signatures of one unit -> node, shingle count, band keys and the columns later
    steps need."""
    keys, counts = lsh_keys(block.column("text"), spec, bands, rows)
    columns: dict[str, Any] = {
        NODE: pa.array(node_ids(block), pa.uint64()),
        "n_shingles": pa.array(counts, pa.int64()),
        UNIT: block.column(UNIT),
        POS: block.column(POS),
        "id": block.column("id"),
    }
    for c in extra:
        columns[c] = block.column(c)
    if score:
        try:
            columns[score] = pc.cast(block.column(score), pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            kind = block.schema.field(score).type
            raise ValueError(f"score_column {score!r} must be numeric, found {kind}") from exc
    for i in range(bands):
        columns[f"band_{i}"] = pa.array(keys[:, i], pa.uint64())
    return pa.table(columns)
