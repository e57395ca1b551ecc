"""Real text for the quality-filter benchmarks: good prose, other languages, and junk.

Builds ``bench/data/text_quality/`` (git-ignored, never committed) from what this
machine already has or can get from the Debian mirror apt already uses:

* ``en.jsonl`` -- the English Debian package descriptions of ``bench/debian.py``
  (``{id, text, kind="debian_en"}``): short, clean, human-written prose.
* ``multi.jsonl`` -- the same descriptions translated by Debian's translators, from
  apt's ``Translation-XX`` indexes fetched with a private ``APT_CONFIG`` (as
  ``bench/debian.py`` does for English).  ``{id, text, lang, kind="debian_<lang>"}``
  where ``lang`` is the gold label taken from the file (``zh_CN`` -> ``zh``,
  ``pt_BR`` -> ``pt``).  Translations identical to the package's English
  description (untranslated copies) are dropped.
* ``low.jsonl`` -- text a quality filter should reject, read from files on this
  machine: Python source, C headers, licence boilerplate and logs, chunked into
  documents of tens of lines.  ``{id, text, kind}`` with ``kind`` one of
  ``python_code``, ``c_header``, ``licence``, ``log``.  Each kind is capped at
  ``CAP`` documents, drawn with a fixed seed from the sorted file list.

Everything is deterministic and the outputs are rewritten on every run from the
cached apt indexes (only the first run downloads, a few seconds)::

    python bench/text_quality_data.py
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import lzma
import os
import random
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import debian  # bench/debian.py: the English corpus and its private apt settings

OUT = debian.ROOT / "bench" / "data" / "text_quality"

# apt's Translation-XX file suffix -> gold language label.
LANGS: dict[str, str] = {
    "de": "de",
    "fr": "fr",
    "it": "it",
    "es": "es",
    "ru": "ru",
    "ja": "ja",
    "zh_CN": "zh",
    "pt_BR": "pt",
    "pl": "pl",
}

CAP = 3000  # documents per low-quality kind
SEED = 0  # for the draw of CAP documents out of all chunks of a kind

Doc = dict[str, Any]


# --------------------------------------------------------------------------- English


def english_docs() -> list[Doc]:
    """bench/debian.py's descriptions (fetched there if missing), tagged ``debian_en``."""
    return [{"id": d["id"], "text": d["text"], "kind": "debian_en"} for d in debian.load()]


# --------------------------------------------------------------------------- other languages


def apt_conf(lists: Path, cache: Path, parts: Path, langs: Iterable[str]) -> str:
    """bench/debian.py's private apt settings with another ``Acquire::Languages`` list."""
    dirs = [
        line
        for line in debian.APT_CONF.splitlines()
        if line.strip() and not line.startswith("Acquire::Languages")
    ]
    text = "\n".join(dirs).format(lists=lists, cache=cache, parts=parts)
    quoted = " ".join(f'"{lang}";' for lang in langs)
    return f"{text}\nAcquire::Languages {{ {quoted} }};\n"


def translation_files(lists: Path, lang: str) -> list[Path]:
    """apt's files for ``lang``; apt escapes ``_`` in file names (``Translation-zh%5fCN``)."""
    names = {f"*_i18n_Translation-{lang}", f"*_i18n_Translation-{lang.replace('_', '%5f')}"}
    return sorted({path for name in names for path in lists.glob(name)})


def fetch_translations(work: Path = OUT, langs: Iterable[str] = LANGS) -> dict[str, list[Path]]:
    """``apt-get update`` into ``work/apt`` for the given languages, once; their index files."""
    langs = list(langs)
    lists, cache, parts = work / "apt" / "lists", work / "apt" / "cache", work / "apt" / "parts"
    for folder in (lists / "partial", cache / "archives" / "partial", parts):
        folder.mkdir(parents=True, exist_ok=True)
    conf = work / "apt" / "apt.conf"
    conf.write_text(apt_conf(lists, cache, parts, langs))
    if any(not translation_files(lists, lang) for lang in langs):
        subprocess.run(
            ["apt-get", "-q", "update"],
            env={**os.environ, "APT_CONFIG": str(conf)},
            check=True,
            stdout=subprocess.DEVNULL,
        )
    found = {lang: translation_files(lists, lang) for lang in langs}
    missing = [lang for lang, paths in found.items() if not paths]
    if missing:
        print(f"warning: apt-get update fetched no Translation index for {missing}")
    return found


def multi_docs(english: list[Doc], work: Path = OUT) -> tuple[list[Doc], Counter[str]]:
    """Translated descriptions that differ from their package's English one; dropped counts."""
    english_texts: dict[str, set[str]] = {}
    for doc in english:
        english_texts.setdefault(doc["id"].rsplit(":", 1)[0], set()).add(doc["text"])
    dropped: Counter[str] = Counter()
    rows: list[Doc] = []
    for code, paths in fetch_translations(work).items():
        label = LANGS[code]
        seen: set[tuple[str, str]] = set()
        for path in paths:
            for package, text in debian.parse_translation(path, code):
                if not text or (package, text) in seen:
                    continue
                seen.add((package, text))
                if text in english_texts.get(package, ()):
                    dropped[label] += 1
                    continue
                digest = hashlib.sha1(f"{package}\n{text}".encode()).hexdigest()[:16]
                rows.append(
                    {
                        "id": f"{label}:{package}:{digest}",
                        "text": text,
                        "lang": label,
                        "kind": f"debian_{label}",
                    }
                )
    rows.sort(key=lambda r: r["id"])
    return rows, dropped


# --------------------------------------------------------------------------- low quality


def chunk_lines(
    lines: list[str], min_lines: int, max_lines: int, min_nonblank: int = 5
) -> Iterator[tuple[int, str]]:
    """(first line number, text) chunks of ``min_lines``..``max_lines`` lines.

    A chunk ends at the first blank line after ``min_lines`` lines, or at ``max_lines``.
    A file no longer than ``max_lines`` is one chunk.  Chunks with fewer than
    ``min_nonblank`` non-blank lines are dropped.
    """
    if len(lines) <= max_lines:
        bounds = [(0, len(lines))]
    else:
        bounds, start = [], 0
        for i, line in enumerate(lines):
            size = i + 1 - start
            if (size >= min_lines and not line.strip()) or size >= max_lines:
                bounds.append((start, i + 1))
                start = i + 1
        if start < len(lines):
            bounds.append((start, len(lines)))
    for start, end in bounds:
        chunk = lines[start:end]
        if sum(1 for line in chunk if line.strip()) >= min_nonblank:
            yield start + 1, "\n".join(chunk).strip("\n")


def read_text(path: Path, skipped: Counter[str]) -> str | None:
    """The file as UTF-8 (``.gz``/``.xz`` decompressed); None, counted in ``skipped``, if not."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        elif path.suffix == ".xz":
            data = lzma.decompress(data)
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        skipped["undecodable"] += 1
        return None
    except (OSError, EOFError, lzma.LZMAError) as err:
        skipped[type(err).__name__] += 1
        return None
    if "\x00" in text:
        skipped["binary"] += 1
        return None
    return text


def _unique_files(paths: Iterable[Path]) -> list[Path]:
    """Sorted regular files, each real file once (``/usr/share/doc`` has symlinked folders)."""
    seen: set[Path] = set()
    out = []
    for path in sorted(paths):
        try:
            real = path.resolve()
            if not path.is_file() or real in seen:
                continue
        except OSError:
            continue
        seen.add(real)
        out.append(path)
    return out


def kind_docs(
    kind: str,
    paths: Iterable[Path],
    chunker: Callable[[list[str]], Iterable[tuple[int, str]]],
    skipped: Counter[str],
    cap: int = CAP,
) -> tuple[list[Doc], int]:
    """All distinct chunks of the files, ``cap`` of them drawn with ``SEED``; (docs, total)."""
    docs: list[Doc] = []
    texts: set[str] = set()
    for path in _unique_files(paths):
        text = read_text(path, skipped)
        if text is None:
            continue
        for line_no, chunk in chunker(text.splitlines()):
            if chunk in texts:
                skipped["duplicate"] += 1
                continue
            texts.add(chunk)
            docs.append({"id": f"{kind}:{path}:{line_no}", "text": chunk, "kind": kind})
    total = len(docs)
    if total > cap:
        keep = sorted(random.Random(f"{SEED}:{kind}").sample(range(total), cap))
        docs = [docs[i] for i in keep]
    return docs, total


def low_sources(root: Path = Path("/")) -> dict[str, tuple[list[Path], Callable[..., Any]]]:
    """kind -> (candidate files, chunker)."""
    logs = [
        *root.glob("var/log/*.log"),
        *root.glob("var/log/*/*.log"),
        *root.glob("var/log/*/*.log.gz"),
        *root.glob("var/log/*/*.log.xz"),
        *root.glob("var/log/*.log.[0-9]"),
        *root.glob("var/log/*/*.log.[0-9]"),
    ]
    return {
        "python_code": (
            list(root.glob("usr/lib/python3.11/**/*.py")),
            lambda lines: chunk_lines(lines, 20, 80),
        ),
        "c_header": (
            list(root.glob("usr/include/**/*.h")),
            lambda lines: chunk_lines(lines, 20, 80),
        ),
        "licence": (
            list(root.glob("usr/share/doc/*/copyright")),
            lambda lines: chunk_lines(lines, 20, 120),
        ),
        "log": (logs, lambda lines: chunk_lines(lines, 50, 50)),
    }


def low_docs(root: Path = Path("/"), cap: int = CAP) -> tuple[list[Doc], dict[str, Any]]:
    docs: list[Doc] = []
    report: dict[str, Any] = {}
    for kind, (paths, chunker) in low_sources(root).items():
        skipped: Counter[str] = Counter()
        kept, total = kind_docs(kind, paths, chunker, skipped, cap)
        docs.extend(kept)
        report[kind] = {
            "files": len(_unique_files(paths)),
            "chunks": total,
            "kept": len(kept),
            "skipped": dict(skipped),
        }
    return docs, report


# --------------------------------------------------------------------------- output


def write_jsonl(path: Path, rows: Iterable[Doc]) -> int:
    """Atomically (tmp + rename) write JSON lines; the number of rows."""
    tmp = path.with_suffix(".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def build(out: Path = OUT, cap: int = CAP) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    english = english_docs()
    write_jsonl(out / "en.jsonl", english)
    multi, untranslated = multi_docs(english, out)
    write_jsonl(out / "multi.jsonl", multi)
    low, low_report = low_docs(cap=cap)
    write_jsonl(out / "low.jsonl", low)
    return {
        "en": {"debian_en": len(english)},
        "multi": dict(sorted(Counter(d["lang"] for d in multi).items())),
        "multi_dropped_same_as_english": dict(sorted(untranslated.items())),
        "low": low_report,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--cap", type=int, default=CAP, help="documents per low-quality kind")
    args = parser.parse_args(argv)
    report = build(args.out, args.cap)
    print(f"en.jsonl     {report['en']['debian_en']:>7} debian_en")
    print(f"multi.jsonl  {sum(report['multi'].values()):>7}")
    for lang, n in report["multi"].items():
        same = report["multi_dropped_same_as_english"].get(lang, 0)
        print(f"  {lang:<6} {n:>7}   ({same} dropped: same text as English)")
    print(f"low.jsonl    {sum(k['kept'] for k in report['low'].values()):>7}")
    for kind, info in report["low"].items():
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(info["skipped"].items())) or "none"
        print(
            f"  {kind:<12} {info['kept']:>6} of {info['chunks']:>6} chunks"
            f" from {info['files']:>5} files; skipped: {skipped}"
        )
    print(f"-> {args.out} in {report['seconds']} s")


if __name__ == "__main__":
    main()
