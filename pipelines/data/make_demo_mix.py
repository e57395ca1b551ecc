"""Build the stand-in components of the token-share mix recipes from the bundled docs.

``pipelines/recipes/slimpajama_mix.yaml`` mixes seven RedPajama subsets.  The
repository cannot carry RedPajama text, so the bundled stand-ins are sections of
the Python documentation (``demo_text``, PSF licence) dealt into seven files of
deliberately unequal sizes (so that some components must be repeated and others
sampled).  They exercise the mixing arithmetic, not the subsets' content.

    python pipelines/data/make_demo_mix.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

HERE = Path(__file__).parent
SIZES = {
    "common_crawl": 240,
    "c4": 120,
    "github": 30,
    "book": 6,
    "arxiv": 12,
    "wikipedia": 16,
    "stackexchange": 20,
}


def documents() -> list[dict[str, str]]:
    docs = []
    for shard in sorted((HERE / "demo_text").glob("docs-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as handle:
            docs.extend(json.loads(line) for line in handle)
    long_enough = [d for d in docs if len(d["text"].split()) >= 40]
    return sorted(long_enough, key=lambda d: hashlib.sha256(d["url"].encode()).hexdigest())


def main() -> None:
    docs = iter(documents())
    out = HERE / "demo_mix"
    out.mkdir(exist_ok=True)
    for name, n in SIZES.items():
        lines = []
        for _ in range(n):
            d = next(docs)
            row = {"id": d["url"], "text": d["text"], "url": d["url"]}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        data = "".join(lines).encode("utf-8")
        (out / f"{name}.jsonl.gz").write_bytes(gzip.compress(data, mtime=0))


if __name__ == "__main__":
    main()
