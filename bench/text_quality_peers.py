"""datatrove's heuristic quality filters on a JSON-lines file, run in the peer venv.

    bench/data/peers-venv/bin/python bench/text_quality_peers.py INPUT.jsonl OUT_DIR [--limit N]

datatrove 0.10.1 (``bench/requirements-peers.txt``) does not fit curate's lock, so
this runs in ``bench/data/peers-venv``.  Each filter below runs on its own, one after
the other in this process, with datatrove's default thresholds: its ``.filter(doc)``
is called on a fresh ``datatrove.data.Document`` per input line, and
``OUT_DIR/<filter>.jsonl`` gets one line per document, ``{id, keep, reason}`` plus,
for the C4 filters (which rewrite ``doc.text`` of the documents they keep), ``text``.
A filter that raises on a document is recorded as ``keep: null`` with the error as
``reason`` and the run goes on.

Only the loop of ``.filter`` calls is timed (no reading, no ``Document`` building, no
writing), and so is a loop of ``datatrove.utils.text.split_into_words`` alone, the
spaCy word splitter the Gopher and FineWeb filters call.  spaCy's blank English
pipeline (tokenizer + rule-based sentencizer) is loaded before any timing.
``split_into_parts``, which every split goes through, is ``lru_cache(5)``: it is
cleared before each timed loop, and its hits during the loop are reported (a hit is a
text already split among the last five, e.g. a repeated line in C4's per-line
sentence split).

Everything runs offline: ``HF_HUB_OFFLINE=1`` and every socket connection is refused
and recorded, so a filter that tries to download something shows up in the summary
(``network_attempts``) instead of hanging.  Prints a summary and writes it to
``OUT_DIR/summary.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DATATROVE_COLORIZE_LOGS", "0")

NETWORK_ATTEMPTS: list[str] = []


def _refuse(self: socket.socket, address: Any, *args: Any, **kwargs: Any) -> Any:
    """Record and refuse a network connection (local unix sockets are let through)."""
    if self.family == socket.AF_UNIX:
        return _CONNECT(self, address, *args, **kwargs)
    NETWORK_ATTEMPTS.append(repr(address))
    raise OSError(f"text_quality_peers: network is off (tried {address!r})")


_CONNECT = socket.socket.connect
socket.socket.connect = _refuse  # type: ignore[method-assign]
socket.socket.connect_ex = _refuse  # type: ignore[method-assign]

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.filters import (  # noqa: E402
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.utils.text import (  # noqa: E402
    split_into_parts,
    split_into_sentences,
    split_into_words,
)

FILTERS: dict[str, Callable[[], Any]] = {
    "gopher_quality": GopherQualityFilter,
    "gopher_repetition": GopherRepetitionFilter,
    "c4_quality": C4QualityFilter,
    "c4_quality_fineweb": lambda: C4QualityFilter(filter_no_terminal_punct=False),
    "fineweb_quality": FineWebQualityFilter,
}
REWRITES_TEXT = {"c4_quality", "c4_quality_fineweb"}


def load_docs(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    docs = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(docs) >= limit:
                break
            row = json.loads(line)
            docs.append({"id": str(row["id"]), "text": row["text"]})
    return docs


def warm_up() -> dict[str, Any]:
    """Load spaCy's blank English pipeline once (offline) and describe it."""
    import spacy
    from datatrove.utils.word_tokenizers import load_word_tokenizer

    t0 = time.perf_counter()
    words = split_into_words("Warm up the tokenizer. It needs no model download!")
    sentences = split_into_sentences("Warm up the sentencizer. It needs no model download!")
    seconds = time.perf_counter() - t0
    nlp = load_word_tokenizer("eng").tokenizer
    return {
        "spacy": spacy.__version__,
        "pipeline": f"spacy.blank({nlp.lang!r}) + {nlp.pipe_names}",
        "load_seconds": round(seconds, 3),
        "words": len(words),
        "sentences": len(sentences),
    }


def _quiesce() -> None:
    split_into_parts.cache_clear()
    gc.collect()


def time_filter(name: str, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict]:
    """Run one filter over fresh Documents; (output rows, stats)."""
    step = FILTERS[name]()
    docs = [Document(text=row["text"], id=row["id"]) for row in rows]
    results: list[Any] = [None] * len(docs)
    errors: Counter[str] = Counter()
    filter_doc = step.filter
    _quiesce()
    t0 = time.perf_counter()
    for i, doc in enumerate(docs):
        try:
            results[i] = filter_doc(doc)
        except Exception as err:  # a peer's crash is a result to report, not a reason to stop
            results[i] = err
    seconds = time.perf_counter() - t0
    hits = split_into_parts.cache_info().hits

    out, reasons = [], Counter()
    for doc, result in zip(docs, results, strict=True):
        keep: bool | None
        if isinstance(result, Exception):
            keep, reason = None, f"error: {type(result).__name__}: {result}"
            errors[type(result).__name__] += 1
        elif isinstance(result, tuple):
            keep, reason = bool(result[0]), result[1]
        else:
            keep, reason = bool(result), None
        reasons["kept" if keep else str(reason)] += 1
        line: dict[str, Any] = {"id": doc.id, "keep": keep, "reason": reason}
        if name in REWRITES_TEXT:
            line["text"] = doc.text
        out.append(line)
    kept = sum(1 for line in out if line["keep"])
    stats = {
        "docs": len(docs),
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(docs) / seconds, 1) if seconds else None,
        "keep_fraction": round(kept / len(docs), 4) if docs else None,
        "reasons": dict(reasons.most_common()),
        "errors": dict(errors),
        "split_cache_hits": hits,
    }
    if name in REWRITES_TEXT:
        stats["kept_docs_text_changed"] = sum(
            1
            for row, line in zip(rows, out, strict=True)
            if line["keep"] and line["text"] != row["text"]
        )
    return out, stats


def time_word_splitter(rows: list[dict[str, Any]]) -> dict[str, Any]:
    texts = [row["text"] for row in rows]
    _quiesce()
    t0 = time.perf_counter()
    n_words = 0
    for text in texts:
        n_words += len(split_into_words(text))
    seconds = time.perf_counter() - t0
    return {
        "docs": len(texts),
        "words": n_words,
        "seconds": round(seconds, 3),
        "docs_per_s": round(len(texts) / seconds, 1) if seconds else None,
        "split_cache_hits": split_into_parts.cache_info().hits,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help="JSON lines with id and text")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--limit", type=int, default=None, help="first N documents only")
    parser.add_argument(
        "--filters", nargs="+", choices=list(FILTERS), default=list(FILTERS), metavar="NAME"
    )
    args = parser.parse_args(argv)

    from importlib.metadata import version

    rows = load_docs(args.input, args.limit)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "input": str(args.input),
        "docs": len(rows),
        "distinct_texts": len({row["text"] for row in rows}),
        "datatrove": version("datatrove"),
        "python": sys.version.split()[0],
        "tokenizer": warm_up(),
        "filters": {},
    }
    print(f"{args.input}: {len(rows)} docs; datatrove {summary['datatrove']}", flush=True)
    print(f"tokenizer: {summary['tokenizer']}", flush=True)

    split = time_word_splitter(rows)
    summary["split_into_words"] = split
    print(
        f"{'split_into_words':<20} {split['docs_per_s']:>9} docs/s  {split['seconds']:>8} s"
        f"  ({split['words']} words, cache hits {split['split_cache_hits']})",
        flush=True,
    )
    for name in args.filters:
        out, stats = time_filter(name, rows)
        target = args.out_dir / f"{name}.jsonl"
        tmp = target.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for line in out:
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        tmp.replace(target)
        summary["filters"][name] = stats
        top = ", ".join(f"{k}={v}" for k, v in list(stats["reasons"].items())[:6])
        print(
            f"{name:<20} {stats['docs_per_s']:>9} docs/s  {stats['seconds']:>8} s"
            f"  keep {stats['keep_fraction']:.3f}  cache hits {stats['split_cache_hits']}"
            f"  errors {stats['errors'] or 0}  [{top}]",
            flush=True,
        )
    summary["network_attempts"] = NETWORK_ATTEMPTS
    if NETWORK_ATTEMPTS:
        print(f"network attempts (refused): {NETWORK_ATTEMPTS}", flush=True)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {args.out_dir}", flush=True)


if __name__ == "__main__":
    main()
