"""Text-quality benchmark: our stages against their peers, same data, same run.

1. Heuristic filters (Gopher quality, Gopher repetition, C4, C4 without the
   terminal-punctuation rule, FineWeb) against datatrove's, one core each:
   docs/s, their ratio, and keep/drop agreement per document (plus, for C4,
   whether the rewritten text is identical).  datatrove runs in its own venv
   (``bench/data/peers-venv``, from ``bench/requirements-peers.txt``) through
   ``bench/text_quality_peers.py``.
2. Language ID and the fastText quality score against a bare ``fasttext``
   predict loop (one ``predict`` call per document), one core.
3. Perplexity against a bare ``kenlm`` loop (``model.score`` per line), words/s.

    make text-quality                  # data, models (once)
    python bench/text_quality.py [en|low] [--limit N]

Prints a table; the figures go into the README by hand.  Nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "text_quality"
PEERS_PY = ROOT / "bench" / "data" / "peers-venv" / "bin" / "python"

sys.path.insert(0, str(ROOT))

from curate.stages.fasttext_stages import FastTextQuality, LangId, Perplexity  # noqa: E402
from curate.stages.quality_filters import (  # noqa: E402
    C4Quality,
    FineWebQuality,
    GopherQuality,
    GopherRepetition,
)

from curate.quality.perplexity import normalize  # noqa: E402
from curate.stage import StageContext  # noqa: E402

CTX = StageContext("bench", 0, base_dir=str(ROOT))
BATCH = 8192


def ours() -> dict[str, Any]:
    return {
        "gopher_quality": GopherQuality(GopherQuality.Config(), CTX),
        "gopher_repetition": GopherRepetition(GopherRepetition.Config(), CTX),
        "c4_quality": C4Quality(C4Quality.Config(), CTX),
        "c4_quality_fineweb": C4Quality(C4Quality.Config(preset="fineweb"), CTX),
        "fineweb_quality": FineWebQuality(FineWebQuality.Config(), CTX),
    }


def batches(table: pa.Table) -> list[pa.Table]:
    return [table.slice(i, BATCH) for i in range(0, table.num_rows, BATCH)]


def peer_results(split: str, path: Path, limit: int | None) -> dict[str, Any]:
    out = DATA / "peers" / split
    summary = out / "summary.json"
    if not summary.exists() or limit is not None:
        if not PEERS_PY.exists():
            raise SystemExit("no peer venv: see bench/requirements-peers.txt")
        cmd = [str(PEERS_PY), str(ROOT / "bench" / "text_quality_peers.py"), str(path), str(out)]
        subprocess.run([*cmd, *(["--limit", str(limit)] if limit else [])], check=True)
    return dict(json.loads(summary.read_text()))


def heuristics(split: str, table: pa.Table, limit: int | None) -> None:
    peers = peer_results(split, DATA / f"{split}.jsonl", limit)
    print(f"\n== heuristic filters on {split}: {table.num_rows:,} docs, one core ==")
    print(f"{'filter':22} {'curate/s':>10} {'datatrove/s':>12} {'ratio':>7} {'agree':>8}  text")
    parts = batches(table)
    for name, stage in ours().items():
        stage.decide(parts[0].slice(0, 100))  # compile outside the timing
        start = time.perf_counter()
        verdicts = [stage.decide(p) for p in parts]
        seconds = time.perf_counter() - start
        keep = [bool(k) for v in verdicts for k in v.keep]
        reasons = [r for v in verdicts for r in v.reason.to_pylist()]
        theirs = {}
        with open(DATA / "peers" / split / f"{name}.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                theirs[row["id"]] = row
        ids = table.column("id").to_pylist()
        same = sum(k == theirs[i]["keep"] for k, i in zip(keep, ids, strict=True))
        text_note = ""
        if name.startswith("c4"):
            kept = pa.concat_tables(stage.process_batch(p) for p in parts)
            both = [
                (t, theirs[i]["text"])
                for i, t in zip(
                    kept.column("id").to_pylist(), kept.column("text").to_pylist(), strict=True
                )
                if theirs[i]["keep"]
            ]
            text_note = f"{sum(a == b for a, b in both)}/{len(both)} identical"
        rate = table.num_rows / seconds
        peer_rate = peers["filters"][name]["docs_per_s"]
        print(
            f"{name:22} {rate:>10,.0f} {peer_rate:>12,.0f} {rate / peer_rate:>6.1f}x "
            f"{same / len(ids):>8.4%}  {text_note}"
        )
        differ = Counter(
            (r, theirs[i]["reason"])
            for k, r, i in zip(keep, reasons, ids, strict=True)
            if k != theirs[i]["keep"]
        )
        for (a, b), n in differ.most_common(4):
            print(f"{'':24}{n:>5} differ: curate {a} / datatrove {b}")


def versus(stage: Any, table: pa.Table, k: int) -> tuple[float, float]:
    """docs/s of the stage over batches, and of the loop a bare fastText user writes
    (one ``predict`` per document) with the stage's own model."""
    texts = table.column("text").to_pylist()
    start = time.perf_counter()
    for part in batches(table):
        stage.process_batch(part)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    for text in texts:
        stage.model.predict(text.replace("\n", " "), k=k)
    bare_s = time.perf_counter() - start
    return len(texts) / ours_s, len(texts) / bare_s


def fasttext_stages(table: pa.Table) -> None:
    print(f"\n== fastText stages: {table.num_rows:,} docs, one core ==")
    lid = LangId(LangId.Config(), CTX)
    lid.setup()
    rows = [("lang_id (lid.176)", *versus(lid, table, k=1))]
    model = DATA / "models" / "quality.bin"
    if model.exists():
        stage = FastTextQuality(FastTextQuality.Config(model=str(model)), CTX)
        stage.setup()
        rows.append(("fasttext_quality", *versus(stage, table, k=2)))
    print(f"{'stage':22} {'curate/s':>10} {'bare/s':>10} {'ratio':>7}")
    for name, a, b in rows:
        print(f"{name:22} {a:>10,.0f} {b:>10,.0f} {a / b:>6.2f}x")


def perplexity(table: pa.Table) -> None:
    model = DATA / "models" / "en.arpa"
    if not model.exists():
        print("\n(no LM: run make text-quality)")
        return
    stage = Perplexity(Perplexity.Config(model=str(model)), CTX)
    stage.setup()
    start = time.perf_counter()
    for part in batches(table):
        stage.process_batch(part)
    ours_s = time.perf_counter() - start
    texts = normalize(table.column("text")).to_pylist()
    start = time.perf_counter()
    words = 0
    for text in texts:  # bare kenlm over the same normalized lines
        for line in text.split("\n"):
            if line.strip():
                stage.lm.score(line, bos=True, eos=True)
                words += len(line.split()) + 1
    bare_s = time.perf_counter() - start
    print(f"\n== perplexity (KenLM, order-3 ARPA): {words:,} tokens, one core ==")
    print(
        f"curate {words / ours_s:,.0f} tokens/s (with normalization), bare kenlm loop "
        f"{words / bare_s:,.0f} tokens/s: {bare_s / ours_s:.2f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("split", nargs="?", default="en", choices=["en", "low"])
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    path = DATA / f"{args.split}.jsonl"
    if not path.exists():
        raise SystemExit("no data: run make text-quality (or python bench/text_quality_data.py)")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][: args.limit]
    table = pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows]})
    heuristics(args.split, table, args.limit)
    fasttext_stages(table)
    perplexity(table)


if __name__ == "__main__":
    main()
