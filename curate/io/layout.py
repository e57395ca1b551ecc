"""Where a run puts things under its output root (a local folder or an ``s3://`` prefix).

```
OUT/manifest.json
OUT/<sink>/part-<unit>-<k>.parquet        curated output shards (Parquet sink)
OUT/<sink>/part-<unit>-<k>.tar            curated output shards (WebDataset sink)
OUT/<sink>/index/part-<unit>.parquet      WebDataset sink: key -> shard, byte offset, size
OUT/<sink>/part-<unit>-<k>.json           curated output shards (llava sink: JSON arrays)
OUT/<sink>/images/part-<unit>/<id>.<ext>  llava sink: the images its JSON files name
OUT/rejects/<stage>/unit-<unit>.parquet   every dropped row: id, stage, reason, value, provenance,
                                          scores
OUT/stats/<sink>/<shard stem>.json        per-shard statistics (curate.stats); stats/rejects/...,
OUT/stats/summary.json                    their merge; stats/plots/ (curate stats)
OUT/_index/ids/part-<p>.parquet           the id index curate explain reads (_index/index.json)
OUT/_progress.json                        live per-stage counts (curate.progress)
OUT/_work/<node>/unit-<unit>.parquet      materialized intermediate outputs
OUT/_work/<stage>.decisions/unit-<unit>.parquet   a global stage's decisions
OUT/_work/_attempts/seg-<s>/<stage>/unit-<unit>/attempt-<n>   a group of map stages (named by
                                          its first stage) began a unit: run state, cleared
                                          when the run ends (curate.sandbox)
OUT/_commits/run.json                     what the run is (spec hash, inputs): --resume checks it
OUT/_commits/seg-<s>/unit-<unit>.json     commit log: a finished unit's reports and checksums
OUT/_commits/global-<stage>.json          a global stage whose decisions are all written
OUT/_cache/<stage>-<key>/...              the stage cache (kept by --overwrite)
```
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from curate.io import storage
from curate.io.files import read_parquet
from curate.io.storage import LOCAL, StorageOptions


@dataclass(frozen=True)
class Layout:
    root: str
    opts: StorageOptions = LOCAL
    #: Materialized nodes stored elsewhere (cached stages: their cache entry).
    work_roots: dict[str, str] = field(default_factory=dict)

    def _join(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    def manifest(self) -> str:
        return self._join("manifest.json")

    def rejects(self, stage: str, unit: int) -> str:
        return self._join("rejects", stage, f"unit-{unit:06d}.parquet")

    def rejects_dir(self) -> str:
        return self._join("rejects")

    def work(self, node: str, unit: int) -> str:
        if node in self.work_roots:
            return storage.join(self.work_roots[node], f"unit-{unit:06d}.parquet")
        return self._join("_work", node, f"unit-{unit:06d}.parquet")

    def decisions(self, stage: str, unit: int) -> str:
        return self._join("_work", f"{stage}.decisions", f"unit-{unit:06d}.parquet")

    def attempts(self, segment: int, group: str, unit: int) -> str:
        """One marker per attempt that the group of map stages whose first stage is
        ``group`` made on ``unit`` (:func:`curate.sandbox.begin_attempt`)."""
        return storage.join(self.attempts_root(), f"seg-{segment:03d}", group, f"unit-{unit:06d}")

    def attempts_root(self) -> str:
        return self._join("_work", "_attempts")

    def shard(self, sink: str, unit: int, part: int, ext: str = "parquet") -> str:
        return self._join(sink, f"part-{unit:06d}-{part:04d}.{ext}")

    def index(self, sink: str, unit: int) -> str:
        return self._join(sink, "index", f"part-{unit:06d}.parquet")

    def state(self, stage: str) -> str:
        """State a stage keeps across actors and resumed runs (request caches)."""
        return self._join("_state", stage)

    def commits(self) -> str:
        return self._join("_commits")

    def run_state(self) -> str:
        return self._join("_commits", "run.json")

    def commit(self, segment: int, unit: int) -> str:
        return self._join("_commits", f"seg-{segment:03d}", f"unit-{unit:06d}.json")

    def global_commit(self, stage: str) -> str:
        return self._join("_commits", f"global-{stage}.json")

    def relative(self, path: str) -> str:
        return storage.relative(path, self.root)

    def absolute(self, relative: str) -> str:
        return self._join(relative)

    # --- I/O through the layout's storage options --------------------------------------

    def write(self, path: str, data: bytes) -> None:
        storage.write_bytes(path, data, self.opts)

    def read(self, path: str) -> bytes:
        return storage.read_bytes(path, self.opts)

    def exists(self, path: str) -> bool:
        return storage.exists(path, self.opts)

    def read_table(self, path: str, columns: list[str] | None = None) -> pa.Table:
        return read_parquet(path, self.opts, columns)
