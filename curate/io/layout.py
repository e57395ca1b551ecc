"""Where a run puts things under its output root.

```
OUT/manifest.json
OUT/<sink>/part-<unit>-<k>.parquet        curated output shards
OUT/rejects/<stage>/unit-<unit>.parquet   every dropped row: id, stage, reason, value, provenance
OUT/_work/<node>/unit-<unit>.parquet      materialized intermediate outputs
OUT/_work/<stage>.decisions/unit-<unit>.parquet   a global stage's decisions
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    root: str

    def _join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def manifest(self) -> str:
        return self._join("manifest.json")

    def rejects(self, stage: str, unit: int) -> str:
        return self._join("rejects", stage, f"unit-{unit:06d}.parquet")

    def rejects_dir(self) -> str:
        return self._join("rejects")

    def work(self, node: str, unit: int) -> str:
        return self._join("_work", node, f"unit-{unit:06d}.parquet")

    def decisions(self, stage: str, unit: int) -> str:
        return self._join("_work", f"{stage}.decisions", f"unit-{unit:06d}.parquet")

    def shard(self, sink: str, unit: int, part: int) -> str:
        return self._join(sink, f"part-{unit:06d}-{part:04d}.parquet")

    def relative(self, path: str) -> str:
        return os.path.relpath(path, self.root)
