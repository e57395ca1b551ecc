"""Real text with natural near-duplicates: Debian package long descriptions.

apt's ``Translation-en`` index holds the English description of every package
of the release.  Related packages (``foo``, ``foo-dev``, ``foo-doc``,
``python3-foo``) share whole paragraphs, which makes a good near-duplicate
corpus.  This image disables description downloads, so we run ``apt-get
update`` against a private state folder with a private ``APT_CONFIG`` that
re-enables English, and parse the index file.  Nothing is committed: the
corpus is fetched into ``bench/data/debian`` the first time a benchmark needs
it (a few seconds, one 33 MB download from the package mirror apt already uses).

    python bench/debian.py            # fetch and write bench/data/debian/descriptions.jsonl
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "data" / "debian"

APT_CONF = """\
Dir::State::Lists "{lists}";
Dir::Cache "{cache}";
Dir::Etc::Parts "{parts}";
Acquire::Languages {{ "en"; }};
"""


def fetch_index(work: Path = WORK) -> list[Path]:
    """Run ``apt-get update`` into a private folder; return the Translation-en files."""
    lists, cache, parts = work / "apt" / "lists", work / "apt" / "cache", work / "apt" / "parts"
    for folder in (lists / "partial", cache / "archives" / "partial", parts):
        folder.mkdir(parents=True, exist_ok=True)
    conf = work / "apt" / "apt.conf"
    conf.write_text(APT_CONF.format(lists=lists, cache=cache, parts=parts))
    found = sorted(lists.glob("*_i18n_Translation-en"))
    if not found:
        subprocess.run(
            ["apt-get", "-q", "update"],
            env={**os.environ, "APT_CONFIG": str(conf)},
            check=True,
            stdout=subprocess.DEVNULL,
        )
        found = sorted(lists.glob("*_i18n_Translation-en"))
    if not found:
        raise SystemExit("apt-get update fetched no Translation-en index")
    return found


def parse_translation(path: Path, lang: str = "en") -> list[tuple[str, str]]:
    """(package, description) pairs of a ``Translation-<lang>`` file: the short line,
    then the long paragraphs."""
    field = f"Description-{lang}: "
    out = []
    for stanza in path.read_text(encoding="utf-8").split("\n\n"):
        package, lines, inside = None, [], False
        for line in stanza.split("\n"):
            if line.startswith("Package: "):
                package = line[len("Package: ") :].strip()
            elif line.startswith(field):
                lines.append(line[len(field) :])
                inside = True
            elif inside and line.startswith(" "):
                body = line[1:]
                lines.append("" if body == "." else body)
            else:
                inside = False
        if package and lines:
            out.append((package, "\n".join(lines).strip()))
    return out


def descriptions(work: Path = WORK) -> Path:
    """JSON lines ``{id, package, text}``, one per distinct (package, description); cached."""
    target = work / "descriptions.jsonl"
    if target.exists():
        return target
    seen: set[tuple[str, str]] = set()
    rows = []
    for path in fetch_index(work):
        for package, text in parse_translation(path):
            if (package, text) in seen:
                continue
            seen.add((package, text))
            digest = hashlib.sha1(f"{package}\n{text}".encode()).hexdigest()[:16]
            rows.append({"id": f"{package}:{digest}", "package": package, "text": text})
    rows.sort(key=lambda r: r["id"])
    tmp = target.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(target)
    return target


def load(work: Path = WORK) -> list[dict[str, str]]:
    with descriptions(work).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


if __name__ == "__main__":
    docs = load()
    words = sum(len(d["text"].split()) for d in docs)
    print(f"{len(docs)} descriptions, {words} words -> {descriptions()}")
