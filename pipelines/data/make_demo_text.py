"""Rebuild the bundled demo corpus from the Python 3.11 documentation sources.

The documentation is under the PSF licence, which allows redistribution
(see demo_text/LICENSE-PYTHON-DOCS.txt).  Each section of each reST source file becomes one
document, so the corpus has what real crawls have: prose, code-heavy
sections, tiny boilerplate sections, and sections repeated word for word
across pages (real exact duplicates).

Needs Debian's ``python3.11-doc`` package; the output is committed, so the
demo never needs this script:

    apt-get install python3.11-doc
    python pipelines/data/make_demo_text.py
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11-doc/html/_sources")
OUT = Path(__file__).parent / "demo_text"
SUBDIRS = ("tutorial", "howto", "faq", "library", "whatsnew", "reference")
SHARDS = 4
MAX_DOCS = 6000
HEADING = re.compile(r"^([=\-~^\"'*+#])\1{3,}\s*$")


def sections(text: str) -> list[tuple[str, str]]:
    lines = text.splitlines()
    out: list[tuple[str, str]] = []
    title, body = "", []
    for i, line in enumerate(lines):
        if (
            HEADING.match(line)
            and i > 0
            and lines[i - 1].strip()
            and not HEADING.match(lines[i - 1])
        ):
            if body and body[-1].strip() == lines[i - 1].strip():
                body.pop()
            out.append((title, "\n".join(body).strip()))
            title, body = lines[i - 1].strip(), []
        elif not HEADING.match(line):
            body.append(line)
    out.append((title, "\n".join(body).strip()))
    return [(t, b) for t, b in out if b]


def main() -> None:
    files = sorted(p for d in SUBDIRS for p in (SOURCES / d).rglob("*.rst.txt"))
    docs = []
    for path in files:
        rel = path.relative_to(SOURCES).as_posix().removesuffix(".rst.txt")
        for k, (title, body) in enumerate(sections(path.read_text(encoding="utf-8"))):
            docs.append(
                {
                    "url": f"https://docs.python.org/3.11/{rel}.html#s{k}",
                    "title": title,
                    "text": body,
                }
            )
    docs = docs[:MAX_DOCS]
    OUT.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // SHARDS)
    for s in range(SHARDS):
        with gzip.GzipFile(OUT / f"docs-{s:04d}.jsonl.gz", "wb", mtime=0) as handle:
            for doc in docs[s * per : (s + 1) * per]:
                handle.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
    print(f"{len(docs)} documents from {len(files)} files in {SHARDS} shards")


if __name__ == "__main__":
    main()
