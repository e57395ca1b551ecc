"""Benchmark: what mmSSR capability scoring costs, the original's way and curate's two modes.

Same samples (the bundled LLaVA-format clip-art conversations, repeated to
``--samples``), same model (a random-weight LLaVA from ``curate.mllm.tiny``, or
``--model`` for a real one), same run; every contestant asks every sample for the
14 capability scores and the styles:

``mmssr loop``
    what ``llava/eval/model_ss.py`` does: one ``generate`` call per sample and
    question, batch size 1, greedy, 15 passes per sample, through the same
    :class:`~curate.mllm.local.TransformersBackend` (``batch_size=1``).
``faithful``
    ``capability_score`` with ``mode: faithful``: the same 15 questions per
    sample, batched (``--batch-size``), a sample's questions sent together.
``fused``
    ``capability_score`` with ``mode: fused``: one request per sample answered as
    one JSON object.
``faithful / fused over HTTP`` (``--http``)
    the same stages against curate's OpenAI-compatible server on 127.0.0.1 with
    the model behind it (``--concurrency`` requests in flight): the request count
    a vLLM endpoint would see, and what the wire adds.

All answers are guided (regex-constrained) so that the random model's answers
parse; with a real scorer the faithful answers are single tokens either way.
Reported: wall seconds, samples/s, requests/s, prompt and completion tokens
(from the backend), tokens/s, and the ratio of each to the ``mmssr loop``.
Every contestant must give each sample parseable answers; faithful and the loop
must agree on every score (same model, greedy).

CPU here; on a GPU machine run it with ``--device cuda`` (and ideally ``--model``
a real LLaVA-OV checkpoint); against vLLM start a server and pass ``--endpoint``.

    python bench/capability_score.py --samples 160
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from curate.stages.capability_score import CapabilityScore, CapabilityScoreConfig  # noqa: E402

from curate.conversations import CONVERSATION_TYPE, normalize  # noqa: E402
from curate.mllm.local import TransformersBackend  # noqa: E402
from curate.mllm.serve import serve  # noqa: E402
from curate.mllm.tiny import build_tiny_vlm  # noqa: E402
from curate.stage import StageContext  # noqa: E402

DATA = REPO / "pipelines" / "data" / "demo_llava"


def samples(n: int) -> pa.Table:
    """``n`` samples of the bundled LLaVA set (repeated as needed), as a stage sees them."""
    records = json.loads((DATA / "llava.json").read_text())
    rows: dict[str, list[Any]] = {"id": [], "conversations": [], "image": []}
    for i in range(n):
        r = records[i % len(records)]
        rows["id"].append(f"{r['id']}-{i}")
        rows["conversations"].append(normalize(r["conversations"], has_image=True))
        rows["image"].append((DATA / r["image"]).read_bytes())
    return pa.table(
        {
            "id": rows["id"],
            "conversations": pa.array(rows["conversations"], CONVERSATION_TYPE),
            "image": pa.array(rows["image"], pa.binary()),
        }
    )


def stage(backend: dict[str, Any], mode: str) -> CapabilityScore:
    cfg = CapabilityScoreConfig.model_validate(
        {"backend": backend, "mode": mode, "guided": True, "request_cache": False}
    )
    return CapabilityScore(cfg, StageContext("bench", 0))


def timed(s: CapabilityScore, batch: pa.Table) -> tuple[float, pa.Table, dict[str, int]]:
    s.setup()
    start = time.perf_counter()
    verdict = s.decide(batch)
    seconds = time.perf_counter() - start
    assert verdict.keep.all(), f"unparseable answers: {set(verdict.reason.to_pylist())}"
    assert verdict.batch is not None
    return seconds, verdict.batch, dict(s.run_counters())


def report(name: str, seconds: float, n: int, traffic: dict[str, int], base: float | None) -> float:
    requests = traffic.get("requests", 0)
    tokens = traffic.get("prompt_tokens", 0) + traffic.get("completion_tokens", 0)
    ratio = f"{base / seconds:5.2f}x" if base else "  1.00x"
    print(
        f"{name:<26} {seconds:8.2f} s  {n / seconds:8.2f} samples/s"
        f"  {requests / seconds:8.1f} req/s"
        f"  {requests:>6} req  {traffic.get('prompt_tokens', 0):>9} prompt tok"
        f"  {traffic.get('completion_tokens', 0):>7} out tok  {tokens / seconds:9.0f} tok/s"
        f"  {ratio}"
    )
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", help="a save_pretrained LLaVA folder (default: tiny)")
    parser.add_argument("--http", action="store_true", help="also over the loopback server")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    model = args.model
    if model is None:
        model = str(HERE / "data" / "capability" / "tiny-vlm")
        if not Path(model).exists():
            build_tiny_vlm(model, seed=0)
    batch = samples(args.samples)
    print(f"{args.samples} samples, 14 capabilities + styles, model {model}, device {args.device}")

    loop = {"kind": "transformers", "model": model, "device": args.device, "batch_size": 1}
    batched = {**loop, "batch_size": args.batch_size}
    base, loop_out, traffic = timed(stage(loop, "faithful"), batch)
    report("mmssr loop (batch 1)", base, args.samples, traffic, None)
    seconds, faithful_out, traffic = timed(stage(batched, "faithful"), batch)
    report(f"faithful (batch {args.batch_size})", seconds, args.samples, traffic, base)
    same = all(
        loop_out.column(c).equals(faithful_out.column(c))
        for c in loop_out.column_names
        if c.startswith("mmssr_") and not c.endswith("_raw")
    )
    seconds, _, traffic = timed(stage(batched, "fused"), batch)
    report(f"fused (batch {args.batch_size})", seconds, args.samples, traffic, base)
    print(f"faithful scores equal to the loop's: {same}")
    if args.http:
        backend = TransformersBackend(model, device=args.device, batch_size=args.batch_size)
        server, thread = serve(backend, model_name="scorer")
        try:
            http = {
                "kind": "openai",
                "base_url": server.base_url,
                "model": "scorer",
                "concurrency": args.concurrency,
            }
            for mode in ("faithful", "fused"):
                seconds, _, traffic = timed(stage(http, mode), batch)
                report(f"{mode} over HTTP", seconds, args.samples, traffic, base)
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
    if not same:
        raise SystemExit("faithful scores differ from the loop's")


if __name__ == "__main__":
    main()
